"""``abmll-icl``: ABMLL-adapted weights scored with the support set as demonstrations in the prompt
(METHOD.md section 6, the paper's v3).

Meta-training and adaptation are ABMLL's, unchanged: θ is learned on plain prompts (so an ``abmll``
checkpoint can be evaluated as ``abmll-icl``), and φᴷ is reached by K_test inner steps on the plain support
set with the same weight samples as ``abmll``. Only the prediction differs: ABMLL's posterior predictive
(or its mean mode) on each query example prefixed with the support examples, built and truncated exactly as
for ``icl`` (:func:`abmll.methods.icl.demonstrate`); the demonstrations are encoded once per weight sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from abmll.inner import Factors
from abmll.methods.abmll import ABMLL
from abmll.methods.icl import demonstrate
from abmll.tasks.data import Example


@dataclass
class Demonstrated:
    """A task posterior φᴷ and the support set that becomes the demonstrations."""

    phi: Factors
    support: list[Example]


class ABMLLICL(ABMLL):
    """ABMLL with in-context demonstrations at prediction time."""

    name = "abmll-icl"
    meta_trained_as = "abmll"
    demonstrates = True

    def adapt(self, support: Sequence[Example], seed: int) -> Demonstrated:
        return Demonstrated(super().adapt(support, seed), list(support))

    @torch.no_grad()
    def predict(self, adapted: Demonstrated, query: Sequence[Example], seed: int) -> torch.Tensor:
        return super().predict(adapted.phi, demonstrate(adapted.support, query, self.scorer, self.task), seed)
