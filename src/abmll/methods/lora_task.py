"""``lora-task``: a fresh LoRA fine-tuned on the test task's support set only (METHOD.md section 6).

No meta-training: θ stays at its initialisation (B = 0, so ΔW = 0 at the start, as LoRA does; A seeded by
``config.seed``). At test time ``adapt`` takes K_test plain SGD steps (``inner.test_inner_steps``, step size
``inner.test_inner_lr``, default ``inner.inner_lr``) from that fresh θ on the support set, deterministically
(ΔW = μ), and ``predict`` scores the query with the mean ΔW. It is the "no meta-learning" control of every
meta-learned LoRA baseline: same adapter layers, same steps, same step size, only the starting point differs.
"""

from __future__ import annotations

from collections.abc import Callable

from abmll.methods.base import LogFn, MetaBatches
from abmll.methods.template import MetaLearner


class LoRATask(MetaLearner):
    """A fresh deterministic LoRA per test task, trained on its support set alone."""

    name = "lora-task"
    meta_learns = False

    def meta_train(
        self,
        batches: MetaBatches,
        steps: int | None = None,
        log: LogFn | None = None,
        should_stop: Callable[[int], bool] | None = None,
    ) -> None:
        """Nothing is learned across tasks: θ keeps its fresh initialisation."""
