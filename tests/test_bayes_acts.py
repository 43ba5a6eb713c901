"""ABMLL's Bayesian part acts: the paper presets train finite end to end, σ learns, the prior recovers a known
truth on the synthetic families (:mod:`abmll.synthetic`), and the KL pulls the prior where the maths says."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import save_tiny, write_families, write_unseen
from typer.testing import CliRunner

from abmll.bayes.inject import group_by_layer, posterior, weight_sample
from abmll.cli import app
from abmll.config import ABMLLConfig
from abmll.methods import create_method
from abmll.scoring import Scorer
from abmll.synthetic import FreshTasks, SyntheticFamily, predictive_kl
from abmll.tasks.data import MetaBatchSampler

TRAIN_TASKS = [f"fam{i}" for i in range(4)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved tiny Llama and a MetaICL folder: four meta-training tasks, one unseen 8-shot task."""
    root = tmp_path_factory.mktemp("presets")
    save_tiny(root)
    data = root / "data"
    write_families(data, TRAIN_TASKS, 24)
    write_unseen(data, 8, 20, [100])
    (root / "setting.json").write_text(json.dumps({"train": TRAIN_TASKS, "test": ["unseen"]}))
    return root


@pytest.mark.parametrize("name", ["default", "paper-v1", "paper-v2"])
def test_preset_trains_20_meta_steps_and_adapts_with_finite_losses(folders, name):
    """Every preset runs 20 meta-steps and a test-time adaptation (its own K_test) with finite losses. The
    paper-literal σ_init = c = e^-20 turned to NaN within 2–3 meta-steps (docs/METHOD.md §8)."""
    run, ev = folders / f"run-{name}", folders / f"eval-{name}"
    small = ["meta.meta_batch_size=2", "meta.support_size=8", "meta.query_size=8", "lora.rank=2",
             "inner.inner_steps=2", "predict.samples=2", "meta.checkpoint_every=20"]  # fmt: skip
    sets = [a for s in small for a in ("--set", s)]
    argv = ["train", "--preset", name, "--model", folders / "tiny", "--data", folders / "data", "--setting",
            folders / "setting.json", "--out", run, "--steps", 20, "--device", "cpu", *sets]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    for r in log:
        for key in ("outer_nll", "kl", "support_nll_first", "support_nll_last", "grad_norm"):
            assert math.isfinite(r[key]), (r["step"], key, r[key])
    argv = ["evaluate", "--checkpoint", run / "final", "--data", folders / "data", "--tasks", "unseen",
            "--k", 8, "--seeds", 100, "--out", ev, "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    results = json.loads((ev / "results.json").read_text())
    task = results["tasks"]["unseen"]
    assert task["n"] == 12 and math.isfinite(task["nll"]) and math.isfinite(task["accuracy"])


# --- the synthetic families: σ learns, the prior recovers the truth ------------------------------------------
#: 64-shot support sets during meta-training: with 16, the support set's sampling noise moves φ as far as the
#: tasks' own differences do, and σθ (which follows how far φ moves) no longer tells the families apart.
TRAINING = {"meta.meta_batch_size": 4, "meta.support_size": 64, "meta.query_size": 16, "inner.inner_steps": 2,
            "meta.outer_lr": 5e-3, "meta.micro_batch_size": 40, "predict.samples": 2}  # fmt: skip
STEPS = 120


def _mean_sigma(method, factors) -> dict[str, torch.Tensor]:
    grouped = group_by_layer({k: v.detach() for k, v in factors.items()})
    return {name: layer.sigma(grouped[name]) for name, layer in method.layers.items()}


@pytest.fixture(scope="module")
def trained():
    """ABMLL meta-trained for STEPS meta-steps on 48 tasks of each named family (96 examples each), seed 0."""
    out = {}
    for name in ("identical", "spread"):
        family = SyntheticFamily.named(name)
        config = ABMLLConfig().override(TRAINING)
        model, tokenizer = family.base_model()
        method = create_method("abmll", model, Scorer(tokenizer, config.scoring), config)
        sampler = MetaBatchSampler(family.tasks(range(48), 96), k=64, query_size=16, meta_batch_size=4, seed=0)
        method.meta_train(sampler, steps=STEPS)
        out[name] = (family, method)
    return out


def test_sigma_theta_learns_and_is_wider_on_the_spread_family(trained):
    """Every adapted layer's mean σθ moves ≥ 2× from σ_init on the spread family, and the mean σθ over every
    entry is ≥ 2× larger there than on the identical family (before the fix: within 0.04 % per meta-step). The
    second holds in this setting (48 fixed tasks of 96 labels per family, seed 0, 120 meta-steps), not in general:
    over 3 seeds with new tasks at every meta-step the two families' mean σθ come out about equal (docs/METHOD.md
    §9, section `synthetic_family_fresh_support64_bounded` of benchmarks/RESULTS.md)."""
    sigma = {name: _mean_sigma(method, method.theta) for name, (_, method) in trained.items()}
    init = trained["spread"][1].config.lora.sigma_init
    for layer, s in sigma["spread"].items():
        assert float(s.mean()) >= 2 * init, (layer, float(s.mean()) / init)
    mean = {name: float(torch.cat([s.flatten() for s in layers.values()]).mean()) for name, layers in sigma.items()}
    assert mean["spread"] >= 2 * mean["identical"], mean


def test_sigma_phi_leaves_sigma_theta_on_an_informative_support_set(trained):
    """After K_test = 10 steps on a 16-shot support set of an unseen task, the posterior's σφ differs from the
    prior's σθ by ≥ 5 % in the layer the data informs most (before the fix: 1 ± 6e-7)."""
    family, method = trained["spread"]
    support = family.task(10_000, 16).examples
    prior_sigma, posterior_sigma = _mean_sigma(method, method.theta), _mean_sigma(method, method.adapt(support, 0))
    change = {n: float(posterior_sigma[n].mean() / prior_sigma[n].mean() - 1) for n in prior_sigma}
    assert max(abs(c) for c in change.values()) >= 0.05, change


@pytest.fixture(scope="module")
def trained_on_fresh_tasks():
    """ABMLL meta-trained for 200 meta-steps on the identical family with new tasks at every meta-step (no label
    seen twice), seed 100: the setting of `benchmarks/synthetic_family.py --fresh-tasks` (docs/METHOD.md §9)."""
    family = SyntheticFamily.named("identical")
    config = ABMLLConfig().override({**TRAINING, "meta.sigma_lr": 0.03, "seed": 100})
    model, tokenizer = family.base_model()
    method = create_method("abmll", model, Scorer(tokenizer, config.scoring), config)
    method.meta_train(FreshTasks(family, 64, 16, 4, seed=100), steps=200)
    return family, method


def test_the_prior_mean_recovers_the_family_mean_teacher(trained_on_fresh_tasks):
    """On the identical family the model at μθ (no adaptation, ΔW = μθ) moves most of the way from W0 to the mean
    teacher W0 + M on fresh inputs: its predictive KL is ≤ 20 % of the base model's (the issue's target; with σ
    bounded, 0.154, 0.180 and 0.153 in the 3 seeds of benchmarks/synthetic_family.py, this one's setting)."""
    family, method = trained_on_fresh_tasks
    probe = family.probe(256, seed=1)
    teacher = family.probs(probe, family.delta())
    with torch.no_grad(), posterior(method.model, None), weight_sample(method.model, None):
        scores = [method.scorer(method.model, probe[i : i + 64]) for i in (0, 64, 128, 192)]
    at_mean = torch.softmax(torch.cat(scores), -1)
    ratio = predictive_kl(teacher, at_mean) / predictive_kl(teacher, family.probs(probe))
    assert ratio <= 0.2, ratio


# --- σθ stays bounded where noise lowers the expected NLL ---------------------------------------------------
#: ABMLL's values tuned by `abmll tune` on the spread family (docs/results/synthetic/spread/tune/tuned.json, rounded)
#: on the `full` preset's meta-batches: with them σθ grew without end in all three seeds of the comparison.
TUNED = {"meta.meta_batch_size": 2, "meta.support_size": 4, "meta.query_size": 4, "meta.micro_batch_size": 8,
         "inner.inner_steps": 2, "inner.inner_lr": 0.05, "inner.sigma_lr": 31.5, "meta.outer_lr": 0.06,
         "meta.sigma_lr": 0.0216, "objective.beta": 2.7e-10, "lora.sigma_init": 1.1e-4, "predict.samples": 1,
         "scoring.length_norm": "none"}  # fmt: skip


def _max_sigma_after(steps: int, **changes) -> tuple[float, float]:
    family = SyntheticFamily.named("spread")
    config = ABMLLConfig().override({**TUNED, **changes})
    model, tokenizer = family.base_model()
    method = create_method("abmll", model, Scorer(tokenizer, config.scoring), config)
    sampler = MetaBatchSampler(family.tasks(range(32), 64), k=4, query_size=4, meta_batch_size=2, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the drift's size depends on the order of float sums (3.2 with 2 threads on one CPU)
    try:
        method.meta_train(sampler, steps=steps)
    finally:
        torch.set_num_threads(threads)
    sigma = torch.cat([s.flatten() for s in _mean_sigma(method, method.theta).values()])
    return float(sigma.max()), float(sigma.mean())


def test_sigma_theta_stays_below_sigma_max_where_the_nll_is_flat():
    """With the tuned values σθ of some entries grows without end when unbounded (eq. 2: to 10⁵ in the comparison;
    the expected NLL is nearly flat in them); under eq. 2b every entry stays below σ_max + c, and σθ still learns
    (its mean moves ≥ 2× from σ_init)."""
    free, _ = _max_sigma_after(120, **{"lora.sigma_max": None})
    assert free > 2.0, free  # past twice σ_max: the failure this bound is for (else its absence goes unnoticed)
    bounded, mean = _max_sigma_after(120)
    assert math.isfinite(bounded) and bounded <= 1.0 + 1e-8, bounded
    assert mean >= 2 * TUNED["lora.sigma_init"], mean
