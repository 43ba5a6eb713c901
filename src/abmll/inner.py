"""Amortised inference: a task posterior reached by K SGD steps from the prior (METHOD.md section 3).

    φ⁰ = θ;   φᵏ = φᵏ⁻¹ − α ∇_φ [ NLL(S; W0 + ΔW(φ, ε)) + β · KL(q_φ ‖ p_θ) ]                  (eq. 7)

with α for the mean factors and, for the σ factors (B_σ, A_σ, λ) of each layer,

    α_σ,l = α_σ · σ_init / σ̄θ,l          (σ̄θ,l: the mean σ of layer l under the prior)           (eq. 7b)

The likelihood's gradient on log σ is σ times its gradient on ΔW: one α cannot serve both at a useful σ, and a
fixed α_σ would take ever larger steps as σθ learns. Eq. 7b keeps a step's size on log σ the same at any σθ
(docs/METHOD.md §8).

A step after which the support loss is not finite or more than ``backtrack`` (b) times the loss before it is
taken again at half the step sizes, until it is not, and α and α_σ stay halved for the rest of the loop:

    while not L(φᵏ⁺¹) ≤ b · L(φᵏ):   α ← α/2, α_σ ← α_σ/2,   φᵏ⁺¹ ← φᵏ − α ∇ …                    (eq. 7c)

The KL's curvature in μφ is β/σθ²: where σθ is small, plain SGD overshoots and diverges (docs/METHOD.md §8).
A loop that never overshoots is unchanged.

Every weight sample ε is drawn from a seed derived from the run's seed and the sample's coordinates
(meta-step, task, inner step, sample), never from a global generator state: the same run gives the same ε
in one process or spread across ranks, and after a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from abmll.bayes.inject import bayes_layers, clone_factors, group_by_layer, posterior, weight_sample
from abmll.bayes.layer import SIGMA_FACTORS
from abmll.objectives import LayerwiseGrad, kl_divergence
from abmll.tasks.data import Example

Factors = dict[str, torch.Tensor]


def derive_seed(*coordinates: int) -> int:
    """A 63-bit seed that is a pure function of integer coordinates (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(c) & 0xFFFFFFFF for c in coordinates]).generate_state(
        2, dtype=np.uint32
    )
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def chunks(examples: Sequence[Example], size: int) -> list[Sequence[Example]]:
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def length_order(examples: Sequence[Example]) -> list[int]:
    """The indices of ``examples`` from the shortest to the longest (prompt and longest option, in characters;
    ties keep their order): micro-batches of consecutive examples in this order pad to similar lengths
    (``meta.group_by_length``). A sum over examples, a loss or its gradient, changes only by float rounding."""
    return sorted(range(len(examples)), key=lambda i: len(examples[i].input) + max(map(len, examples[i].options)))


def unordered(rows: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """``rows`` computed for the examples ``order`` lists, back in the examples' own order."""
    out = torch.empty_like(rows)
    out[torch.as_tensor(list(order), dtype=torch.long)] = rows
    return out


def likelihood(
    model: nn.Module,
    phi: Factors | None,
    examples: Sequence[Example],
    scorer,
    seeds: Sequence[int | None],
    micro_batch_size: int,
) -> torch.Tensor:
    """NLL(examples; W0 + ΔW(φ, ε_s)) averaged over the weight samples of ``seeds`` (None = the mean ΔW)."""
    total = 0.0
    n = len(examples)
    with posterior(model, phi):
        for seed in seeds:
            with weight_sample(model, seed):
                for chunk in chunks(examples, micro_batch_size):
                    total = total + scorer.nll(model, chunk) * (len(chunk) / n)
    return total / len(seeds)


def _accumulate(total: list[torch.Tensor | None], grads: Sequence[torch.Tensor | None]) -> list:
    return [t if g is None else (g if t is None else t + g) for t, g in zip(total, grads, strict=True)]


def support_gradient(
    model: nn.Module,
    phi: Factors,
    prior_side: Factors,
    support: Sequence[Example],
    scorer,
    seeds: Sequence[int | None],
    beta: float,
    micro_batch_size: int,
    create_graph: bool,
) -> tuple[float, list[torch.Tensor | None]]:
    """∇_φ [NLL(S; φ, ε) + β·KL(q_φ ‖ p_θ)] (eq. 7), one micro-batch at a time and the KL one layer at a time,
    so that only one chunk's graph or one layer's dense μ and σ are alive at once (unless ``create_graph`` keeps
    them for second order). Returns (loss value, gradients)."""
    params = list(phi.values())
    grads: list[torch.Tensor | None] = [None] * len(params)
    value = 0.0
    weight = 1.0 / (len(seeds) * len(support))
    with posterior(model, phi):
        for seed in seeds:
            with weight_sample(model, seed):
                for chunk in chunks(support, micro_batch_size):
                    loss = scorer.nll(model, chunk) * (len(chunk) * weight)
                    value += float(loss.detach())
                    grads = _accumulate(
                        grads, torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
                    )
    if beta > 0:
        kl_grad = LayerwiseGrad(params, beta, create_graph=create_graph)
        value += beta * float(kl_divergence(phi, prior_side, bayes_layers(model), kl_grad))
        grads = _accumulate(grads, kl_grad.grads)
    return value, grads


def adapt(
    model: nn.Module,
    theta: Factors,
    support: Sequence[Example],
    scorer,
    *,
    steps: int,
    lr: float,
    beta: float,
    seeds: Callable[[int], Sequence[int | None]],
    micro_batch_size: int,
    create_graph: bool = False,
    losses: list[float] | None = None,
    sigma_lr: float | None = None,
    backtrack: float | None = None,
) -> Factors:
    """φᴷ by K steps of plain SGD from θ on the support set (eq. 7), step α = ``lr`` on the mean factors and
    α_σ,l of eq. 7b (``sigma_lr`` = α_σ) on the σ factors; with ``sigma_lr`` None, α on every factor. With
    ``backtrack`` (b), a step that raises the support loss above b times the loss before it (or to a non-finite
    value) is taken again from where it started at half the step sizes, until it does not, and the step sizes stay
    halved (eq. 7c). Each step is checked by the loss that the next step's gradient computes anyway, the last one
    by the loss after it: a loop that never overshoots costs one forward pass more, and gives the same φᴷ.

    ``seeds(k)`` gives the weight-sample seeds of step k (``[None]`` for a deterministic LoRA).
    With ``create_graph`` (second order) φᴷ stays a differentiable function of θ; otherwise φ⁰ is a
    detached copy of θ and no graph is kept between steps. With ``losses``, the support loss before each
    step is appended, and then the loss after the last step (at φᴷ, with the weight samples of step 0, so
    that the first and the last value are paired): K + 1 values.
    """
    phi = dict(theta) if create_graph else clone_factors(theta)
    prior_side = theta if create_graph else {k: v.detach() for k, v in theta.items()}
    if sigma_lr is not None:
        sigma_lr = sigma_step_sizes(bayes_layers(model), prior_side, sigma_lr)
    before: tuple[Factors, float, list] | None = None  # φᵏ⁻¹, its loss and gradient: where a step is undone to
    for k in range(steps if support else 0):
        value, grads = support_gradient(
            model, phi, prior_side, support, scorer, seeds(k), beta, micro_batch_size, create_graph
        )
        while before is not None and backtrack is not None and not value <= backtrack * before[1]:
            lr, sigma_lr = _halved(lr, sigma_lr)  # eq. 7c: the last step overshot; take it again at half the size
            if lr < 1e-12:  # not an overshoot that a smaller step cures: stay at φᵏ⁻¹
                phi, value, grads = before
                break
            phi = sgd_step(before[0], before[2], lr, create_graph, sigma_lr)
            value, grads = support_gradient(
                model, phi, prior_side, support, scorer, seeds(k), beta, micro_batch_size, create_graph
            )
        if losses is not None:
            losses.append(value)
        before = (phi, value, grads)
        phi = sgd_step(phi, grads, lr, create_graph, sigma_lr)
    if support and steps > 0 and (losses is not None or backtrack is not None):
        value = support_loss(model, phi, prior_side, support, scorer, seeds(0), beta, micro_batch_size)
        while backtrack is not None and not value <= backtrack * before[1]:
            lr, sigma_lr = _halved(lr, sigma_lr)  # the last step overshot: halve it until it does not
            phi = sgd_step(before[0], before[2], lr, create_graph, sigma_lr)
            value = support_loss(model, phi, prior_side, support, scorer, seeds(0), beta, micro_batch_size)
            if lr < 1e-12:  # not an overshoot that a smaller step cures: keep φᴷ⁻¹
                phi = before[0]
                break
        if losses is not None:
            losses.append(value)
    return phi


@torch.no_grad()
def support_loss(
    model: nn.Module,
    phi: Factors,
    prior_side: Factors,
    support: Sequence[Example],
    scorer,
    seeds: Sequence[int | None],
    beta: float,
    micro_batch_size: int,
) -> float:
    """NLL(S; φ, ε) + β·KL(q_φ ‖ p_θ) (eq. 7's loss), without gradients."""
    value = float(likelihood(model, phi, support, scorer, seeds, micro_batch_size))
    if beta > 0:
        value += beta * float(kl_divergence(phi, prior_side, bayes_layers(model)))
    return value


def _halved(lr: float, sigma_lr: float | Mapping[str, float] | None):
    """α/2 and α_σ/2 (eq. 7c)."""
    if isinstance(sigma_lr, Mapping):
        return lr / 2, {name: rate / 2 for name, rate in sigma_lr.items()}
    return lr / 2, None if sigma_lr is None else sigma_lr / 2


@torch.no_grad()
def sigma_step_sizes(layers: dict, theta: Factors, sigma_lr: float) -> dict[str, float]:
    """α_σ,l = α_σ · σ_init / σ̄θ,l for every layer l (eq. 7b)."""
    out = {}
    for name, factors in group_by_layer(theta).items():
        layer = layers[name]
        mean_sigma = float(layer.sigma({k: v.float() for k, v in factors.items()}).mean())
        out[name] = sigma_lr * layer.initial_sigma / mean_sigma
    return out


def step_sizes(names: Sequence[str], lr: float, sigma_lr: float | Mapping[str, float] | None) -> list[float]:
    """The step size of each factor: α for the mean factors; for the σ factors ``sigma_lr``, either one value or
    one per layer name (eq. 7b), and α when it is None."""
    rates = []
    for name in names:
        layer, _, factor = name.rpartition(".")
        if factor not in SIGMA_FACTORS or sigma_lr is None:
            rates.append(lr)
        else:
            rates.append(sigma_lr[layer] if isinstance(sigma_lr, Mapping) else sigma_lr)
    return rates


def sgd_step(
    phi: Factors,
    grads: Sequence[torch.Tensor | None],
    lr: float,
    create_graph: bool,
    sigma_lr: float | Mapping[str, float] | None = None,
) -> Factors:
    """One inner step φ ← φ − α ∇ (eq. 7), α_σ on the σ factors; with ``create_graph`` the step stays in the
    graph (second order), else φ is detached and a fresh leaf. Factors with no gradient are kept as they are."""
    rates = step_sizes(list(phi), lr, sigma_lr)
    steps = zip(phi.items(), grads, rates, strict=True)
    if create_graph:
        return {n: (p if g is None else p - a * g) for (n, p), g, a in steps}
    with torch.no_grad():
        return {n: (p if g is None else p - a * g).detach().requires_grad_(True) for (n, p), g, a in steps}


def straight_through(phi: Factors, theta: Factors) -> Factors:
    """φᴷ = θ + stop_gradient(φᴷ − θ): every gradient reaching φᴷ passes to θ unchanged (first-order MAML)."""
    return {k: theta[k] + (phi[k] - theta[k]).detach() for k in theta}
