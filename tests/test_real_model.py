"""Slow tests on the real SmolLM2-135M-Instruct (fetched from PyPI by ``abmll fetch``)."""

from __future__ import annotations

import math

import pytest
import torch

from abmll.config import ABMLLConfig
from abmll.methods import create_method
from abmll.scoring import Scorer
from abmll.tasks.data import Episode, Example

pytestmark = pytest.mark.slow

QUESTIONS = [
    ("Question: What do bees make?\nAnswer:", ("honey", "steel", "glass"), 0),
    ("Question: Which animal barks?\nAnswer:", ("a cat", "a dog", "a fish"), 1),
    ("Question: What falls from clouds when it rains?\nAnswer:", ("sand", "water", "fire"), 1),
    ("Question: Where do fish live?\nAnswer:", ("in water", "in trees", "in the sky"), 0),
    ("Question: What do we use to see?\nAnswer:", ("ears", "eyes", "feet"), 1),
    ("Question: What season is the coldest?\nAnswer:", ("summer", "spring", "winter"), 2),
]


def test_a_meta_step_on_smollm2_has_a_finite_loss(smollm2):
    model, tokenizer = smollm2
    config = ABMLLConfig().override(
        {"inner.inner_steps": 1, "meta.meta_batch_size": 1, "meta.micro_batch_size": 3, "seed": 0}
    )
    method = create_method("abmll", model, Scorer(tokenizer, config.scoring), config)
    examples = [Example(q, o, g, id=str(i)) for i, (q, o, g) in enumerate(QUESTIONS)]
    before = {k: v.detach().clone() for k, v in method.theta.items()}
    record = method.meta_step([Episode("smoke", examples[:3], examples[3:])])
    assert math.isfinite(record["outer_nll"]) and math.isfinite(record["kl"]) and record["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in method.theta.items())
    assert len(method.layers) == 2 * 30  # q_proj and v_proj of all 30 blocks
