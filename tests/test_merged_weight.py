"""The merged-weight path of prediction (``compute.merge_without_grad``): without gradients and under a weight sample
each Bayesian adapted linear layer runs one product with W0 + ΔW, formed once per posterior and sample, instead of
the base product and the update's two. It must give the plain path's option log-probabilities (within float
rounding), with left and right padding, options of different token lengths and the shared-prefix scorer; form each
merged weight once per weight sample; leave the mean ΔW's low-rank path as it is; and leave nothing behind."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config
from test_scoring import MIXED, sharp_tiny

from abmll.bayes import bayes_layers, posterior, prior, weight_sample
from abmll.config import ScoringConfig
from abmll.methods import create_method
from abmll.scoring import Scorer

TOL = 1e-5


def _perturbed(method) -> None:
    """θ away from its initialisation (B = 0 would make μ = 0), so that ΔW matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in prior(method.model).items():
            p.add_((0.3 if key.endswith(("mu_B", "mu_A")) else 0.5) * torch.randn(p.shape, generator=g))


def _scores(model, tok, side: str, shared: bool, merge: bool, seed) -> torch.Tensor:
    for layer in bayes_layers(model).values():
        layer.merge = merge
    with torch.no_grad(), weight_sample(model, seed):
        return Scorer(tok, ScoringConfig(shared_prefix=shared), padding_side=side)(model, MIXED)


@pytest.mark.parametrize("seed", [None, 7], ids=["mean", "sample"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shared", [False, True], ids=["plain-scorer", "shared-prefix"])
def test_merged_weight_gives_the_plain_scores(seed, side, shared):
    model, tok = sharp_tiny()
    config = make_config()
    method = create_method("abmll", model, Scorer(tok, config.scoring), config)
    _perturbed(method)
    plain = _scores(model, tok, side, shared, merge=False, seed=seed)
    merged = _scores(model, tok, side, shared, merge=True, seed=seed)
    finite = torch.isfinite(plain)
    assert torch.equal(finite, torch.isfinite(merged))
    assert (plain[finite] - merged[finite]).abs().max().item() < TOL
    if seed is None:  # the mean ΔW keeps its low-rank path: bit-equal
        assert torch.equal(plain, merged)
    base = _scores(model, tok, side, shared, merge=False, seed=None) if seed is not None else None
    if base is not None:  # the weight sample moved the scores: the test compares something
        assert (base[finite] - plain[finite]).abs().max().item() > 100 * TOL


def test_predictions_match_and_each_merged_weight_is_formed_once_per_weight_sample(toy_examples):
    model, tok = sharp_tiny()
    config = make_config(**{"predict.samples": 3, "meta.micro_batch_size": 2})
    method = create_method("abmll", model, Scorer(tok, config.scoring), config)
    _perturbed(method)
    phi = method.adapt(toy_examples[:4], seed=0)
    formed = []
    layers = list(bayes_layers(model).values())
    original = type(layers[0]).sample_delta

    def counting(self, factors, seed):
        formed.append(self.layer_index)
        return original(self, factors, seed)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(layers[0]), "sample_delta", counting)
        merged = method.predict(phi, toy_examples[4:], seed=0)
    # S = 3 weight samples × the adapted layers, whatever the number of chunks and scorer passes
    assert len(formed) == 3 * len(layers) and len(toy_examples[4:]) > config.meta.micro_batch_size
    assert all(layer._merged is None for layer in layers)  # nothing held after prediction
    plain = create_method("abmll", model, method.scorer, config.override({"compute.merge_without_grad": False}))
    torch.testing.assert_close(plain.predict(phi, toy_examples[4:], seed=0), merged, rtol=1e-5, atol=1e-6)


def test_training_never_takes_the_merged_path(toy_examples):
    """With gradients the update keeps its own products (the merged weight has no gradient path to φ)."""
    model, tok = sharp_tiny()
    config = make_config()
    method = create_method("abmll", model, Scorer(tok, config.scoring), config)
    phi = {k: v.detach().clone().requires_grad_() for k, v in method.theta.items()}
    with posterior(model, phi), weight_sample(model, 3):
        loss = method.scorer.nll(model, toy_examples[:4])
    grads = torch.autograd.grad(loss, list(phi.values()), allow_unused=True)
    assert all(g is not None for k, g in zip(phi, grads, strict=True) if k.endswith(("mu_A", "sigma_A", "sigma_scale")))
    assert all(layer._merged is None for layer in bayes_layers(model).values())
