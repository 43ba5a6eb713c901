"""The one interface every training algorithm implements (ABMLL and each baseline of METHOD.md section 6), and
the record of a meta-step (:class:`StepLog`).

    method = SomeMethod(model, scorer, config)
    method.meta_train(batches, steps)            # batches.meta_batch(step) -> list[Episode]
    adapted = method.adapt(support, seed)        # task-specific state (e.g. a posterior φ), or None
    probs = method.predict(adapted, query, seed) # [len(query), n_options] option probabilities

``state_dict`` holds what is saved as the method's trained weights (θ); ``trainer_state`` what a resumed
run needs on top (optimiser state, step). Methods that meta-learn LoRA factors build on the template
:class:`abmll.methods.template.MetaLearner`.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from abmll.config import ABMLLConfig
from abmll.errors import ConfigError, NonFiniteError
from abmll.inner import length_order
from abmll.models import prepare_model
from abmll.tasks.data import Episode, Example


class MetaBatches(Protocol):
    def meta_batch(self, step: int) -> list[Episode]: ...


@dataclass
class StepLog:
    """What a meta-step reports: one line of a run's ``log.jsonl`` (:meth:`to_dict`), read by the command line's
    progress, the report's training curves and the trackers. A field that does not apply to a method is None
    (and left out of the line)."""

    step: int  # meta-steps taken, this one included
    outer_nll: float  # mean outer loss of the meta-batch: NLL of the query sets at φᴷ (eq. 8)
    kl: float = 0.0  # mean KL(q_φᴷ ‖ p_θ) (eq. 5); 0 for a deterministic method
    beta_kl_over_nll: float = 0.0  # β · KL / NLL: the weight of the KL term in the outer loss
    support_nll_first: float | None = None  # mean support loss before the first inner step (at φ⁰ = θ)
    support_nll_last: float | None = None  # … and after the last one (at φᴷ)
    log_hyperprior: float = 0.0  # log p(θ) (eq. 6) when γ > 0
    grad_norm: float = 0.0  # norm of θ's gradient before clipping (Reptile: ‖θ − mean φᴷ‖)
    world_size: int = 1  # processes that shared the meta-batch
    skipped_steps: int = 0  # meta-steps skipped so far for a non-finite loss (meta.nonfinite = "skip")
    #: At the steps that validate (``meta.validate_every``, :mod:`abmll.validation`): ``{"dev_nll", "best_step",
    #: "best_dev_nll", "sigma_theta"}``, set by the run after the step.
    validation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


LogFn = Callable[[StepLog], None]


class Method(ABC):
    """A training algorithm behind the shared interface."""

    name: ClassVar[str]
    #: The method's own settings: a dataclass registered as the config section named after the method
    #: (:func:`abmll.config.register_settings`), read with :attr:`settings`; None when it has none.
    settings_type: ClassVar[type | None] = None
    #: True for methods whose adapter layers are Bayesian (ΔW = μ + σ ⊙ ε); False for a deterministic LoRA
    #: (ΔW = μ) or no adapter at all (:attr:`adapted`).
    bayesian: ClassVar[bool] = False
    #: False for methods that run on the base model alone, with no adapter layers.
    adapted: ClassVar[bool] = True
    #: False for methods that learn nothing across tasks (their ``meta_train`` is a no-op and they need no
    #: trained checkpoint): the comparison harness and ``abmll evaluate`` skip meta-training for them.
    meta_learns: ClassVar[bool] = True
    #: Overrides of the shared config (dotted fields) that make up the method's preset, for a method that needs
    #: a library setting other than its default (its own hyperparameters go in :attr:`settings_type`).
    #: :func:`abmll.methods.method_config` applies them where a config leaves the field at the library default;
    #: ``create_method`` leaves the config as given.
    default_overrides: ClassVar[dict[str, Any]] = {}
    #: The method whose meta-training this one shares unchanged (same θ from the same config and seed). A
    #: comparison loads the θ of that method's cell of the same seed (``OUT/{method}/seed-S/train/final``)
    #: instead of training again, when the checkpoint verifies and records the same config, model, data, tasks
    #: and number of meta-steps (:func:`abmll.compare.shared_meta_training`). Subclasses inherit it.
    meta_trained_as: ClassVar[str | None] = None
    #: True for methods that put the support set in the prompt (:mod:`abmll.methods.icl`); the comparison
    #: report then says how many demonstrations fit in ``scoring.max_length``.
    demonstrates: ClassVar[bool] = False
    #: Meta-steps skipped for a non-finite loss or gradient (``meta.nonfinite = "skip"``).
    skipped_steps: int = 0
    #: The task being evaluated (set by :func:`abmll.evaluation.evaluate`), named in messages.
    task: str | None = None

    def __init__(self, model: nn.Module, scorer, config: ABMLLConfig) -> None:
        prepare_model(model, config.compute)  # base dtype, gradient checkpointing (θ stays float32)
        self.model = model
        self.scorer = scorer
        self.config = config
        self.step = 0

    @property
    def settings(self) -> Any:
        """The method's own config section: that of the nearest class (this one or a parent) that declares
        :attr:`settings_type`, named after that class's method."""
        for cls in type(self).__mro__:
            if cls.__dict__.get("settings_type") is not None:
                return self.config.section(cls.name)
        raise ConfigError(f"method '{self.name}' has no settings of its own")

    def meta_train(  # noqa: B027 - a no-op default, not an abstract method
        self,
        batches: MetaBatches,
        steps: int | None = None,
        log: LogFn | None = None,
        should_stop: Callable[[int], bool] | None = None,
    ) -> None:
        """Run meta-steps ``self.step .. steps - 1`` (``config.meta.meta_steps`` by default). Methods that
        learn nothing across tasks keep this no-op."""

    @abstractmethod
    def adapt(self, support: Sequence[Example], seed: int) -> Any:
        """Task-specific state from a support set."""

    @abstractmethod
    def predict(self, adapted: Any, query: Sequence[Example], seed: int) -> torch.Tensor:
        """Option probabilities ``[len(query), n_options]`` (rows sum to 1)."""

    def grouped(self, examples: Sequence[Example]) -> list[Example]:
        """``examples`` ordered for micro-batching (:func:`~abmll.inner.length_order` with
        ``meta.group_by_length``; as given otherwise), for a sum over them: a loss or a gradient."""
        return [examples[i] for i in self.batch_order(examples)]

    def batch_order(self, examples: Sequence[Example]) -> list[int]:
        """The indices of ``examples`` in the order their micro-batches take them (:meth:`grouped`)."""
        return length_order(examples) if self.config.meta.group_by_length else list(range(len(examples)))

    def posterior_kl(self, adapted: Any) -> float | None:
        """KL(q_φ ‖ p_θ) of a task's adapted state (eq. 5): how far the task moved the posterior from the prior;
        None for a method without a Bayesian posterior."""
        return None

    def finite_or_skip(self, loss: float, grad_norm: float) -> bool:
        """The NaN/Inf guard, called before each optimiser step: True when ``loss`` and ``grad_norm`` are
        finite. Otherwise raise :class:`NonFiniteError` (``meta.nonfinite = "stop"``, θ untouched), or count
        a skipped step and return False (``"skip"``): the caller then leaves θ and the optimiser as they are."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return True
        if self.config.meta.nonfinite != "skip":
            raise NonFiniteError(
                f"meta-step {self.step + 1}: the outer loss is {loss} and the gradient norm of θ is {grad_norm}; "
                f"training stopped with θ as it was after meta-step {self.step} (meta.nonfinite = 'stop'). "
                "Lower meta.outer_lr or inner.inner_lr, or set meta.nonfinite=skip to skip such steps"
            )
        self.skipped_steps += 1
        return False

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"method '{self.name}' has no trained weights to load")

    def trainer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-serialisable values) needed to resume meta-training."""
        return {}, {"step": self.step}

    def load_trainer_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.step = int(values.get("step", 0))
