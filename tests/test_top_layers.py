"""``lora.layers``: adapt the top N decoder blocks only. The adapted modules are those of the top blocks; N = every
block is the all-block run bit for bit; the frozen blocks below the lowest adapted one run no backward pass; the
adapters learn; a target outside the blocks is one clear error."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from abmll.bayes import bayes_layers
from abmll.errors import ModelError
from abmll.methods import create_method
from abmll.scoring import Scorer
from abmll.tasks.data import Episode
from abmll.tiny import tiny_llama


def _method(**overrides):
    config = make_config(**overrides)
    model, tok = tiny_llama(seed=0)
    return create_method("abmll", model, Scorer(tok, config.scoring), config)


def test_top_blocks_are_adapted_and_every_block_is_the_default_bit_for_bit(toy_examples):
    top = _method(**{"lora.layers": 1})
    assert list(bayes_layers(top.model)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    episode = Episode("toy", toy_examples[:6], toy_examples[6:])
    runs = [_method(), _method(**{"lora.layers": 2}), _method(**{"lora.layers": 99})]
    for m in runs:
        m.meta_step([episode])
    for m in runs[1:]:
        assert list(m.theta) == list(runs[0].theta)
        assert all(torch.equal(m.theta[k], runs[0].theta[k]) for k in m.theta)


def test_no_backward_below_the_lowest_adapted_block_and_the_adapters_learn(toy_examples):
    method = _method(**{"lora.layers": 1, "meta.outer_lr": 0.05})
    blocks = method.model.model.layers
    needs_grad = []
    hooks = [b.register_forward_hook(lambda mod, inp, out, i=i: needs_grad.append((i, out[0].requires_grad)))
             for i, b in enumerate(blocks)]  # fmt: skip
    before = {k: v.detach().clone() for k, v in method.theta.items()}
    episode = Episode("toy", toy_examples[:6], toy_examples[6:])
    logs = [method.meta_step([episode]) for _ in range(3)]
    for h in hooks:
        h.remove()
    assert {req for i, req in needs_grad if i == 0} == {False}  # block 0's output never enters a backward pass
    assert True in {req for i, req in needs_grad if i == 1}
    assert any(not torch.equal(before[k], v) for k, v in method.theta.items())
    assert all(log.outer_nll == log.outer_nll for log in logs)


def test_a_target_outside_the_blocks_is_one_clear_error():
    with pytest.raises(ModelError, match="lora.layers = 1: target module 'lm_head' is not inside a decoder block"):
        _method(**{"lora.layers": 1, "lora.targets": ["q_proj", "lm_head"]})
