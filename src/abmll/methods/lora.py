"""Deterministic LoRA baselines (METHOD.md section 6), on the same adapter layers with ΔW = μ (σ unused).

- ``structured-lora``: ABMLL's task-structured loop with σ ≡ 0 and β = γ = 0 (deterministic, first-order).
- ``lora`` ("regular LoRA"): one LoRA trained on the pooled meta-training examples — every meta-step pools
  the support and query examples of the same meta-batch ABMLL would see (an equal budget) — then K_test
  fine-tuning steps on the test task's support set.
"""

from __future__ import annotations

from collections.abc import Sequence

from abmll.bayes.inject import posterior, weight_sample
from abmll.inner import chunks
from abmll.methods.abmll import ABMLL


class StructuredLoRA(ABMLL):
    """ABMLL's loop with a deterministic LoRA: ΔW = μ, no KL, no hyperprior."""

    name = "structured-lora"
    stochastic = False


class LoRA(StructuredLoRA):
    """Regular LoRA: pooled multi-task training, then plain fine-tuning on each test task's support set."""

    name = "lora"

    def meta_step(self, episodes: Sequence) -> dict[str, float]:
        pooled = [ex for ep in episodes for ex in list(ep.support) + list(ep.query)]
        self.zero_gradients()
        value = 0.0
        with posterior(self.model, None), weight_sample(self.model, None):
            for chunk in chunks(pooled, self.config.meta.micro_batch_size):
                loss = self.scorer.nll(self.model, chunk) * (len(chunk) / len(pooled))
                loss.backward()
                value += float(loss.detach())
        grad_norm = self.apply_gradients()
        return {"step": self.step, "outer_nll": value, "kl": 0.0, "beta_kl_over_nll": 0.0, "grad_norm": grad_norm}
