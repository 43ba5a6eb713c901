"""The KL (eq. 5) and the hyperprior (eq. 6) are differentiated one layer at a time: the same gradients as
differentiating their sum over all layers, with only one layer's dense μ and σ alive at once."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import adapted_tiny, make_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from abmll.bayes import FACTORS, bayes_layers, clone_factors, posterior, prior, weight_sample
from abmll.inner import chunks, likelihood, sigma_step_sizes, step_sizes, straight_through, support_gradient
from abmll.methods import ABMLL
from abmll.methods.template import INNER, OUTER
from abmll.objectives import LayerwiseGrad, gaussian_kl, kl_divergence, log_hyperprior
from abmll.plan import measure_peak
from abmll.tasks.data import Episode

BETA = 1e-6  # with inner_lr 0.1 on this model: about half of θ's gradient, and the inner steps stay stable


def _perturb(theta: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theta.values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _summed_kl(phi: dict, theta: dict, layers: dict) -> torch.Tensor:
    """The previous implementation: the float32 KL of every layer added into one scalar before any backward."""
    terms = []
    for name, layer in layers.items():
        q = {f: phi[f"{name}.{f}"].float() for f in FACTORS}
        p = {f: theta[f"{name}.{f}"].float() for f in FACTORS}
        terms.append(gaussian_kl(layer.mean(q), layer.sigma(q), layer.mean(p), layer.sigma(p)))
    return torch.stack(terms).sum()


def _reference_outer_backward(method: ABMLL, episode: Episode, second: bool, weight: float) -> None:
    """``task_gradient`` as it was: the NLL's gradients (the unchanged code path, β = 0), then every
    layer's β·KL summed into one scalar and differentiated at once (autograd.grad in the inner steps, backward
    into θ.grad in the outer pass)."""
    model, scorer, theta, layers = method.model, method.scorer, method.theta, method.layers
    inner, micro = method.config.inner, method.config.meta.micro_batch_size
    phi = dict(theta) if second else clone_factors(theta)
    prior_side = theta if second else {k: v.detach() for k, v in theta.items()}
    for k in range(inner.inner_steps):
        seeds = method.seeds(INNER, 0, 0, k, count=inner.inner_samples)
        params = list(phi.values())
        support = method.grouped(episode.support)  # in the order its micro-batches take it (meta.group_by_length)
        _, grads = support_gradient(model, phi, prior_side, support, scorer, seeds, 0.0, micro, second)
        kl = method.beta * _summed_kl(phi, prior_side, layers)
        grads = [g + h for g, h in zip(grads, torch.autograd.grad(kl, params, create_graph=second), strict=True)]
        rates = step_sizes(list(phi), inner.inner_lr, sigma_step_sizes(layers, prior_side, inner.sigma_lr))
        new = {n: p - a * g for (n, p), g, a in zip(phi.items(), grads, rates, strict=True)}
        phi = new if second else {n: v.detach().requires_grad_(True) for n, v in new.items()}
    if not second:
        phi = straight_through(phi, theta)
    outer = list(episode.query)
    if method.config.meta.outer_data == "support+query":
        outer = list(episode.support) + outer
    outer = method.grouped(outer)
    seeds = method.seeds(OUTER, 0, 0, count=inner.inner_samples)
    with posterior(model, phi):
        for seed in seeds:
            with weight_sample(model, seed):
                for chunk in chunks(outer, micro):
                    nll = scorer.nll(model, chunk) * (len(chunk) / (len(outer) * len(seeds)))
                    (nll * weight).backward(retain_graph=second)
    # first order: the KL's direct partial on θ at φᴷ held fixed (the empirical-Bayes gradient)
    phi_kl = phi if second else {k: v.detach() for k, v in phi.items()}
    (method.beta * _summed_kl(phi_kl, theta, layers) * weight).backward()


def _method(order: str, targets="all-linear") -> ABMLL:
    config = make_config(
        **{
            "inner.order": order,
            "inner.inner_steps": 2,
            "inner.inner_lr": 0.1,
            "objective.beta": BETA,
            "lora.targets": targets,
            "lora.rank": 4,
        }
    )
    model, scorer = adapted_tiny(config)
    method = ABMLL(model, scorer, config)
    _perturb(method.theta, 5)
    return method


def _episode(examples) -> Episode:
    return Episode(task="t", support=examples[:6], query=examples[6:12])


def _theta_grads(method: ABMLL, run) -> list[torch.Tensor]:
    for p in method.theta.values():
        p.grad = None
    run()
    return [p.grad.clone() for p in method.theta.values()]


def _assert_equal_grads(got: list, want: list, rtol: float = 1e-6) -> None:
    for g, w in zip(got, want, strict=True):
        # float32 sums in another order: relative to the tensor's largest entry
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * float(w.abs().max()))


@pytest.mark.parametrize("order", ["first_order", "second_order"])
def test_layerwise_outer_gradient_equals_the_summed_kl(order, toy_examples):
    method, episode = _method(order), _episode(toy_examples)
    second = order == "second_order"
    got = _theta_grads(method, lambda: method.task_gradient(episode, step=0, task_index=0, weight=0.5))
    # the attention kernel ABMLL uses for this order (math for second order: the fused kernels have no double backward)
    with sdpa_kernel(SDPBackend.MATH) if second else contextlib.nullcontext():
        want = _theta_grads(method, lambda: _reference_outer_backward(method, episode, second, weight=0.5))
    _assert_equal_grads(got, want)
    # the KL is a real part of that gradient: without it the gradient is far from the reference
    method.config.objective.beta = 0.0
    without = _theta_grads(method, lambda: method.task_gradient(episode, step=0, task_index=0, weight=0.5))
    assert sum(float((a - b).norm()) for a, b in zip(without, want, strict=True)) > 1e-3 * sum(
        float(w.norm()) for w in want
    )


@pytest.mark.parametrize("create_graph", [False, True])
def test_layerwise_support_gradient_equals_the_summed_kl(create_graph, toy_examples):
    """∇_φ of the inner loss (eq. 7) at φ ≠ θ, and with create_graph its derivative with respect to θ."""
    method = _method("second_order" if create_graph else "first_order")
    model, scorer, theta, layers = method.model, method.scorer, method.theta, method.layers
    support = _episode(toy_examples).support
    seeds = method.seeds(INNER, 0, 0, 0, count=1)
    g = torch.Generator().manual_seed(9)
    if create_graph:  # φ a differentiable function of θ, as after an inner step of second order
        phi = {k: v + 0.03 * torch.randn(v.shape, generator=g) for k, v in theta.items()}
        prior_side = theta
    else:
        phi = {k: (v + 0.03 * torch.randn(v.shape, generator=g)).detach().requires_grad_() for k, v in theta.items()}
        prior_side = {k: v.detach() for k, v in theta.items()}
    with sdpa_kernel(SDPBackend.MATH):
        _, got = support_gradient(model, phi, prior_side, support, scorer, seeds, BETA, len(support), create_graph)
        loss = likelihood(model, phi, support, scorer, seeds, len(support))
        loss = loss + BETA * _summed_kl(phi, prior_side, layers)
        want = torch.autograd.grad(loss, list(phi.values()), create_graph=create_graph)
    _assert_equal_grads([x.detach() for x in got], [x.detach() for x in want])
    if create_graph:  # the second-order path: differentiate a function of the gradients back to θ
        probe = [torch.randn(x.shape, generator=g) for x in want]
        params = list(theta.values())
        with sdpa_kernel(SDPBackend.MATH):
            d_got = torch.autograd.grad(sum((x * r).sum() for x, r in zip(got, probe, strict=True)), params)
            d_want = torch.autograd.grad(sum((x * r).sum() for x, r in zip(want, probe, strict=True)), params)
        _assert_equal_grads(list(d_got), list(d_want))


def test_layerwise_log_hyperprior_gradient_equals_the_summed_one():
    config = make_config(**{"lora.targets": "all-linear", "objective.mean_prior_std": 0.5})
    model, _ = adapted_tiny(config)
    theta, layers = prior(model), bayes_layers(model)
    _perturb(theta, 3)
    summed = log_hyperprior(theta, layers, config.objective)
    want = torch.autograd.grad(-0.1 * summed, list(theta.values()))
    summed = summed.detach()
    grad = LayerwiseGrad(list(theta.values()), -0.1)
    value = log_hyperprior(theta, layers, config.objective, grad)
    assert not value.requires_grad and float(value) == pytest.approx(float(summed), rel=1e-6)
    _assert_equal_grads(grad.grads, list(want))


def test_layerwise_kl_when_phi_is_theta_itself():
    """Second order with no inner step: φ and θ are the same tensors; their gradient is counted once."""
    model, _ = adapted_tiny(make_config(**{"lora.targets": "all-linear"}))
    theta, layers = prior(model), bayes_layers(model)
    _perturb(theta, 4)
    params = list(theta.values())
    want = torch.autograd.grad(_summed_kl(theta, theta, layers), params, allow_unused=True)
    grad = LayerwiseGrad(params)
    assert float(kl_divergence(theta, theta, layers, grad)) == 0.0
    assert all(g is not None for g in grad.grads)
    want = [torch.zeros_like(p) if w is None else w for p, w in zip(params, want, strict=True)]
    _assert_equal_grads(grad.grads, want)


# --- memory ---------------------------------------------------------------------------------------------
def _wide_adapted():
    """The tiny model with every linear layer adapted (14 layers) and φ ≠ θ."""
    model, _ = adapted_tiny(make_config(**{"lora.targets": "all-linear", "lora.rank": 4}))
    theta, layers = prior(model), bayes_layers(model)
    _perturb(theta, 2)
    phi = {k: (v + 0.01).detach().requires_grad_() for k, v in theta.items()}
    return theta, phi, layers


def test_layerwise_kl_lowers_the_peak_of_the_inner_kl_gradient():
    theta, phi, layers = _wide_adapted()
    prior_side, params = {k: v.detach() for k, v in theta.items()}, list(phi.values())
    assert len(layers) == 14

    def summed():
        torch.autograd.grad(BETA * _summed_kl(phi, prior_side, layers), params)

    def layerwise():
        kl_divergence(phi, prior_side, layers, LayerwiseGrad(params, BETA))

    dense = max(layer.out_features * layer.in_features * 4 for layer in layers.values())  # one float32 μ or σ
    low_rank = sum(p.numel() * 4 for p in params)  # the gradients of φ (as many bytes as φ), kept to the end
    old, new = measure_peak(summed), measure_peak(layerwise)
    # measured: old 1.84 MiB (the dense μ, σ and their gradients' working set of every layer), new 0.40 MiB
    # (about 11 dense tensors of the widest layer, plus the low-rank gradients of φ)
    assert old > 3 * new, (old, new)
    assert new < low_rank + 16 * dense < old, (old, new, low_rank, dense)


def test_layerwise_kl_lowers_the_peak_of_the_outer_kl_backward():
    method = _method("first_order")
    episode = Episode(task="t", support=[], query=[])  # no NLL: the outer pass is the β·KL backward alone
    params = list(method.theta.values())
    phi = straight_through({k: (v + 0.01).detach() for k, v in method.theta.items()}, method.theta)

    def summed():
        (BETA * _summed_kl(phi, method.theta, method.layers)).backward()

    def layerwise():
        method.task_gradient(episode, step=0, task_index=0, weight=1.0)

    for p in params:
        p.grad = torch.zeros_like(p)
    old = measure_peak(summed)
    new = measure_peak(layerwise)
    assert old > 4 * new, (old, new)
