"""``maml``: MAML-en-LLM (Sinha et al., KDD 2024): MAML on the LoRA factors (METHOD.md section 6).

The template's task-structured loop on a deterministic LoRA (ΔW = μ, no KL, no hyperprior), with the
meta-gradient of MAML's own setting ``maml.order``:

- ``second_order`` (the default): differentiate the query loss at φᴷ through the K inner SGD steps back to θ
  (full MAML; SDPA's fused kernels have no double backward, so the math attention path is forced);
- ``first_order``: first-order MAML (FOMAML), the query-loss gradient at φᴷ applied to θ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from abmll.config import check
from abmll.methods.template import MetaLearner

ORDERS = ("first_order", "second_order")


@dataclass
class MAMLSettings:
    """MAML's own settings (the config section ``maml``)."""

    order: str = field(
        default="second_order",
        metadata={"help": "MAML's meta-gradient: 'second_order' (through the inner steps) or 'first_order' (FOMAML)."},
    )

    def __post_init__(self) -> None:
        check(self.order in ORDERS, "maml.order", self.order, f"one of {ORDERS}")


class MAML(MetaLearner):
    """MAML on deterministic LoRA factors."""

    name = "maml"
    settings_type = MAMLSettings

    @property
    def order(self) -> str:
        return self.settings.order
