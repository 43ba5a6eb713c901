"""``zero-shot``: the base model with no adaptation (METHOD.md section 6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from abmll.bayes.inject import adapters_disabled
from abmll.inner import chunks, unordered
from abmll.methods.base import Method
from abmll.tasks.data import Example


class ZeroShot(Method):
    """Scores the query with the base model; the support set is ignored."""

    name = "zero-shot"
    meta_learns = False
    adapted = False

    def adapt(self, support: Sequence[Example], seed: int) -> None:
        return None

    @torch.no_grad()
    def predict(self, adapted: None, query: Sequence[Example], seed: int) -> torch.Tensor:
        out = []
        order = self.batch_order(query)
        with adapters_disabled(self.model):
            for chunk in chunks([query[i] for i in order], self.config.meta.micro_batch_size):
                out.append(torch.softmax(self.scorer(self.model, chunk), dim=-1))
        return unordered(torch.cat(out), order).cpu()
