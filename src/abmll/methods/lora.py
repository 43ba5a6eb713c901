"""Deterministic LoRA baselines (METHOD.md section 6), on deterministic adapter layers: ΔW = μ, no σ factors.

- ``structured-lora``: ABMLL's task-structured loop with a deterministic LoRA and no KL or hyperprior
  (first-order, or as ``inner.order`` says): the template as it is.
- ``lora`` ("regular LoRA"): one LoRA trained on the pooled meta-training examples — every meta-step pools
  the support and query examples of the same meta-batch ABMLL would see (an equal budget) — then K_test
  fine-tuning steps on the test task's support set.
"""

from __future__ import annotations

from collections.abc import Sequence

from abmll.bayes.inject import posterior, weight_sample
from abmll.inner import chunks
from abmll.methods.template import MetaLearner, TaskStats


class StructuredLoRA(MetaLearner):
    """ABMLL's loop with a deterministic LoRA: ΔW = μ, no KL, no hyperprior."""

    name = "structured-lora"


class LoRA(MetaLearner):
    """Regular LoRA: pooled multi-task training, then plain fine-tuning on each test task's support set."""

    name = "lora"

    def task_weight(self, episodes: Sequence, index: int) -> float:
        """The task's share of the pooled examples: the meta-batch's loss is the mean over all of them."""
        size = [len(ep.support) + len(ep.query) for ep in episodes]
        return size[index] / sum(size)

    def task_gradient(self, episode, step: int, task_index: int, weight: float) -> TaskStats:
        """The NLL of the task's support and query examples at θ itself (no inner loop)."""
        examples = self.grouped(list(episode.support) + list(episode.query))
        value = 0.0
        with posterior(self.model, None), weight_sample(self.model, None):
            for chunk in chunks(examples, self.config.meta.micro_batch_size):
                loss = self.scorer.nll(self.model, chunk) * (len(chunk) / len(examples))
                (loss * weight).backward()
                value += float(loss.detach())
        return TaskStats(nll=value)

    def forward_passes(self, episode) -> int:
        return len(chunks(range(len(episode.support) + len(episode.query)), self.config.meta.micro_batch_size))
