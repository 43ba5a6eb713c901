"""A toy method written as a user would add one: first-order MAML whose outer step is plain SGD at a fixed ε
(its own setting), on a deterministic LoRA. Everything else is the template's
(:class:`abmll.methods.template.MetaLearner`). ``tests/test_template.py`` registers it with one line and runs it
through every command."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from abmll.config import check, is_number
from abmll.methods.template import MetaLearner


@dataclass
class FixedStepSettings:
    """The toy method's own settings: the config section ``fixed-step-maml``."""

    epsilon: float = field(
        default=0.05,
        metadata={"help": "ε: the fixed SGD step on θ.", "search": {"low": 0.01, "high": 0.5, "log": True}},
    )

    def __post_init__(self) -> None:
        check(is_number(self.epsilon, 0, strict=True), "fixed-step-maml.epsilon", self.epsilon, "a number > 0")


class FixedStepMAML(MetaLearner):
    """First-order MAML with θ ← θ − ε ∇θ (no AdamW)."""

    name = "fixed-step-maml"
    settings_type = FixedStepSettings

    @property
    def order(self) -> str:
        return "first_order"

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, list[str]]:
        return torch.optim.SGD(list(self.theta.values()), lr=self.settings.epsilon), list(self.theta)
