"""Micro-batches grouped by length (``meta.group_by_length``): a set's examples are ordered by length before they
are cut into micro-batches, so that each pads to similar lengths. Losses, gradients, adapted φ and predictions
must be the ungrouped path's within float rounding (predictions in the query's own order), for a Bayesian, a
deterministic and an in-context method, and the grouping must act: the micro-batches the scorer sees pad to fewer
tokens than the ungrouped ones."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import adapted_tiny, make_config

from abmll.errors import ConfigError
from abmll.inner import length_order, unordered
from abmll.methods import create_method
from abmll.tasks.data import Episode, Example

WORDS = "the cat sat on a mat while birds sang over the quiet green field near old stone walls".split()


def _varied(n: int, seed: int) -> list[Example]:
    """Questions from 1 to 14 words and two options of 1–4 words, in a shuffled order of length."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, 1 + (i * 5) % 14)
        options = (" ".join(rng.sample(WORDS, 1 + i % 4)), " ".join(rng.sample(WORDS, 1 + (i + 2) % 4)))
        out.append(Example(" ".join(words) + " ?", options, i % 2, id=f"q{i}"))
    rng.shuffle(out)
    return out


SUPPORT, QUERY = _varied(10, seed=0), _varied(11, seed=1)


def _method(name: str, grouped: bool, **overrides):
    config = make_config(
        **{"meta.micro_batch_size": 3, "meta.group_by_length": grouped, "inner.inner_lr": 0.3, **overrides}
    )
    model, scorer = adapted_tiny(config, seed=3)
    method = create_method(name, model, scorer, config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # θ away from B = 0, so that the adapter moves the scores
        for key, p in getattr(method, "theta", {}).items():
            if key.endswith(("mu_A", "mu_B")):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return method


def test_length_order_sorts_by_text_length_and_unordered_puts_rows_back():
    order = length_order(QUERY)
    sizes = [len(QUERY[i].input) + max(map(len, QUERY[i].options)) for i in order]
    assert sizes == sorted(sizes) and order != list(range(len(QUERY)))  # the fixture is not sorted already
    rows = torch.arange(len(QUERY), dtype=torch.float32)[order].unsqueeze(1)  # row r belongs to example order[r]
    assert unordered(rows, order).squeeze(1).tolist() == list(range(len(QUERY)))


def _padded_tokens(method, examples) -> tuple[int, int]:
    """(tokens the scorer's micro-batches pad to, tokens of their prompts) over one prediction of ``examples``."""
    seen: list[list[int]] = []
    original = type(method.scorer).__call__

    def spy(scorer, model, chunk):
        seen.append([len(scorer._context_ids(ex.input)) for ex in chunk])
        return original(scorer, model, chunk)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(method.scorer), "__call__", spy)
        method.predict(None, examples, seed=0)
    return sum(max(c) * len(c) for c in seen), sum(sum(c) for c in seen)


def test_grouping_makes_micro_batches_pad_to_fewer_tokens():
    grouped, useful = _padded_tokens(_method("zero-shot", True), QUERY)
    plain, same = _padded_tokens(_method("zero-shot", False), QUERY)
    assert useful == same and grouped < plain
    assert grouped - useful < 0.5 * (plain - useful)  # most of the padding is gone


@pytest.mark.parametrize("name", ["abmll", "lora-task", "zero-shot", "icl"])
def test_grouped_adaptation_and_prediction_equal_the_ungrouped(name):
    on, off = _method(name, True), _method(name, False)
    phi_on, phi_off = on.adapt(SUPPORT, seed=0), off.adapt(SUPPORT, seed=0)
    if isinstance(phi_on, dict):
        moved = max(float((phi_on[k] - on.theta[k]).detach().abs().max()) for k in phi_on)
        assert moved > 1e-3  # the inner loop moved φ: the comparison below compares something
        for key in phi_on:
            torch.testing.assert_close(phi_on[key], phi_off[key], rtol=1e-5, atol=1e-6)
    p_on, p_off = on.predict(phi_on, QUERY, seed=0), off.predict(phi_off, QUERY, seed=0)
    torch.testing.assert_close(p_on, p_off, rtol=1e-5, atol=1e-6)
    # in the query's own order: each row is that example's own prediction, scored alone
    alone = torch.cat([off.predict(phi_off, [ex], seed=0) for ex in QUERY[:3]])
    torch.testing.assert_close(p_on[:3], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["abmll", "maml", "lora", "reptile"])
def test_grouped_meta_gradient_equals_the_ungrouped(name):
    episode = Episode("varied", SUPPORT, QUERY, seed=0)
    grads = []
    for grouped in (True, False):
        method = _method(name, grouped, **{"meta.outer_data": "support+query"} if name == "abmll" else {})
        method.zero_gradients()
        method.task_gradient(episode, step=0, task_index=0, weight=1.0)
        grads.append({k: p.grad.clone() for k, p in method.theta.items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key, g in grads[0].items():  # within 1e-5 relative (as far as another micro-batch size moves them)
        w = grads[1][key]
        assert float(w.norm()) > 0 and float((g - w).norm()) <= 1e-5 * float(w.norm()), key


def test_group_by_length_must_be_a_boolean():
    with pytest.raises(ConfigError, match="meta.group_by_length"):
        make_config(**{"meta.group_by_length": "yes"})
