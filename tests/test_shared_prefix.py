"""The shared-prefix scorer (``scoring.shared_prefix``) against the plain one on the tiny Llama: the same option
log-probabilities and the same adapter gradients, with left and right padding, options of different token
lengths, prompts cut from the left, a prompt prefix shared by the whole batch, and one kept across calls."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from conftest import adapted_tiny, make_config
from test_scoring import LONG, MIXED, sharp_tiny

from abmll.bayes import bayes_layers, prior, weight_sample
from abmll.config import ScoringConfig
from abmll.methods import create_method
from abmll.methods.icl import SEPARATOR, demonstration
from abmll.scoring import SHARED_MIN, Scorer
from abmll.tasks.data import Example
from abmll.tiny import tiny_llama

TOL = 1e-5
DEMOS = f"{LONG} yes\n\nthe dog ran after the cat no\n\n"  # a prefix of ≥ SHARED_MIN tokens shared by every row
DEMONSTRATED = [Example(DEMOS + ex.input, ex.options, ex.gold, ex.id) for ex in MIXED]
BATCHES = {"mixed": MIXED, "demonstrated": DEMONSTRATED}


@pytest.fixture(scope="module")
def tiny():
    return sharp_tiny()


def scores(model, tok, examples, side, shared, **config):
    with torch.no_grad():
        return Scorer(tok, ScoringConfig(shared_prefix=shared, **config), padding_side=side)(model, examples)


def assert_same_scores(plain: torch.Tensor, shared: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(plain), torch.isneginf(shared))
    finite = torch.isfinite(plain)
    assert (plain[finite] - shared[finite]).abs().max().item() < TOL


def test_demonstrated_batch_has_a_shared_prefix_pass(tiny):
    _, tok = tiny
    assert len(tok(DEMOS)["input_ids"]) >= SHARED_MIN
    rows = Scorer(tok).rows(DEMONSTRATED)
    assert all(r.context[:SHARED_MIN] == rows[0].context[:SHARED_MIN] for r in rows)
    assert {len(r.option_ids) for r in rows} == {1, 2, 4, 5}  # options of 1 to 5 tokens


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("scorer", "length_norm"), [("option", "none"), ("option", "token"), ("label", "none")])
def test_shared_prefix_gives_the_plain_scores(tiny, batch, side, scorer, length_norm):
    model, tok = tiny
    config = {"scorer": scorer, "length_norm": length_norm}
    plain = scores(model, tok, BATCHES[batch], side, False, **config)
    assert_same_scores(plain, scores(model, tok, BATCHES[batch], side, True, **config))


@pytest.mark.parametrize("side", ["left", "right"])
def test_shared_prefix_with_prompts_cut_per_option(tiny, side):
    """At max_length 40 the demonstrated prompts are cut from the left, by a different amount for options of
    different lengths: each cut prompt is a distinct prompt of its own."""
    model, tok = tiny
    scorer = Scorer(tok, ScoringConfig(max_length=40))
    rows = scorer.rows(DEMONSTRATED)
    assert scorer.truncated == 3 and len({tuple(r.context) for r in rows if r.example == 1}) == 3
    plain = scores(model, tok, DEMONSTRATED, side, False, max_length=40)
    assert_same_scores(plain, scores(model, tok, DEMONSTRATED, side, True, max_length=40))


def assert_same_gradients(plain: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    """Within TOL relative, each tensor against the largest gradient of its factor in any layer (a layer's λ
    gradient is one sum of terms that nearly cancel, far smaller than its terms)."""
    scale = {}
    for name, grad in plain.items():
        factor = name.rpartition(".")[2]
        scale[factor] = max(scale.get(factor, 0.0), grad.abs().max().item())
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        assert (grad - other[name]).abs().max().item() < TOL * scale[name.rpartition(".")[2]], name


@pytest.fixture(scope="module")
def adapted():
    """The tiny Llama in float64 with an adapter on every linear layer, θ moved off its initialisation. (In
    float32 the plain path alone moves θ's gradients by ~2.5e-5 relative between the two padding sides; the
    LM head's logits and ε stay float32 here.)"""
    config = make_config(**{"lora.targets": "all-linear"})
    model, scorer = adapted_tiny(config)
    model.double()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in prior(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, scorer.tokenizer, config.scoring


def nll_and_gradients(model, tok, config, examples, side, shared, seed=7):
    theta = prior(model)
    scorer = Scorer(tok, dataclasses.replace(config, shared_prefix=shared), padding_side=side)
    with weight_sample(model, seed):
        loss = scorer.nll(model, examples)
    return loss.item(), dict(zip(theta, torch.autograd.grad(loss, list(theta.values())), strict=True))


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("side", ["left", "right"])
def test_shared_prefix_gives_the_plain_adapter_gradients(adapted, batch, side):
    model, tok, config = adapted
    loss, plain = nll_and_gradients(model, tok, config, BATCHES[batch], side, False)
    loss_shared, shared = nll_and_gradients(model, tok, config, BATCHES[batch], side, True)
    assert abs(loss - loss_shared) <= TOL * abs(loss)
    assert_same_gradients(plain, shared)


def embedded_lengths(model, run) -> list[tuple[int, int]]:
    """The [rows, tokens] shapes of every batch the model embeds while ``run()`` runs."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("side", ["left", "right"])
def test_reuse_prefix_encodes_the_shared_prefix_once_across_calls(tiny, side):
    """One example per call: without reuse_prefix every call encodes the demonstrations; with it, only the
    first, and the scores are the plain path's."""
    model, tok = tiny
    plain = scores(model, tok, DEMONSTRATED, side, False)
    scorer = Scorer(tok, padding_side=side)
    n_demos = len(tok(DEMOS)["input_ids"])
    got = []

    def run(reuse: bool):
        got.clear()
        with torch.no_grad(), scorer.reuse_prefix() if reuse else torch.no_grad():
            for ex in DEMONSTRATED:
                got.append(scorer(model, [ex]))

    for reuse, encodings in ((False, 3), (True, 1)):
        widths = [width for _, width in embedded_lengths(model, lambda r=reuse: run(r))]
        assert sum(width >= n_demos for width in widths) == encodings, widths
        for i, ex in enumerate(DEMONSTRATED):
            assert_same_scores(plain[i : i + 1, : len(ex.options)], got[i])
    assert scorer._kept is None


def test_reuse_prefix_keeps_nothing_under_autograd(adapted):
    """With gradients on, each call encodes its own prefix in its own graph, so each backward pass works."""
    model, tok, config = adapted
    _, plain = nll_and_gradients(model, tok, config, DEMONSTRATED, "left", False)
    scorer = Scorer(tok, config, padding_side="left")
    theta = prior(model)
    with scorer.reuse_prefix(), weight_sample(model, 7):
        for _ in range(2):
            grads = torch.autograd.grad(scorer.nll(model, DEMONSTRATED), list(theta.values()))
            assert_same_gradients(plain, dict(zip(theta, grads, strict=True)))


# --- ICL: demonstrations encoded once per task (and weight sample) --------------------------------------------
def icl_method(name: str, side: str, **overrides):
    config = make_config(**{"predict.samples": 2, "meta.micro_batch_size": 2, **overrides})
    model, tok = tiny_llama(seed=0)
    return create_method(name, model, Scorer(tok, config.scoring, padding_side=side), config)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("name", "passes"), [("icl", 1), ("abmll-icl", 2)])
def test_icl_encodes_the_demonstrations_once_per_task_with_the_plain_predictions(toy_examples, name, passes, side):
    """8 demonstrations, 4 query examples in micro-batches of 2: the plain path encodes the demonstrations in
    every row (2 options × 4 queries × samples), the shared one once (once per weight sample for abmll-icl)."""
    support, query = toy_examples[:8], toy_examples[8:]
    probs = {}
    for shared in (False, True):
        method = icl_method(name, side, **{"scoring.shared_prefix": shared})
        adapted = method.adapt(support, 0)
        demos = SEPARATOR.join(demonstration(s, method.scorer) for s in support)
        n_demos = len(method.scorer.tokenizer(demos)["input_ids"])

        def run(m=method, a=adapted, s=shared):
            probs[s] = m.predict(a, query, 0)

        shapes = embedded_lengths(method.model, run)
        encodings = sum(rows for rows, width in shapes if width >= n_demos)  # rows that hold the demonstrations
        assert encodings == (passes if shared else 2 * len(query) * passes), shapes
    assert (probs[False] - probs[True]).abs().max().item() < TOL


def test_icl_warns_naming_the_task_when_demonstrations_are_dropped(toy_examples, caplog):
    method = icl_method("icl", "left", **{"scoring.max_length": 40})
    method.task = "toy-task"
    with caplog.at_level(logging.WARNING, logger="abmll.methods.icl"):
        method.predict(method.adapt(toy_examples[:8], 0), toy_examples[8:], 0)
    assert "task 'toy-task': 4 of 4 query examples keep fewer than the 8 demonstrations" in caplog.text
    caplog.clear()
    method = icl_method("icl", "left")  # the default max_length holds all 8
    method.predict(method.adapt(toy_examples[:8], 0), toy_examples[8:], 0)
    assert "demonstrations" not in caplog.text


def test_one_weight_sample_noise_per_scorer_call(adapted):
    """The shared-prefix path runs two or three decoder passes per call (prefix, prompts, options); each Bayesian
    layer forms σ ⊙ ε once for all of them, and the gradients stay the plain path's (checked above)."""
    model, tok, config = adapted
    layers = list(bayes_layers(model).values())
    drawn = []
    originals = [layer.noise for layer in layers]
    for layer, original in zip(layers, originals, strict=True):
        layer.noise = lambda seed, device, o=original: drawn.append(seed) or o(seed, device)
    try:
        scorer = Scorer(tok, config)
        with weight_sample(model, 7):
            passes = embedded_lengths(model, lambda: scorer.nll(model, DEMONSTRATED).backward())
    finally:
        for layer in layers:
            del layer.noise
    assert len(passes) == 3 and len(drawn) == len(layers)
    assert all(layer._noise is None for layer in layers)  # nothing kept after the call
