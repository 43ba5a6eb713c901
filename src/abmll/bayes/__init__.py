"""Bayesian LoRA layers and their injection into a Hugging Face model."""

from abmll.bayes.inject import (
    adapters_disabled,
    bayes_layers,
    clone_factors,
    inject,
    posterior,
    prior,
    unwrap,
    weight_sample,
)
from abmll.bayes.layer import FACTORS, BayesLoRALinear

__all__ = [
    "FACTORS",
    "BayesLoRALinear",
    "adapters_disabled",
    "bayes_layers",
    "clone_factors",
    "inject",
    "posterior",
    "prior",
    "unwrap",
    "weight_sample",
]
