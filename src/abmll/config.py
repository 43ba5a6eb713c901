"""Configuration of abmll: dataclasses with help metadata, validation, presets, JSON/YAML load and save.

Every field carries ``metadata={"help": ...}``; ``__post_init__`` rejects a bad value with a sentence that
names the field, the value and what is allowed (raised as :class:`ConfigError`).

About 610 lines on purpose: every setting of the library, with its help text and validation, is in one place
(a method's own settings live with the method and are registered here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abmll.errors import ConfigError

SIGMA_TRANSFORMS = ("abs", "softplus", "exp")
GRADIENT_ORDERS = ("first_order", "straight_through_kl", "second_order")
OUTER_DATA = ("query", "support+query")
SCORERS = ("option", "label")
LENGTH_NORMS = ("none", "token", "char")
LIKELIHOODS = ("options", "lm")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "4bit", "8bit")
NONFINITE = ("stop", "skip")
PREDICT_MODES = ("sample", "mean")
#: The fields that only adaptation to an unseen task and its posterior predictive read (K_test, its α, S, the
#: predictive's mode); meta-training reads them only to score its meta-validation. ``abmll compare
#: --theta-from`` lets them differ from those of the θ it loads, so that test-time ablations share one θ.
TEST_TIME_FIELDS = ("inner.test_inner_steps", "inner.test_inner_lr", "predict.samples", "predict.mode")


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{name}' = {value!r} is invalid: expected {allowed}")


def is_int(value: Any, low: int) -> bool:
    """An integer (not a bool) ≥ ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_number(value: Any, low: float = -math.inf, strict: bool = False) -> bool:
    """A finite real number (not a bool) ≥ ``low``, or > ``low`` with ``strict``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and (number > low if strict else number >= low)


@dataclass
class BayesLoRAConfig:
    """Where the Bayesian LoRA layers go and how μ and σ are parameterised (METHOD.md section 1)."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r of every factor pair."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the mean is scaled by s = alpha / r."})
    targets: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={
            "help": "Modules to adapt: a list of module-name suffixes (e.g. q_proj), a string 're:PATTERN' "
            "matched against the full module name, or 'all-linear' (every linear layer but the LM head)."
        },
    )
    sigma_transform: str = field(
        default="exp",
        metadata={
            "help": "g in σ = e^λ · g(B_σ A_σ + o) + c: 'exp' (log-σ, ABML's choice: σ moves by relative amounts), "
            "'abs' (paper-literal; no gradient where B_σ A_σ + o = 0) or 'softplus' (its gradient is scaled by σ "
            "itself far in its left tail)."
        },
    )
    sigma_floor: float = field(default=1e-8, metadata={"help": "c: floor added to every entry of σ."})
    sigma_init: float = field(
        default=1e-3, metadata={"help": "σ of every entry at initialisation (must be ≥ sigma_floor)."}
    )
    sigma_max: float | None = field(
        default=1.0,
        metadata={
            "help": "σ_max: a smooth upper bound on every entry of σ, σ = (1/σ' + 1/σ_max)⁻¹ + c with σ' = e^λ · g(·) "
            "(eq. 2b; null: unbounded). Where the expected NLL is flat in an entry, nothing else stops σθ there "
            "from drifting without end (docs/METHOD.md §8)."
        },
    )
    layers: int | None = field(
        default=None,
        metadata={
            "help": "Adapt the target modules of the top N decoder blocks only (null: of every block). Nothing below "
            "the lowest adapted block needs a backward pass."
        },
    )

    def __post_init__(self) -> None:
        check(is_int(self.rank, 1), "lora.rank", self.rank, "an integer ≥ 1")
        check(is_number(self.alpha, 0, strict=True), "lora.alpha", self.alpha, "a finite number > 0")
        check(
            self.sigma_transform in SIGMA_TRANSFORMS,
            "lora.sigma_transform",
            self.sigma_transform,
            f"one of {SIGMA_TRANSFORMS}",
        )
        check(
            is_number(self.sigma_floor, 0, strict=True),
            "lora.sigma_floor",
            self.sigma_floor,
            "a finite number > 0",
        )
        check(
            is_number(self.sigma_init, self.sigma_floor),
            "lora.sigma_init",
            self.sigma_init,
            f"a finite number ≥ sigma_floor ({self.sigma_floor})",
        )
        if self.sigma_transform in ("softplus", "exp"):
            check(
                self.sigma_init > self.sigma_floor,
                "lora.sigma_init",
                self.sigma_init,
                f"a number > sigma_floor ({self.sigma_floor}) with sigma_transform '{self.sigma_transform}'",
            )
        if self.sigma_max is not None:
            check(
                is_number(self.sigma_max, self.sigma_init, strict=True),
                "lora.sigma_max",
                self.sigma_max,
                f"a finite number > sigma_init ({self.sigma_init}), or null",
            )
        if self.layers is not None:
            check(is_int(self.layers, 1), "lora.layers", self.layers, "an integer ≥ 1 or null")
        if isinstance(self.targets, str):
            check(
                self.targets == "all-linear" or self.targets.startswith("re:"),
                "lora.targets",
                self.targets,
                "a list of module names, 're:PATTERN' or 'all-linear'",
            )
            if self.targets.startswith("re:"):
                try:
                    re.compile(self.targets[3:])
                except re.error as exc:
                    check(False, "lora.targets", self.targets, f"a valid regular expression after 're:' ({exc})")
        else:
            check(
                isinstance(self.targets, list)
                and len(self.targets) > 0
                and all(isinstance(t, str) and t for t in self.targets),
                "lora.targets",
                self.targets,
                "a non-empty list of module names",
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def sigma_offset(self) -> float:
        """o = g⁻¹(σ'₀) with σ'₀ = σ_init − c, or (eq. 2b) σ'₀ = (1/(σ_init − c) − 1/σ_max)⁻¹, so that σ = σ_init
        when B_σ = 0 and λ = 0."""
        target = self.sigma_init - self.sigma_floor
        if self.sigma_max is not None and target > 0:
            target = 1.0 / (1.0 / target - 1.0 / self.sigma_max)
        if self.sigma_transform == "abs":
            return target
        if self.sigma_transform == "exp":
            return math.log(target)
        return target + math.log(-math.expm1(-target))  # softplus⁻¹(y) = y + log(1 − e^−y)


@dataclass
class ObjectiveConfig:
    """Weights of the tempered ELBO and the hyperprior (METHOD.md section 3)."""

    beta: float = field(
        default=1e-6, metadata={"help": "β: weight of KL(q_φ ‖ p_θ) in the inner and outer loss."}
    )
    gamma: float | None = field(
        default=0.0,
        metadata={
            "help": "γ: weight of −log p(θ). None uses β (the paper's v2 form: one β on both terms). The default 0 "
            "leaves the hyperprior out: with a0 = 1 its gradient only pushes σθ up, and on SmolLM2 it came to "
            "dominate θ's clipped gradient within a few meta-steps (see README)."
        },
    )
    gamma_a0: float = field(default=1.0, metadata={"help": "a0: Gamma shape of the precision hyperprior."})
    gamma_b0: float = field(default=0.01, metadata={"help": "b0: Gamma rate of the precision hyperprior."})
    mean_prior_std: float | None = field(
        default=None,
        metadata={"help": "Std of an optional Normal(0, s²) hyperprior on μθ; None disables it."},
    )

    def __post_init__(self) -> None:
        check(
            is_number(self.beta, 0), "objective.beta", self.beta, "a finite number ≥ 0"
        )
        if self.gamma is not None:
            check(
                is_number(self.gamma, 0),
                "objective.gamma",
                self.gamma,
                "a finite number ≥ 0",
            )
        check(is_number(self.gamma_a0, 0, strict=True), "objective.gamma_a0", self.gamma_a0, "a finite number > 0")
        check(is_number(self.gamma_b0, 0, strict=True), "objective.gamma_b0", self.gamma_b0, "a finite number > 0")
        if self.mean_prior_std is not None:
            check(
                is_number(self.mean_prior_std, 0, strict=True),
                "objective.mean_prior_std",
                self.mean_prior_std,
                "a number > 0 or null",
            )

    @property
    def hyperprior_weight(self) -> float:
        return self.beta if self.gamma is None else self.gamma


@dataclass
class InnerConfig:
    """Amortised inference: K SGD steps from θ on the support set (METHOD.md section 3, inner loop)."""

    inner_steps: int = field(default=5, metadata={"help": "K: SGD steps from θ during meta-training."})
    test_inner_steps: int = field(
        default=10, metadata={"help": "K_test: SGD steps from θ on an unseen task."}
    )
    inner_lr: float = field(default=0.1, metadata={"help": "α: inner-loop SGD learning rate of the mean factors."})
    sigma_lr: float | None = field(
        default=10.0,
        metadata={
            "help": "α_σ: inner-loop SGD learning rate of the σ factors (B_σ, A_σ, λ). The likelihood's gradient on "
            "log σ scales with σ, so at a useful σ (1e-3) the mean's α leaves σ where it is; null uses α."
        },
    )
    test_inner_lr: float | None = field(
        default=None,
        metadata={"help": "α at test time (K_test steps on an unseen task's support set); null uses inner_lr."},
    )
    inner_samples: int = field(
        default=1, metadata={"help": "Weight samples ε averaged in each inner step's Monte Carlo estimate."}
    )
    backtrack: float | None = field(
        default=1.25,
        metadata={
            "help": "An inner step after which the support loss is not finite or more than this many times the loss "
            "before it is taken again at half the step sizes, which stay halved for the rest of the loop (eq. 7c); "
            "null never undoes a step. The KL's curvature β/σθ² makes plain SGD diverge where σθ is small."
        },
    )
    order: str = field(
        default="first_order",
        metadata={
            "help": "Gradient of the outer loss to θ: 'first_order' (the likelihood straight through φᴷ, the KL and "
            "hyperprior by their direct partials at φᴷ: the empirical-Bayes gradient), 'straight_through_kl' (the "
            "KL's φ-gradient straight through as well, which cancels its pull on μθ; for ablation) or "
            "'second_order' (through the K inner steps)."
        },
    )

    def __post_init__(self) -> None:
        check(
            is_int(self.inner_steps, 0),
            "inner.inner_steps",
            self.inner_steps,
            "an integer ≥ 0",
        )
        if self.backtrack is not None:
            check(is_number(self.backtrack, 1, strict=True), "inner.backtrack", self.backtrack, "a number > 1 or null")
        check(
            is_int(self.test_inner_steps, 0),
            "inner.test_inner_steps",
            self.test_inner_steps,
            "an integer ≥ 0",
        )
        check(
            is_number(self.inner_lr, 0, strict=True),
            "inner.inner_lr",
            self.inner_lr,
            "a finite number > 0",
        )
        for name in ("sigma_lr", "test_inner_lr"):
            value = getattr(self, name)
            if value is not None:
                check(is_number(value, 0, strict=True), f"inner.{name}", value, "a finite number > 0 or null")
        check(
            is_int(self.inner_samples, 1),
            "inner.inner_samples",
            self.inner_samples,
            "an integer ≥ 1",
        )
        check(self.order in GRADIENT_ORDERS, "inner.order", self.order, f"one of {GRADIENT_ORDERS}")


@dataclass
class MetaConfig:
    """The outer loop over meta-batches of tasks (METHOD.md section 3, outer loop)."""

    meta_steps: int = field(default=100, metadata={"help": "Number of outer (meta) optimiser steps."})
    meta_batch_size: int = field(default=4, metadata={"help": "T: tasks per meta-batch."})
    outer_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate on θ's mean factors."})
    sigma_lr: float | None = field(
        default=1e-2,
        metadata={
            "help": "AdamW learning rate on θ's σ factors (B_σ, A_σ, λ); null uses outer_lr. AdamW moves λ = log σ by "
            "about this much per meta-step."
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on θ."})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip θ's gradient norm; None disables."}
    )
    outer_data: str = field(
        default="query",
        metadata={"help": "Data of the outer likelihood: 'query' (default) or 'support+query' (ABML)."},
    )
    micro_batch_size: int = field(
        default=8, metadata={"help": "Examples per forward pass; larger sets are processed in chunks."}
    )
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "Order a set's examples by length before cutting it into micro-batches, so that each pads to "
            "similar lengths (same losses, gradients and predictions within float rounding); false: as given."
        },
    )
    support_size: int = field(default=16, metadata={"help": "k: support examples per meta-training episode."})
    query_size: int = field(default=16, metadata={"help": "Query examples per meta-training episode."})
    checkpoint_every: int = field(default=50, metadata={"help": "Save a checkpoint every N meta-steps."})
    validate_every: int | None = field(
        default=None,
        metadata={
            "help": "Every N meta-steps (and after the last), adapt to the meta-validation episodes and log their mean "
            "query NLL and the mean σθ; null: never. Needs meta-validation ('dev') tasks."
        },
    )
    validation_query_size: int = field(
        default=32, metadata={"help": "Query examples of each meta-validation episode (one per 'dev' task)."}
    )
    patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many validations in a row without a lower meta-validation NLL, and keep the θ "
            "of the best validation as the final θ; null: run every meta-step."
        },
    )
    nonfinite: str = field(
        default="stop",
        metadata={
            "help": "On a NaN or infinite outer loss or gradient of θ: 'stop' (raise, leaving θ and the last "
            "checkpoint as they were) or 'skip' (leave θ unchanged for that meta-step and count it in the log)."
        },
    )

    def __post_init__(self) -> None:
        for name in (
            "meta_steps", "meta_batch_size", "micro_batch_size", "support_size", "query_size", "checkpoint_every",
            "validation_query_size",
        ):
            value = getattr(self, name)
            low = 0 if name == "meta_steps" else 1
            check(is_int(value, low), f"meta.{name}", value, f"an integer ≥ {low}")
        check(isinstance(self.group_by_length, bool), "meta.group_by_length", self.group_by_length, "true or false")
        check(
            is_number(self.outer_lr, 0, strict=True), "meta.outer_lr", self.outer_lr, "a finite number > 0"
        )
        if self.sigma_lr is not None:
            allowed = "a finite number > 0 or null"
            check(is_number(self.sigma_lr, 0, strict=True), "meta.sigma_lr", self.sigma_lr, allowed)
        check(is_number(self.weight_decay, 0), "meta.weight_decay", self.weight_decay, "a finite number ≥ 0")
        if self.max_grad_norm is not None:
            check(
                is_number(self.max_grad_norm, 0, strict=True),
                "meta.max_grad_norm",
                self.max_grad_norm,
                "a finite number > 0 or null",
            )
        for name in ("validate_every", "patience"):
            value = getattr(self, name)
            if value is not None:
                check(is_int(value, 1), f"meta.{name}", value, "an integer ≥ 1 or null")
        if self.patience is not None:
            allowed = "null unless meta.validate_every is set"
            check(self.validate_every is not None, "meta.patience", self.patience, allowed)
        check(self.outer_data in OUTER_DATA, "meta.outer_data", self.outer_data, f"one of {OUTER_DATA}")
        check(self.nonfinite in NONFINITE, "meta.nonfinite", self.nonfinite, f"one of {NONFINITE}")


@dataclass
class ScoringConfig:
    """How text tasks become option log-probabilities (METHOD.md section 4)."""

    scorer: str = field(
        default="option", metadata={"help": "'option' (continuation log-likelihood) or 'label'."}
    )
    length_norm: str = field(
        default="none",
        metadata={"help": "Option scorer only: 'none' (sum), 'token' (per token) or 'char' (per character)."},
    )
    likelihood: str = field(
        default="options",
        metadata={"help": "Training NLL: 'options' (cross-entropy over options) or 'lm' (gold token NLL)."},
    )
    max_length: int = field(
        default=8192,
        metadata={
            "help": "Longest sequence; prompts are cut from the left, ICL drops its oldest demonstrations "
            "(with a warning naming the task). 8192: SmolLM2's context, room for 16 demonstrations of the "
            "built-in tasks but those with long passages; lower it for a model with a shorter context."
        },
    )
    shared_prefix: bool = field(
        default=True,
        metadata={
            "help": "Encode each prompt once and score its options from its key/value cache (same scores "
            "within float rounding); false: one whole sequence per option."
        },
    )
    trunk_cache_mb: int = field(
        default=1024,
        metadata={
            "help": "With adapters on the top blocks only (lora.layers): RAM in MiB for the hidden states entering "
            "the lowest adapted block, recorded per prompt and option; a call whose prompts and options are all "
            "recorded runs only the adapted blocks (same scores within float rounding); 0: off."
        },
    )

    def __post_init__(self) -> None:
        check(self.scorer in SCORERS, "scoring.scorer", self.scorer, f"one of {SCORERS}")
        check(isinstance(self.shared_prefix, bool), "scoring.shared_prefix", self.shared_prefix, "true or false")
        check(is_int(self.trunk_cache_mb, 0), "scoring.trunk_cache_mb", self.trunk_cache_mb, "an integer ≥ 0")
        check(
            self.length_norm in LENGTH_NORMS,
            "scoring.length_norm",
            self.length_norm,
            f"one of {LENGTH_NORMS}",
        )
        check(self.likelihood in LIKELIHOODS, "scoring.likelihood", self.likelihood, f"one of {LIKELIHOODS}")
        check(
            is_int(self.max_length, 8),
            "scoring.max_length",
            self.max_length,
            "an integer ≥ 8",
        )


@dataclass
class PredictConfig:
    """The posterior predictive at test time (METHOD.md section 3, test time)."""

    samples: int = field(
        default=8, metadata={"help": "S: posterior samples averaged (probabilities, not logits)."}
    )
    mode: str = field(
        default="sample", metadata={"help": "'sample' (average S samples) or 'mean' (ΔW = μφ)."}
    )

    def __post_init__(self) -> None:
        check(
            is_int(self.samples, 1),
            "predict.samples",
            self.samples,
            "an integer ≥ 1",
        )
        check(self.mode in PREDICT_MODES, "predict.mode", self.mode, f"one of {PREDICT_MODES}")


@dataclass
class ComputeConfig:
    """Numerical precision and memory of the base model's forward and backward passes (docs/SCALING.md).

    Whatever ``dtype`` is, θ (the optimiser's master weights), the task posteriors φ, the σ transform, the
    weight samples ε, the KL and the hyperprior stay in float32; only the frozen base model and the adapter's
    matrix products run in ``dtype``."""

    dtype: str = field(
        default="float32",
        metadata={"help": "Dtype of the frozen base model and the activations: 'float32', 'bfloat16' or 'float16'."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute each decoder layer's activations in the backward pass (less memory, slower)."},
    )
    merge_without_grad: bool = field(
        default=True,
        metadata={
            "help": "At prediction with weight samples (no gradients), run each adapted linear layer as one product "
            "with W0 + ΔW, formed once per posterior and sample (equal within float rounding; one dense weight per "
            "adapted layer held meanwhile); false: the base product plus the update's two."
        },
    )
    quantization: str = field(
        default="none",
        metadata={
            "help": "Base linear layers quantised by bitsandbytes on load: 'none', '4bit' (NF4) or '8bit' "
            "(CUDA GPUs with the bitsandbytes package only)."
        },
    )

    def __post_init__(self) -> None:
        check(self.dtype in COMPUTE_DTYPES, "compute.dtype", self.dtype, f"one of {COMPUTE_DTYPES}")
        check(
            isinstance(self.gradient_checkpointing, bool),
            "compute.gradient_checkpointing",
            self.gradient_checkpointing,
            "true or false",
        )
        check(
            isinstance(self.merge_without_grad, bool),
            "compute.merge_without_grad",
            self.merge_without_grad,
            "true or false",
        )
        check(
            self.quantization in QUANTIZATIONS,
            "compute.quantization",
            self.quantization,
            f"one of {QUANTIZATIONS}",
        )


@dataclass
class ABMLLConfig:
    """Everything that defines an ABMLL run. ``seed`` seeds initialisation, task sampling and ε."""

    lora: BayesLoRAConfig = field(default_factory=BayesLoRAConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    seed: int = field(
        default=0, metadata={"help": "Seed of initialisation, task sampling and weight samples."}
    )
    #: Each registered method's own settings (:data:`METHOD_SETTINGS`), by method name: in a config file and in
    #: dotted overrides they are top-level sections named after the method (``reptile.epsilon``).
    methods: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check(is_int(self.seed, 0), "seed", self.seed, "an integer ≥ 0")
        self.methods = {name: self.methods.get(name) or cls() for name, cls in METHOD_SETTINGS.items()}

    def section(self, name: str) -> Any:
        """The settings of the method ``name`` (its registered dataclass, at its defaults unless set)."""
        if name not in self.methods and name in METHOD_SETTINGS:  # registered after this config was made
            self.methods[name] = METHOD_SETTINGS[name]()
        try:
            return self.methods[name]
        except KeyError:
            raise ConfigError(f"no config section '{name}'; method sections: {sorted(METHOD_SETTINGS)}") from None

    def __getattr__(self, name: str) -> Any:
        # config.reptile.epsilon: a method's section read as an attribute.
        if name.startswith("_") or name not in METHOD_SETTINGS:
            raise AttributeError(name)
        return self.section(name)

    # --- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "methods"}
        data = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in data.items()}
        seed = data.pop("seed")
        data.update({name: dataclasses.asdict(self.section(name)) for name in METHOD_SETTINGS})
        return {**data, "seed": seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ABMLLConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of config sections, got {type(data).__name__}")
        groups = [f.name for f in dataclasses.fields(cls) if f.name != "methods"] + list(METHOD_SETTINGS)
        unknown = sorted(set(data) - set(groups), key=repr)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {unknown}; allowed: {sorted(groups)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            sub = _section_types().get(name)
            if sub is None:
                kwargs[name] = value
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config section '{name}' must be a mapping, got {value!r}")
            allowed = {f.name for f in dataclasses.fields(sub)}
            bad = sorted(set(value) - allowed, key=repr)
            if bad:
                raise ConfigError(
                    f"{source}: unknown field(s) {bad} in section '{name}'; allowed: {sorted(allowed)}"
                )
            if name in METHOD_SETTINGS:
                kwargs.setdefault("methods", {})[name] = _build(sub, value, source)
            else:
                kwargs[name] = _build(sub, value, source)
        return _build(cls, kwargs, source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ABMLLConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist or is not a file")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error is reported with the file name
            raise ConfigError(f"config file {path} could not be parsed: {exc}") from None
        return cls.from_dict(data, source=str(path))

    def override(self, dotted: dict[str, Any]) -> ABMLLConfig:
        """A copy with ``{"inner.inner_steps": 3, "seed": 1}``-style overrides applied and validated."""
        data = self.to_dict()
        for key, value in dotted.items():
            if not isinstance(key, str):
                raise ConfigError(f"config field name {key!r} is invalid: expected a string such as 'meta.outer_lr'")
            parts = key.split(".")
            node = data
            for part in parts[:-1]:
                if part not in node or not isinstance(node[part], dict):
                    raise ConfigError(f"unknown config field '{key}'")
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(f"unknown config field '{key}'")
            if isinstance(node[parts[-1]], dict) and not isinstance(value, dict):
                example = f"{key}.{next(iter(node[parts[-1]]), 'FIELD')}"
                raise ConfigError(f"config field '{key}' is a section, not a value: set its fields, e.g. '{example}'")
            node[parts[-1]] = value
        return ABMLLConfig.from_dict(data)


def _build(cls: type, values: dict[str, Any], source: str) -> Any:
    """``cls(**values)``; a validation error names ``source`` (the file) unless it is the default 'config'."""
    try:
        return cls(**values)
    except ConfigError as exc:
        if source == "config":
            raise
        raise ConfigError(f"{source}: {exc}") from None


def _section_types() -> dict[str, type]:
    return {
        "lora": BayesLoRAConfig,
        "objective": ObjectiveConfig,
        "inner": InnerConfig,
        "meta": MetaConfig,
        "scoring": ScoringConfig,
        "predict": PredictConfig,
        "compute": ComputeConfig,
        **METHOD_SETTINGS,
    }


#: The settings dataclass of each method that has its own (e.g. Reptile's ε), by method name; filled by
#: :func:`register_settings` (:func:`abmll.methods.register` calls it with the method's ``settings``). Each is a
#: config section of that name. Its fields carry ``metadata={"help": ...}`` and its ``__post_init__`` validates
#: them with :func:`check`, :func:`is_int` and :func:`is_number` (naming the field as ``section.field``).
METHOD_SETTINGS: dict[str, type] = {}


def register_settings(name: str, settings: type) -> None:
    """Make ``settings`` (a dataclass whose fields all have defaults) the config section ``name``."""
    core = [f.name for f in dataclasses.fields(ABMLLConfig)]
    if name in core or not dataclasses.is_dataclass(settings):
        raise ConfigError(f"cannot register config section {name!r}: the name is taken or {settings!r} is no dataclass")
    METHOD_SETTINGS[name] = settings



#: The paper's settings (METHOD.md section 3) made runnable. v1: β on the task KL and γ on the hyperprior;
#: v2: one β on both terms; both with the paper-literal σ = |B_σ A_σ| + c, c = e^-20, and K = 10 steps at test
#: time. The paper's σ_init = c cannot train: |x| has no gradient at B_σ A_σ = 0, and the KL's curvature in μφ,
#: β/σθ² = 1e8 (v1) to 2e10 (v2), makes any inner SGD step diverge. The presets start σ at 1e-3 (the nearest
#: runnable form; docs/METHOD.md, "Deviations").
PAPER_SIGMA_INIT = 1e-3
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper-v1": {
        "lora.sigma_transform": "abs",
        "lora.sigma_floor": math.exp(-20),
        "lora.sigma_init": PAPER_SIGMA_INIT,
        "inner.sigma_lr": None,  # σ is not on a log scale under abs: the mean's step sizes
        "meta.sigma_lr": None,
        "objective.beta": 5e-10,
        "objective.gamma": 1e-6,
        "inner.test_inner_steps": 10,
    },
    "paper-v2": {
        "lora.sigma_transform": "abs",
        "lora.sigma_floor": math.exp(-20),
        "lora.sigma_init": PAPER_SIGMA_INIT,
        "inner.sigma_lr": None,
        "meta.sigma_lr": None,
        "objective.beta": 1e-7,
        "objective.gamma": None,
        "inner.test_inner_steps": 10,
    },
}


def preset(name: str) -> ABMLLConfig:
    """The config of a named preset: ``default``, ``paper-v1`` or ``paper-v2``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; available: {sorted(PRESETS)}")
    return ABMLLConfig().override(PRESETS[name])
