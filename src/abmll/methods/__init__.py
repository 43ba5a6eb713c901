"""Training algorithms behind one interface (:class:`Method`): ABMLL and the baselines of METHOD.md section 6."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from abmll.bayes.inject import bayes_layers, inject
from abmll.config import ABMLLConfig
from abmll.errors import ConfigError
from abmll.methods.abmll import ABMLL
from abmll.methods.abmll_icl import ABMLLICL
from abmll.methods.base import MetaBatches, Method
from abmll.methods.icl import ICL
from abmll.methods.lora import LoRA, StructuredLoRA
from abmll.methods.lora_task import LoRATask
from abmll.methods.maml import MAML
from abmll.methods.reptile import Reptile
from abmll.methods.zero_shot import ZeroShot

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (ZeroShot, ICL, LoRA, LoRATask, StructuredLoRA, Reptile, MAML, ABMLL, ABMLLICL)
}
#: Methods that run on the base model alone, with no adapter layers.
BASE_ONLY = {ZeroShot.name, ICL.name}


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
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    default = ABMLLConfig()
    return {
        key: value
        for key, value in METHODS[name].default_overrides.items()
        if _get(config, key) == _get(default, key) and _get(config, key) != value
    }


def method_config(name: str, config: ABMLLConfig) -> ABMLLConfig:
    """``config`` with the method's own preset applied (:func:`method_overrides`), e.g. second-order
    gradients for ``maml``."""
    return config.override(method_overrides(name, config))


def create_method(name: str, model: nn.Module, scorer, config: ABMLLConfig) -> Method:
    """The method ``name`` on ``model``, injecting Bayesian LoRA layers (θ seeded by ``config.seed``) when the
    method needs them and the model has none yet. The config is used as given (see :func:`method_config`)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    if name not in BASE_ONLY and not bayes_layers(model):
        inject(model, config.lora, generator=torch.Generator().manual_seed(config.seed))
    return METHODS[name](model, scorer, config)


__all__ = [
    "ABMLL", "ABMLLICL", "BASE_ONLY", "ICL", "MAML", "METHODS", "LoRA", "LoRATask", "MetaBatches", "Method",
    "Reptile", "StructuredLoRA", "ZeroShot", "create_method", "method_config", "method_overrides",
]
