"""``reptile``: Reptile (Nichol, Achiam & Schulman, 2018) on the LoRA factors (METHOD.md section 6).

Deterministic: ΔW = μ (σ unused), no KL, no hyperprior, as ``structured-lora``. One meta-step over a
meta-batch of T tasks:

    φ_i⁰ = θ;   φ_iᵏ = φ_iᵏ⁻¹ − α ∇_φ NLL(S_i ∪ Q_i; W0 + μ(φ))      k = 1..K   (plain SGD)
    θ ← θ + ε · ( (1/T) Σ_i φ_iᴷ − θ )

- The inner loop runs on the support set AND the query set of each episode: Reptile has no query loss, so
  it trains on all of the task's data the meta-batch provides (the same examples ABMLL sees per meta-step).
  K = ``reptile.inner_steps`` (default ``inner.inner_steps``), α = ``inner.inner_lr``.
- ε is Reptile's own setting ``reptile.epsilon`` (not the AdamW rate ``meta.outer_lr`` of the other
  meta-learners, at which θ would barely move). The update is taken by plain SGD (no momentum, no weight
  decay, so no optimiser state) with learning rate ε on the pseudo-gradient θ.grad = θ − mean_i φ_iᴷ, which
  gives exactly θ + ε (mean φᴷ − θ). It is not clipped: ``meta.max_grad_norm``, ``meta.weight_decay`` and
  ``meta.outer_lr`` do not apply to Reptile.
- Test time is the same as every LoRA baseline: K_test SGD steps from θ on the support set, then the
  mean ΔW.

Across ranks each rank adapts every world-size-th task and the pseudo-gradients are summed with an
all-reduce, as in ABMLL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from abmll.config import ABMLLConfig
from abmll.methods.abmll import _INNER, _world
from abmll.methods.lora import StructuredLoRA


class Reptile(StructuredLoRA):
    """Reptile on the deterministic LoRA factors: move θ toward the mean adapted weights of the meta-batch."""

    name = "reptile"

    def __init__(self, model: nn.Module, scorer, config: ABMLLConfig) -> None:
        super().__init__(model, scorer, config)
        self.optimizer = torch.optim.SGD(list(self.theta.values()), lr=self.epsilon)
        self._optimizer_order = list(self.theta)

    @property
    def epsilon(self) -> float:
        """Reptile's outer step size ε (``reptile.epsilon``)."""
        return self.config.reptile.epsilon

    @property
    def inner_steps(self) -> int:
        """K of Reptile's inner loop (``reptile.inner_steps``, default ``inner.inner_steps``)."""
        steps = self.config.reptile.inner_steps
        return self.config.inner.inner_steps if steps is None else steps

    def meta_step(self, episodes: Sequence) -> dict[str, float]:
        """θ ← θ + ε (mean_i φ_iᴷ − θ) over one meta-batch."""
        rank, world = _world()
        self.zero_gradients()
        T = len(episodes)
        step = self.step
        device = next(iter(self.theta.values())).device  # collectives need the parameters' device (NCCL)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # support_first, support_last, tasks
        for i in range(rank, T, world):
            episode = episodes[i]
            losses: list[float] = []
            phi = self.inner_loop(
                list(episode.support) + list(episode.query),
                lambda k, i=i: self._seeds(_INNER, step, i, k, count=1),
                self.inner_steps,
                losses=losses,
            )
            with torch.no_grad():
                for key, p in self.theta.items():
                    p.grad += (p - phi[key]) / T
            nan = float("nan")
            sums += torch.tensor(
                [losses[0] if losses else nan, losses[-1] if losses else nan, 1.0], dtype=torch.float64, device=device
            )
        if world > 1:
            for p in self.theta.values():
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        params = list(self.theta.values())
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        n = float(sums[2])
        first, last = float(sums[0]) / n, float(sums[1]) / n
        if self.finite_or_skip(last, float(norm)):  # the NaN/Inf guard: stop, or skip leaving θ as it is
            self.optimizer.step()
        self.step += 1
        return {
            "step": self.step,
            # Reptile has no outer loss: report the task loss after the last inner step (at φᴷ).
            "outer_nll": last,
            "kl": 0.0,
            "beta_kl_over_nll": 0.0,
            "support_nll_first": first,
            "support_nll_last": last,
            "log_hyperprior": 0.0,
            # ‖θ − mean φᴷ‖: the size of the Reptile direction (the update is ε times it).
            "grad_norm": float(norm),
        }
