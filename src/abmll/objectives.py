"""The regularisers of the tempered ELBO (METHOD.md section 3), computed in float32 layer by layer.

KL(q_φ ‖ p_θ) = Σ_j [ log(σθ_j / σφ_j) + (σφ_j² + (μφ_j − μθ_j)²) / (2 σθ_j²) − 1/2 ]      (eq. 5)
log p(θ) = Σ_j log Gamma(τ_j; a0, b0),  τ = σθ⁻²   [+ Σ_j log N(μθ_j; 0, s²)]           (eq. 6)
"""

from __future__ import annotations

import math

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


def kl_divergence(
    phi: dict[str, torch.Tensor], theta: dict[str, torch.Tensor], layers: dict[str, BayesLoRALinear]
) -> torch.Tensor:
    """KL(q_φ ‖ p_θ) summed over every entry of every adapted layer (eq. 5), float32, one layer at a time."""
    phi_by_layer, theta_by_layer = group_by_layer(phi), group_by_layer(theta)
    total = torch.zeros((), dtype=torch.float32, device=next(iter(phi.values())).device)
    for name, layer in layers.items():
        q, p = _float32(phi_by_layer[name]), _float32(theta_by_layer[name])
        total = total + gaussian_kl(layer.mean(q), layer.sigma(q), layer.mean(p), layer.sigma(p))
    return total


def log_hyperprior(
    theta: dict[str, torch.Tensor], layers: dict[str, BayesLoRALinear], config: ObjectiveConfig
) -> torch.Tensor:
    """log p(θ): a Gamma(a0, b0) prior on every precision τ = σθ⁻², plus an optional Normal on μθ (eq. 6)."""
    a0, b0 = config.gamma_a0, config.gamma_b0
    const = a0 * math.log(b0) - math.lgamma(a0)
    total = torch.zeros((), dtype=torch.float32, device=next(iter(theta.values())).device)
    for name, factors in group_by_layer(theta).items():
        layer, p = layers[name], _float32(factors)
        sigma = layer.sigma(p)
        log_tau = -2.0 * torch.log(sigma)
        total = total + (const + (a0 - 1.0) * log_tau - b0 * torch.exp(log_tau)).sum()
        if config.mean_prior_std is not None:
            s = config.mean_prior_std
            mu = layer.mean(p)
            total = total + (-0.5 * (mu / s).square() - math.log(s) - 0.5 * math.log(2 * math.pi)).sum()
    return total
