"""Training algorithms behind one interface (:class:`Method`)."""

from __future__ import annotations

import torch
from torch import nn

from abmll.bayes.inject import bayes_layers, inject
from abmll.config import ABMLLConfig
from abmll.errors import ConfigError
from abmll.methods.abmll import ABMLL
from abmll.methods.base import MetaBatches, Method
from abmll.methods.lora import LoRA, StructuredLoRA
from abmll.methods.zero_shot import ZeroShot

METHODS: dict[str, type[Method]] = {m.name: m for m in (ZeroShot, LoRA, StructuredLoRA, ABMLL)}
#: Methods that run on the base model alone, with no adapter layers.
BASE_ONLY = {ZeroShot.name}


def create_method(name: str, model: nn.Module, scorer, config: ABMLLConfig) -> Method:
    """The method ``name`` on ``model``, injecting Bayesian LoRA layers (θ seeded by ``config.seed``) when the
    method needs them and the model has none yet."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    if name not in BASE_ONLY and not bayes_layers(model):
        inject(model, config.lora, generator=torch.Generator().manual_seed(config.seed))
    return METHODS[name](model, scorer, config)


__all__ = [
    "ABMLL", "BASE_ONLY", "METHODS", "LoRA", "MetaBatches", "Method", "StructuredLoRA", "ZeroShot", "create_method"
]
