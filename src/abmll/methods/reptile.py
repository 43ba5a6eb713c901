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

Across ranks each rank adapts every world-size-th task and the pseudo-gradients are summed, as for every
method of the template (:class:`abmll.methods.template.MetaLearner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from abmll.config import check, is_int, is_number
from abmll.inner import chunks
from abmll.methods.template import INNER, MetaLearner, TaskStats


@dataclass
class ReptileSettings:
    """Reptile's own settings (the config section ``reptile``): θ ← θ + ε (mean_i φ_iᴷ − θ)."""

    epsilon: float = field(
        default=0.1,
        metadata={
            "help": "ε: Reptile's outer step size toward the meta-batch's mean adapted weights.",
            "search": {"low": 1e-2, "high": 1.0, "log": True},  # abmll tune's range
        },
    )
    inner_steps: int | None = field(
        default=None,
        metadata={
            "help": "K of Reptile's inner loop during meta-training; null uses inner.inner_steps.",
            "search": {"low": 1, "high": 10, "integer": True},
        },
    )

    def __post_init__(self) -> None:
        check(is_number(self.epsilon, 0, strict=True), "reptile.epsilon", self.epsilon, "a finite number > 0")
        if self.inner_steps is not None:
            check(is_int(self.inner_steps, 1), "reptile.inner_steps", self.inner_steps, "an integer ≥ 1 or null")


class Reptile(MetaLearner):
    """Reptile on the deterministic LoRA factors: move θ toward the mean adapted weights of the meta-batch."""

    name = "reptile"
    settings_type = ReptileSettings
    clips = False  # the update is ε times a displacement, not a gradient

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, list[str]]:
        """Plain SGD at learning rate ε on the pseudo-gradient θ − mean φᴷ: exactly θ + ε (mean φᴷ − θ)."""
        return torch.optim.SGD(list(self.theta.values()), lr=self.settings.epsilon), list(self.theta)

    @property
    def inner_steps(self) -> int:
        """K of Reptile's inner loop (``reptile.inner_steps``, default ``inner.inner_steps``)."""
        steps = self.settings.inner_steps
        return self.config.inner.inner_steps if steps is None else steps

    def task_gradient(self, episode, step: int, task_index: int, weight: float) -> TaskStats:
        """θ.grad = ``weight`` · (θ − φᴷ): the task's share of θ − mean φᴷ. Reptile has no outer loss: the task
        loss after the last inner step (at φᴷ) is reported as the outer NLL."""
        losses: list[float] = []
        phi = self.inner_loop(
            list(episode.support) + list(episode.query),
            lambda k: self.seeds(INNER, step, task_index, k, count=1),
            self.inner_steps,
            losses=losses,
        )
        with torch.no_grad():
            for key, p in self.theta.items():
                p.grad = (p - phi[key]) * weight
        first, last = (losses[0], losses[-1]) if losses else (None, None)
        return TaskStats(nll=float("nan") if last is None else last, support_first=first, support_last=last)

    def forward_passes(self, episode) -> int:
        """K inner steps and the loss after the last one, each a pass per micro-batch of the task's examples."""
        size = len(episode.support) + len(episode.query)
        return (self.inner_steps + 1) * len(chunks(range(size), self.config.meta.micro_batch_size))
