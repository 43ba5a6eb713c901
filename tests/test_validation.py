"""Meta-validation and early stopping (``meta.validate_every``, ``meta.patience``): the run validates on the
setting's 'dev' tasks at the steps it should and logs the loss and the mean σθ; it stops after ``patience``
validations without improvement and its final θ is the best validation's; a resumed run continues the count;
a setting without 'dev' tasks is one clear error."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAST, error_line, invoke, ok, save_tiny, write_families

import abmll.runner
from abmll.checkpoint import load_checkpoint
from abmll.validation import EarlyStopping

TRAIN, DEV = ["fam0", "fam1"], ["fam2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    save_tiny(root)
    write_families(root / "data", TRAIN + DEV, 24)
    (root / "setting.json").write_text(json.dumps({"train": TRAIN, "dev": DEV, "test": DEV}))
    (root / "no-dev.json").write_text(json.dumps({"train": TRAIN, "test": DEV}))
    (root / "fast.json").write_text(json.dumps(FAST))
    return root


def train(env, out, steps, *sets, setting="setting.json"):
    args = ["train", "--model", env / "tiny", "--data", env / "data", "--setting", env / setting, "--out", out,
            "--steps", steps, "--config", env / "fast.json", "--device", "cpu", "--set", "meta.validation_query_size=8"]
    for s in sets:
        args += ["--set", s]
    return invoke(*args)  # fmt: skip


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_validation_is_logged_every_n_steps_and_after_the_last(env, tmp_path):
    out = tmp_path / "run"
    ok(train(env, out, 5, "meta.validate_every=2"))
    checked = {r["step"]: r["validation"] for r in log(out) if "validation" in r}
    assert sorted(checked) == [2, 4, 5]
    for v in checked.values():
        assert math.isfinite(v["dev_nll"]) and v["dev_nll"] > 0 and v["sigma_theta"] > 0
    assert not (out / "best").exists()  # without patience nothing is kept apart: the final θ is the last one


def test_early_stopping_keeps_the_best_theta_and_stops_after_patience(env, tmp_path, monkeypatch):
    losses = iter([1.0, 0.5, 0.7, 0.8, 0.9, 1.0])  # best at the 2nd validation (step 4), then worse twice

    monkeypatch.setattr(abmll.runner, "mean_query_nll", lambda method, episodes: next(losses))
    out = tmp_path / "run"
    ok(train(env, out, 20, "meta.validate_every=2", "meta.patience=2", "meta.outer_lr=0.05"))
    steps = [r["step"] for r in log(out)]
    assert steps[-1] == 8  # validations at 2, 4 (best), 6, 8: two without improvement
    final, best = load_checkpoint(out / "final"), load_checkpoint(out / "best")
    assert final["info"]["validation"] == {
        "best_step": 4, "best_dev_nll": 0.5, "last_step": 8, "stopped_early": True, "final": "best",
    }  # fmt: skip
    assert all(torch.equal(final["theta"][k], best["theta"][k]) for k in final["theta"])
    step8 = load_checkpoint(out / "final", trainer=True)["trainer_values"]["step"]
    assert step8 == 8


def test_early_stopping_state_is_rebuilt_from_the_log(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [{"step": 1}, {"step": 2, "validation": {"dev_nll": 0.9}}, {"step": 4, "validation": {"dev_nll": 0.4}},
             {"step": 6, "validation": {"dev_nll": None}}, "cut sho"]  # fmt: skip
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    state = EarlyStopping.from_log(path, patience=2)
    assert (state.best_step, state.best_nll, state.since, state.stop) == (4, 0.4, 1, False)
    state.update(8, 0.41)
    assert state.stop


def test_validation_without_dev_tasks_is_one_clear_error(env, tmp_path):
    line = error_line(train(env, tmp_path / "run", 2, "meta.validate_every=1", setting="no-dev.json"))
    assert "names no 'dev' tasks; meta.validate_every validates on them" in line
    assert not (tmp_path / "run" / "final").exists()
    with pytest.raises(Exception, match="meta.patience"):
        from abmll.config import ABMLLConfig

        ABMLLConfig().override({"meta.patience": 2})


def test_a_comparison_validates_on_its_dev_tasks_and_draws_the_curves(tmp_path, monkeypatch):
    from conftest import comparison_folder
    from matplotlib.figure import Figure

    root = comparison_folder(tmp_path)
    (root / "dev.json").write_text(json.dumps({"train": ["fam0", "fam1"], "dev": ["fam1"], "test": ["unseen"]}))
    drawn = []
    original = Figure.savefig

    def keep(fig, path, **kw):
        drawn.append((str(path), fig))
        return original(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    ok(invoke("compare", "--methods", "zero-shot,abmll", "--preset", "smoke", "--model", root / "tiny", "--data",
              root / "data", "--setting", root / "dev.json", "--config", root / "fast.json", "--k", 4, "--out",
              tmp_path / "cmp", "--device", "cpu", "--set", "meta.validate_every=1", "--set",
              "meta.validation_query_size=4"))  # fmt: skip
    lines = log(tmp_path / "cmp" / "abmll" / "seed-100" / "train")
    assert lines and all(math.isfinite(r["validation"]["dev_nll"]) for r in lines)
    (fig,) = [f for p, f in drawn if p.endswith("training-curves.png")]
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert "meta-validation NLL" in titles and "mean σθ (at validations)" in titles and "outer NLL (query)" in titles


def test_a_diverged_test_time_adaptation_is_one_clear_error_and_an_infinite_validation_loss(toy_examples):
    from conftest import make_config

    from abmll.errors import NonFiniteError
    from abmll.evaluation import evaluate
    from abmll.methods import create_method
    from abmll.scoring import Scorer
    from abmll.tasks.data import Episode
    from abmll.tiny import tiny_llama
    from abmll.validation import mean_query_nll

    config = make_config(**{"inner.test_inner_lr": 1e12, "inner.test_inner_steps": 3, "inner.backtrack": None})
    model, tok = tiny_llama(seed=0)
    method = create_method("abmll", model, Scorer(tok, config.scoring), config)
    with torch.no_grad():
        for key, p in method.theta.items():  # B_μ off 0, so the inner steps move every factor
            if key.endswith("mu_B"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    episodes = {"toy": [Episode("toy", toy_examples[:4], toy_examples[4:], seed=100)]}
    with pytest.raises(NonFiniteError, match=r"task 'toy' seed 100: the predicted probabilities are not finite .* "
                       r"α = 1000000000000.0\); lower inner.test_inner_lr"):  # fmt: skip
        evaluate(method, episodes)
    assert mean_query_nll(method, episodes) == math.inf


def test_the_comparison_reports_each_tasks_posterior_kl_against_its_gain_over_zero_shot(tmp_path):
    from conftest import comparison_folder

    root = comparison_folder(tmp_path)
    ok(invoke("compare", "--methods", "zero-shot,structured-lora,abmll", "--preset", "smoke", "--model",
              root / "tiny", "--data", root / "data", "--setting", root / "setting.json", "--config",
              root / "fast.json", "--k", 4, "--out", tmp_path / "cmp", "--device", "cpu"))  # fmt: skip
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert list(results["coverage"]) == ["abmll"]  # the deterministic methods have no posterior
    (row,) = results["coverage"]["abmll"]
    tasks = results["methods"]
    assert row["task"] == "unseen" and row["posterior_kl"] > 0
    gain = tasks["abmll"]["tasks"]["unseen"]["accuracy"] - tasks["zero-shot"]["tasks"]["unseen"]["accuracy"]
    assert row["accuracy_gain"] == pytest.approx(gain)
    assert "## Coverage" in (tmp_path / "cmp" / "report.md").read_text()
    assert (tmp_path / "cmp" / "coverage.png").is_file()
    lines = (tmp_path / "cmp" / "abmll" / "seed-100" / "predictions.jsonl").read_text().splitlines()
    cell = [json.loads(line) for line in lines]
    assert {r["posterior_kl"] for r in cell} == {row["posterior_kl"]}  # one seed: the task's KL
