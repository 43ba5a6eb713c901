"""Training algorithms behind one interface (:class:`Method`): ABMLL and the baselines of METHOD.md section 6.

The registry :data:`METHODS` names every method; :func:`register` adds one (its settings become a config
section of its name). The command line, the comparison, tuning and planning read the registry: a new method is
one module (a :class:`~abmll.methods.template.MetaLearner` subclass with a ``name``) and one :func:`register`
line.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from abmll.bayes.inject import bayes_layers, inject, is_bayesian
from abmll.config import ABMLLConfig, register_settings
from abmll.errors import ConfigError, ModelError
from abmll.methods.abmll import ABMLL
from abmll.methods.abmll_icl import ABMLLICL
from abmll.methods.base import MetaBatches, Method, StepLog
from abmll.methods.icl import ICL
from abmll.methods.lora import LoRA, StructuredLoRA
from abmll.methods.lora_task import LoRATask
from abmll.methods.maml import MAML
from abmll.methods.reptile import Reptile
from abmll.methods.template import MetaLearner, TaskStats
from abmll.methods.zero_shot import ZeroShot

#: Every method by name, in the order the command line and reports list them.
METHODS: dict[str, type[Method]] = {}


def register(method: type[Method]) -> type[Method]:
    """Add ``method`` to :data:`METHODS` under its ``name``, and its ``settings_type`` (if it declares one) as the
    config section of that name. Returns the class, so it can decorate one."""
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"cannot register {method!r}: a method needs a non-empty string 'name'")
    if name in METHODS and METHODS[name] is not method:
        raise ConfigError(f"cannot register {method.__qualname__}: the method name {name!r} is taken")
    if method.__dict__.get("settings_type") is not None:
        register_settings(name, method.settings_type)
    METHODS[name] = method
    return method


for _method in (ZeroShot, ICL, LoRA, LoRATask, StructuredLoRA, Reptile, MAML, ABMLL, ABMLLICL):
    register(_method)


def get_method(name: str) -> type[Method]:
    """The registered method ``name``; :class:`ConfigError` listing the registered ones otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def meta_learners() -> list[str]:
    """The registered methods that learn across tasks (what ``abmll train`` trains)."""
    return [name for name, cls in METHODS.items() if cls.meta_learns]


def _get(config: ABMLLConfig, dotted: str) -> Any:
    node: Any = config.to_dict()
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown config field '{dotted}'")
        node = node[part]
    return node


def method_overrides(name: str, config: ABMLLConfig) -> dict[str, Any]:
    """The method's :attr:`~Method.default_overrides` that apply to ``config``: those of fields it leaves at
    the library default (a field set to anything else is the caller's explicit choice and is kept)."""
    default = ABMLLConfig()
    return {
        key: value
        for key, value in get_method(name).default_overrides.items()
        if _get(config, key) == _get(default, key) and _get(config, key) != value
    }


def method_config(name: str, config: ABMLLConfig) -> ABMLLConfig:
    """``config`` with the method's own preset applied (:func:`method_overrides`)."""
    return config.override(method_overrides(name, config))


def create_method(name: str, model: nn.Module, scorer, config: ABMLLConfig) -> Method:
    """The method ``name`` on ``model``, injecting its adapter layers (Bayesian or deterministic, θ seeded by
    ``config.seed``) when the method needs them and the model has none yet. The config is used as given (see
    :func:`method_config`)."""
    cls = get_method(name)
    if cls.adapted and not bayes_layers(model):
        inject(model, config.lora, generator=torch.Generator().manual_seed(config.seed), bayesian=cls.bayesian)
    elif cls.adapted and cls.bayesian and not is_bayesian(model):
        raise ModelError(
            f"method '{name}' needs Bayesian LoRA layers, but the model has deterministic ones (injected for a "
            "deterministic method); load the model afresh"
        )
    return cls(model, scorer, config)


__all__ = [
    "ABMLL", "ABMLLICL", "ICL", "MAML", "METHODS", "LoRA", "LoRATask", "MetaBatches", "MetaLearner", "Method",
    "Reptile", "StepLog", "StructuredLoRA", "TaskStats", "ZeroShot", "create_method", "get_method",
    "meta_learners", "method_config", "method_overrides", "register",
]
