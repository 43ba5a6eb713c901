"""Adding a method is one file and one registry line: a toy method (``tests/toy_method.py``) registered here runs
through ``abmll train``, ``evaluate``, ``compare`` and ``plan`` with nothing else changed; the template's shared
meta-step gives what the method's own update says."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import comparison_folder, invoke, make_config, ok
from toy_method import FixedStepMAML

from abmll.checkpoint import load_checkpoint
from abmll.config import METHOD_SETTINGS, ABMLLConfig
from abmll.methods import METHODS, create_method, register
from abmll.scoring import Scorer
from abmll.tasks.data import Episode
from abmll.tiny import tiny_llama


@pytest.fixture
def toy():
    register(FixedStepMAML)  # the one registry line
    yield FixedStepMAML.name
    METHODS.pop(FixedStepMAML.name)
    METHOD_SETTINGS.pop(FixedStepMAML.name)


def test_a_registered_method_gets_its_config_section_and_the_templates_update(toy, toy_examples):
    config = make_config(**{"fixed-step-maml.epsilon": 0.5, "meta.max_grad_norm": None})
    assert config.section(toy).epsilon == 0.5 and "fixed-step-maml" in config.to_dict()
    assert ABMLLConfig.from_dict(config.to_dict()).section(toy).epsilon == 0.5
    model, tokenizer = tiny_llama(seed=0)
    method = create_method(toy, model, Scorer(tokenizer, config.scoring), config)
    assert all(k.endswith(("mu_A", "mu_B")) for k in method.theta)  # deterministic: no σ factors
    before = {k: v.detach().clone() for k, v in method.theta.items()}
    episode = Episode("toy", toy_examples[:6], toy_examples[6:])
    log = method.meta_step([episode])
    grads = {k: p.grad for k, p in method.theta.items()}
    for key, p in method.theta.items():  # plain SGD at ε: θ ← θ − ε ∇θ
        torch.testing.assert_close(p.detach(), before[key] - 0.5 * grads[key])
    assert log.step == 1 and log.grad_norm > 0 and log.support_nll_last < log.support_nll_first


def test_a_registered_method_runs_through_train_evaluate_compare_and_plan(toy, tmp_path):
    root = comparison_folder(tmp_path)
    help_text = invoke("train", "--help").output
    assert "fixed-step-maml" in " ".join(help_text.split())
    common = ["--model", root / "tiny", "--data", root / "data", "--device", "cpu"]

    run = tmp_path / "run"
    ok(invoke("train", "--method", toy, "--out", run, "--setting", root / "setting.json", "--config",
              root / "fast.json", "--steps", 2, "--set", "fixed-step-maml.epsilon=0.2", *common))  # fmt: skip
    saved = load_checkpoint(run / "final")
    assert saved["info"]["method"] == toy and saved["config"].section(toy).epsilon == 0.2
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]

    ok(invoke("evaluate", "--checkpoint", run / "final", "--tasks", "unseen", "--k", 4, "--seeds", 100,
              "--out", tmp_path / "eval", *common))  # fmt: skip
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["method"] == toy

    ok(invoke("compare", "--methods", f"zero-shot,{toy}", "--preset", "smoke", "--setting", root / "setting.json",
              "--config", root / "fast.json", "--k", 4, "--out", tmp_path / "cmp", *common))  # fmt: skip
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert list(results["methods"]) == ["zero-shot", toy]
    assert f"`{toy}`: `fixed-step-maml.epsilon=0.05`" in (tmp_path / "cmp" / "report.md").read_text()

    tiny_config = tmp_path / "tiny-config"
    tiny_llama()[0].config.save_pretrained(tiny_config)
    planned = invoke("plan", "--model", tiny_config, "--method", toy, "--batch", 2, "--seq-len", 8, "--json")
    ok(planned)
    data = json.loads(planned.output)
    assert data["method"] == toy and data["peak"] > data["persistent"] > 0
    bayesian = json.loads(invoke("plan", "--model", tiny_config, "--batch", 2, "--seq-len", 8, "--json").output)
    # the toy's deterministic LoRA holds the mean factors only; ABMLL's as many σ factors and a λ per layer
    assert bayesian["adapter_params"] == 2 * data["adapter_params"] + data["target_modules"]


def test_a_registered_method_gets_a_search_space_with_its_own_settings(toy):
    from abmll.tune import search_space

    space = search_space(toy)
    # the template's fields of a deterministic meta-learner, and the range its own ε declares
    assert {"inner.test_inner_lr", "inner.inner_lr", "meta.outer_lr"} <= set(space)
    assert not any(name.startswith(("objective.", "lora.sigma")) for name in space)
    assert (space["fixed-step-maml.epsilon"].low, space["fixed-step-maml.epsilon"].high) == (0.01, 0.5)
