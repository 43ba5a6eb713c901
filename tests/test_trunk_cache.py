"""The frozen-trunk cache (``scoring.trunk_cache_mb``) with adapters on the top blocks of a 4-block tiny Llama: the
plain path's option log-probabilities and adapter gradients (left and right padding, options of different token
lengths, both scorers); the blocks below the lowest adapted one run once per prompt and option, not once per pass;
a warm cache gives the cold cache's numbers bit for bit; weights changed below refresh it; a byte budget bounds it;
a meta-step learns the same θ as without it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_config
from test_scoring import MIXED
from test_shared_prefix import DEMONSTRATED, DEMOS, TOL, assert_same_gradients, assert_same_scores

from abmll.bayes import inject, prior, weight_sample
from abmll.config import ScoringConfig
from abmll.errors import ConfigError
from abmll.methods import create_method
from abmll.scoring import Scorer
from abmll.tasks.data import Episode
from abmll.tiny import tiny_llama
from abmll.trunk import TrunkCache, lowest_adapted

TOP = 2  # adapted blocks of 4: blocks 0 and 1 are the frozen trunk


def deep_tiny(dtype=torch.float32, targets="q_proj,v_proj"):
    """The 4-block tiny Llama with its weights perturbed far from uniform logits, Bayesian LoRA on the top
    blocks, θ moved off its initialisation."""
    model, tok = tiny_llama(seed=0, layers=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    config = make_config(**{"lora.layers": TOP, "lora.targets": targets.split(",")})
    inject(model, config.lora, generator=torch.Generator().manual_seed(0))
    model.to(dtype)
    with torch.no_grad():
        for p in prior(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, tok, config.scoring


@pytest.fixture(scope="module")
def tiny():
    return deep_tiny()


def block_calls(model, run) -> list[int]:
    """How many times each decoder block runs while ``run()`` runs."""
    calls = [0] * len(model.model.layers)
    hooks = [
        block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(model.model.layers)
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_the_trunk_is_the_blocks_below_the_lowest_adapted_one(tiny):
    model, _, _ = tiny
    assert lowest_adapted(model.model) == 4 - TOP
    everywhere, _ = tiny_llama(seed=0, layers=4)
    inject(everywhere, make_config().lora)
    assert lowest_adapted(everywhere.model) is None  # block 0 adapted: no trunk
    assert lowest_adapted(tiny_llama(seed=0, layers=4)[0].model) is None  # nothing adapted: nothing reused


@pytest.mark.parametrize("batch", ["mixed", "demonstrated", "cut"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("scorer", "length_norm"), [("option", "none"), ("option", "token"), ("label", "none")])
def test_trunk_cache_gives_the_plain_scores(tiny, side, scorer, length_norm, batch):
    """Mixed prompts, a batch sharing demonstrations, and demonstrated prompts cut from the left by a different
    amount per option (max_length 40)."""
    model, tok, config = tiny
    examples = MIXED if batch == "mixed" else DEMONSTRATED
    config = dataclasses.replace(
        config, scorer=scorer, length_norm=length_norm, max_length=40 if batch == "cut" else config.max_length
    )
    with torch.no_grad():
        plain = Scorer(tok, dataclasses.replace(config, shared_prefix=False), padding_side=side)(model, examples)
        cached = Scorer(tok, config, padding_side=side)
        cold = cached(model, examples)
        assert cached.trunk.misses > 0 and cached.trunk.hits == 0
        warm = cached(model, examples)
    assert_same_scores(plain, cold)
    assert torch.equal(cold, warm)


@pytest.mark.parametrize("batch", ["mixed", "demonstrated"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_trunk_cache_gives_the_plain_adapter_gradients(side, batch):
    model, tok, config = deep_tiny(torch.float64)
    theta = prior(model)
    examples = MIXED if batch == "mixed" else DEMONSTRATED

    def nll_and_gradients(scorer):
        with weight_sample(model, 7):
            loss = scorer.nll(model, examples)
        return loss.item(), dict(zip(theta, torch.autograd.grad(loss, list(theta.values())), strict=True))

    loss, plain = nll_and_gradients(Scorer(tok, dataclasses.replace(config, shared_prefix=False), padding_side=side))
    cached = Scorer(tok, config, padding_side=side)
    for _ in range(2):  # cold, then warm
        loss_cached, grads = nll_and_gradients(cached)
        assert abs(loss - loss_cached) <= TOL * abs(loss)
        assert_same_gradients(plain, grads)
    assert cached.trunk.hits > 0


def test_the_trunk_runs_in_the_first_call_only_and_a_warm_cache_changes_no_number(tiny):
    """A call whose prompts and options are all kept runs only the adapted blocks: the same batch again gives the
    first call's numbers bit for bit; a part of it, in another batch, within float rounding."""
    model, tok, config = tiny
    cached = Scorer(tok, config, padding_side="left")
    uncached = Scorer(tok, dataclasses.replace(config, trunk_cache_mb=0), padding_side="left")
    out = {}

    def score(scorer, examples, key):
        with torch.no_grad():
            out[key] = scorer(model, examples)

    assert block_calls(model, lambda: score(uncached, MIXED, "a")) == [2, 2, 2, 2]  # the prompts, the options
    assert block_calls(model, lambda: score(cached, MIXED, "cold")) == [2, 2, 2, 2]  # recorded on the way
    assert block_calls(model, lambda: score(cached, MIXED, "warm")) == [0, 0, 2, 2]
    assert torch.equal(out["cold"], out["warm"]) and torch.equal(out["cold"], out["a"])
    for i in (1, 2):  # the same examples in another batch: the trunk does not run
        assert block_calls(model, lambda i=i: score(cached, MIXED[i:], f"part{i}"))[:2] == [0, 0]
        assert_same_scores(out["cold"][i:, : out[f"part{i}"].shape[1]], out[f"part{i}"])
    assert (cached.trunk.hits, cached.trunk.misses) == (3, 1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_batch_prefix_runs_through_the_trunk_once(tiny, side):
    """ICL-style batches (demonstrations shared by every row): the scores are the plain path's; a second call
    runs only the adapted blocks, for the demonstrations' pass too."""
    model, tok, config = tiny
    cached = Scorer(tok, config, padding_side=side)
    out = []
    with torch.no_grad():
        plain = Scorer(tok, dataclasses.replace(config, shared_prefix=False), padding_side=side)(model, DEMONSTRATED)
        calls = [block_calls(model, lambda: out.append(cached(model, DEMONSTRATED))) for _ in range(2)]
    assert calls[0] == [3, 3, 3, 3] and calls[1] == [0, 0, 3, 3]  # the prefix, prompts and options passes
    assert_same_scores(plain, out[0])
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_reuse_prefix_runs_the_demonstrations_through_the_trunk_once_across_calls(tiny, side):
    """One example per call inside reuse_prefix (ICL prediction): the demonstrations go through the trunk once and
    through the adapted blocks once; every call's scores are the plain path's."""
    model, tok, config = tiny
    plain = Scorer(tok, dataclasses.replace(config, shared_prefix=False), padding_side=side)
    cached = Scorer(tok, config, padding_side=side)
    n_demos = len(tok(DEMOS)["input_ids"])
    widths = {0: [], 2: []}
    hooks = [model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: widths[i].append(a[0].shape[1]))
             for i in widths]  # fmt: skip
    try:
        with torch.no_grad(), cached.reuse_prefix():
            got = [cached(model, [ex]) for ex in DEMONSTRATED]
    finally:
        for h in hooks:
            h.remove()
    assert sum(w >= n_demos for w in widths[0]) == 1 and sum(w >= n_demos for w in widths[2]) == 1
    with torch.no_grad():
        for ex, scores in zip(DEMONSTRATED, got, strict=True):
            assert_same_scores(plain(model, [ex]), scores)


def test_a_change_below_the_lowest_adapted_block_refreshes_the_cache():
    model, tok, config = deep_tiny()
    cached = Scorer(tok, config)
    with torch.no_grad():
        before = cached(model, MIXED)
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # in place: a new version of the tensor
        after = cached(model, MIXED)
        plain = Scorer(tok, dataclasses.replace(config, shared_prefix=False))(model, MIXED)
    assert (after - before)[torch.isfinite(before)].abs().max() > 1e-3
    assert_same_scores(plain, after)
    assert cached.trunk.hits == 0


def test_the_byte_budget_bounds_the_cache(tiny):
    model, tok, config = tiny
    cached = Scorer(tok, config)
    cached.trunk = TrunkCache(max_bytes=4000)  # room for a few prompts of the tiny model
    with torch.no_grad():
        plain = Scorer(tok, dataclasses.replace(config, shared_prefix=False))(model, MIXED)
        for _ in range(2):
            assert_same_scores(plain, cached(model, MIXED))
            assert 0 < cached.trunk.nbytes <= 4000


def test_a_meta_step_takes_the_same_gradient_with_the_trunk_cache_and_runs_the_trunk_once(toy_examples):
    """One task's meta-gradient (2 inner steps on the support set, the query NLL, β · KL) is the uncached one;
    afterwards, across 3 meta-steps on the same episode, the trunk never runs."""
    episode = Episode("toy", toy_examples[:6], toy_examples[6:])
    grads = []
    for megabytes in (0, 64):
        model, tok = tiny_llama(seed=0, layers=4)
        config = make_config(**{"lora.layers": TOP, "scoring.trunk_cache_mb": megabytes})
        method = create_method("abmll", model, Scorer(tok, config.scoring), config)
        method.zero_gradients()
        method.task_gradient(episode, 0, 0, 1.0)
        grads.append({k: v.grad.clone() for k, v in method.theta.items()})
        first = block_calls(model, lambda m=method: m.meta_step([episode]))
        later = block_calls(model, lambda m=method: [m.meta_step([episode]) for _ in range(2)])
        if megabytes:  # the trunk ran for the support set's first pass and the query's, then never again
            assert first[:2] == [0, 0] and later[:2] == [0, 0] and later[2:] == [8, 8]
            assert method.scorer.trunk.misses == 2
        else:
            assert first == [4, 4, 4, 4] and later == [8, 8, 8, 8]  # 2 inner steps, the support NLL, the query
    assert_same_gradients(grads[0], grads[1])


def test_a_negative_budget_is_one_clear_error():
    with pytest.raises(ConfigError, match="scoring.trunk_cache_mb"):
        ScoringConfig(trunk_cache_mb=-1)


def test_a_kept_prefix_that_skipped_the_trunk_is_not_continued_by_a_pass_that_runs_it(tiny):
    """Recorded outside reuse_prefix, the demonstrated batch is replayed inside it and keeps a prefix pass without
    the blocks below the adapted ones; a new batch with the same demonstrations then runs every block and must
    encode its own prefix: its scores are the plain path's."""
    model, tok, config = tiny
    plain = Scorer(tok, dataclasses.replace(config, shared_prefix=False))
    cached = Scorer(tok, config)
    first, new = DEMONSTRATED[:2], DEMONSTRATED[2:]
    with torch.no_grad():
        cached(model, first)  # recorded
        with cached.reuse_prefix():
            cached(model, first)  # replayed: the kept prefix skipped the trunk
            assert cached._kept.prefix.trunk is not None
            assert_same_scores(plain(model, new), cached(model, new))
            assert cached._kept.prefix.trunk is None  # replaced by one that ran every block
