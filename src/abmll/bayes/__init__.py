"""Adapter layers (Bayesian and deterministic LoRA) and their injection into a Hugging Face model."""

from abmll.bayes.inject import (
    adapters_disabled,
    bayes_layers,
    clone_factors,
    inject,
    is_bayesian,
    posterior,
    prior,
    unwrap,
    weight_sample,
)
from abmll.bayes.layer import FACTORS, BayesLoRALinear, LoRALinear

__all__ = [
    "FACTORS",
    "BayesLoRALinear",
    "LoRALinear",
    "adapters_disabled",
    "bayes_layers",
    "clone_factors",
    "inject",
    "is_bayesian",
    "posterior",
    "prior",
    "unwrap",
    "weight_sample",
]
