"""The regularisers of the tempered ELBO (METHOD.md section 3), computed in float32 layer by layer.

KL(q_φ ‖ p_θ) = Σ_j [ log(σθ_j / σφ_j) + (σφ_j² + (μφ_j − μθ_j)²) / (2 σθ_j²) − 1/2 ]      (eq. 5)
log p(θ) = Σ_j log Gamma(τ_j; a0, b0),  τ = σθ⁻²   [+ Σ_j log N(μθ_j; 0, s²)]           (eq. 6)

Both are sums over the adapted layers of terms built from each layer's dense ``[d_out, d_in]`` μ and σ. Given a
:class:`LayerwiseGrad`, each layer's term is differentiated as soon as it is computed, so that only one layer's
dense tensors are alive at a time (summing first and differentiating the sum keeps those of every layer).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from abmll.bayes.inject import group_by_layer
from abmll.bayes.layer import BayesLoRALinear
from abmll.config import ObjectiveConfig


def _float32(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in factors.items()}


def gaussian_kl(
    mu_q: torch.Tensor, sigma_q: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor
) -> torch.Tensor:
    """Σ KL(N(μ_q, σ_q²) ‖ N(μ_p, σ_p²)) over all entries (eq. 5)."""
    return (
        torch.log(sigma_p / sigma_q)
        + (sigma_q.square() + (mu_q - mu_p).square()) / (2 * sigma_p.square())
        - 0.5
    ).sum()


class LayerwiseGrad:
    """The gradient of ``scale`` · Σ_l term_l with respect to ``inputs`` (distinct tensors), accumulated one term
    at a time: :meth:`add` differentiates a layer's term as soon as it is computed and lets its graph go.

    With ``create_graph`` (second order) the gradients stay differentiable, and their graphs keep what the
    double backward needs. :meth:`backward` sends the gradients on through ``inputs``' own graphs (leaves, such
    as θ, accumulate them into ``.grad``).
    """

    def __init__(self, inputs: Sequence[torch.Tensor], scale: float = 1.0, create_graph: bool = False) -> None:
        self.inputs = list(inputs)
        self.scale = scale
        self.create_graph = create_graph
        self.grads: list[torch.Tensor | None] = [None] * len(self.inputs)
        self._position = {id(t): i for i, t in enumerate(self.inputs)}

    def add(self, term: torch.Tensor, depends_on: Iterable[torch.Tensor]) -> None:
        """Add ∇ (scale · term) with respect to those of ``inputs`` that are in ``depends_on``."""
        own = list(dict.fromkeys(self._position[id(t)] for t in depends_on if id(t) in self._position))
        if not own or not term.requires_grad:
            return
        grads = torch.autograd.grad(
            self.scale * term, [self.inputs[i] for i in own], create_graph=self.create_graph, allow_unused=True
        )
        for i, g in zip(own, grads, strict=True):
            if g is not None:
                self.grads[i] = g if self.grads[i] is None else self.grads[i] + g

    def backward(self, tensors: Sequence[torch.Tensor] | None = None) -> None:
        """Backpropagate the gradients from ``tensors`` (default ``inputs``; same length and order)."""
        tensors = self.inputs if tensors is None else list(tensors)
        pairs = [(t, g) for t, g in zip(tensors, self.grads, strict=True) if g is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def kl_divergence(
    phi: dict[str, torch.Tensor],
    theta: dict[str, torch.Tensor],
    layers: dict[str, BayesLoRALinear],
    grad: LayerwiseGrad | None = None,
) -> torch.Tensor:
    """KL(q_φ ‖ p_θ) summed over every entry of every adapted layer (eq. 5), float32, one layer at a time.

    With ``grad``, each layer's KL is differentiated into ``grad`` as soon as it is computed (only one layer's
    dense μ and σ of φ and θ are then alive at once) and the returned total is detached."""
    phi_by_layer, theta_by_layer = group_by_layer(phi), group_by_layer(theta)
    total = torch.zeros((), dtype=torch.float32, device=next(iter(phi.values())).device)
    for name, layer in layers.items():
        q, p = _float32(phi_by_layer[name]), _float32(theta_by_layer[name])
        kl = gaussian_kl(layer.mean(q), layer.sigma(q), layer.mean(p), layer.sigma(p))
        if grad is not None:
            grad.add(kl, [*phi_by_layer[name].values(), *theta_by_layer[name].values()])
            kl = kl.detach()
        total = total + kl
    return total


def log_hyperprior(
    theta: dict[str, torch.Tensor],
    layers: dict[str, BayesLoRALinear],
    config: ObjectiveConfig,
    grad: LayerwiseGrad | None = None,
) -> torch.Tensor:
    """log p(θ): a Gamma(a0, b0) prior on every precision τ = σθ⁻², plus an optional Normal on μθ (eq. 6).

    With ``grad``, each layer's term is differentiated into ``grad`` as soon as it is computed and the returned
    total is detached."""
    a0, b0 = config.gamma_a0, config.gamma_b0
    const = a0 * math.log(b0) - math.lgamma(a0)
    total = torch.zeros((), dtype=torch.float32, device=next(iter(theta.values())).device)
    for name, factors in group_by_layer(theta).items():
        layer, p = layers[name], _float32(factors)
        sigma = layer.sigma(p)
        log_tau = -2.0 * torch.log(sigma)
        term = (const + (a0 - 1.0) * log_tau - b0 * torch.exp(log_tau)).sum()
        if config.mean_prior_std is not None:
            s = config.mean_prior_std
            mu = layer.mean(p)
            term = term + (-0.5 * (mu / s).square() - math.log(s) - 0.5 * math.log(2 * math.pi)).sum()
        if grad is not None:
            grad.add(term, factors.values())
            term = term.detach()
        total = total + term
    return total


def outer_kl_backward(
    phi: dict[str, torch.Tensor],
    theta: dict[str, torch.Tensor],
    layers: dict[str, BayesLoRALinear],
    scale: float,
    order: str,
) -> float:
    """Backpropagate ``scale`` · KL(q_φᴷ ‖ p_θ) of the outer loss (eq. 8) into θ.grad; returns the KL.

    - ``first_order``: the direct partial ∂KL/∂θ at φᴷ held fixed (the empirical-Bayes gradient): it pulls μθ
      toward μφ by (μθ − μφ)/σθ² and moves σθ toward the spread of φ around it.
    - ``straight_through_kl``: ∂KL/∂φᴷ sent straight to θ as well (``phi`` is the straight-through φᴷ); on the
      dense mean the two partials cancel exactly (∂KL/∂μφ = −∂KL/∂μθ), and on its factors up to second order in
      φᴷ − θ, so the KL does not pull μθ (kept for ablation).
    - ``second_order``: ∂KL/∂φᴷ sent through the K inner steps (``phi`` carries their graph), plus ∂KL/∂θ.

    Differentiated one layer at a time (:class:`LayerwiseGrad`), with φᴷ entering as a detached copy whose
    gradient is then sent once through φᴷ's own graph."""
    thetas = list(theta.values())
    phi_in = {k: v.detach().requires_grad_(order != "first_order") for k, v in phi.items()}
    inputs = thetas if order == "first_order" else [*phi_in.values(), *thetas]
    grad = LayerwiseGrad(inputs, scale)
    value = float(kl_divergence(phi_in, theta, layers, grad))
    grad.backward(thetas if order == "first_order" else [*phi.values(), *thetas])
    return value
