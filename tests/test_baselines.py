"""The baselines of METHOD.md section 6 on a tiny random Llama: each against a hand computation — lora-task
(no meta-training, a fresh LoRA fine-tuned on the support set), Reptile's update, MAML's second-order
gradient (autograd through a hand-unrolled inner loop) and first-order gradient, ICL's demonstration prompts
and truncation, ABMLL-ICL, structured LoRA = ABMLL without weight samples, and zero-shot through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PAIRS, adapted_tiny, family_task, make_config, tiny_comparison
from torch.nn.attention import SDPBackend, sdpa_kernel
from typer.testing import CliRunner

from abmll.bayes import bayes_layers, clone_factors, posterior, weight_sample
from abmll.comparison_report import _overrides_markdown
from abmll.config import ABMLLConfig
from abmll.errors import ConfigError
from abmll.inner import adapt
from abmll.methods import (
    ABMLL,
    ABMLLICL,
    ICL,
    MAML,
    METHODS,
    LoRATask,
    Reptile,
    StructuredLoRA,
    ZeroShot,
    create_method,
    method_config,
    method_overrides,
)
from abmll.methods.icl import SEPARATOR, demonstrate, scored_length, with_demonstrations
from abmll.scoring import Scorer, label_prompt
from abmll.tasks.data import Episode, MetaBatchSampler, Task
from abmll.tiny import tiny_llama


def _perturb(theta: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theta.values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _snapshot(theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in theta.items()}


def _episode(examples, name: str = "toy") -> Episode:
    return Episode(name, examples[:6], examples[6:])


def _nll(model, scorer, phi, examples):
    with posterior(model, phi), weight_sample(model, None):
        return scorer.nll(model, examples)


# --- registry ----------------------------------------------------------------------------------------
def test_every_baseline_is_registered_and_created():
    expected = {"zero-shot", "icl", "lora", "lora-task", "structured-lora", "reptile", "maml", "abmll", "abmll-icl"}
    assert set(METHODS) == expected and {n for n, m in METHODS.items() if not m.adapted} == {"zero-shot", "icl"}
    assert {n for n, m in METHODS.items() if not m.meta_learns} == {"zero-shot", "icl", "lora-task"}
    config = make_config()
    for name in sorted(expected):
        model, tokenizer = tiny_llama(seed=0)
        method = create_method(name, model, Scorer(tokenizer, config.scoring), config)
        assert isinstance(method, METHODS[name]) and method.name == name
        assert bool(bayes_layers(model)) == METHODS[name].adapted
        assert all(hasattr(layer, "abmll_sigma_A") == METHODS[name].bayesian for layer in bayes_layers(model).values())


# --- lora-task ---------------------------------------------------------------------------------------
def test_lora_task_learns_nothing_across_tasks_and_fine_tunes_a_fresh_lora(toy_examples):
    config = make_config(**{"inner.test_inner_steps": 3, "inner.inner_lr": 0.3, "predict.mode": "sample"})
    model, scorer = adapted_tiny(config)
    method = LoRATask(model, scorer, config)
    fresh = _snapshot(method.theta)
    tasks = [family_task(f"t{i}", PAIRS[2 * i : 2 * i + 2], 12, seed=i) for i in range(2)]
    method.meta_train(MetaBatchSampler(tasks, k=4, query_size=4, meta_batch_size=2), steps=3)
    assert method.step == 0
    for key, value in method.theta.items():
        assert torch.equal(value, fresh[key])

    support, query = toy_examples[:6], toy_examples[6:]
    phi = method.adapt(support, seed=5)
    expected = adapt(  # the support set in the order its micro-batches take it (meta.group_by_length)
        model, clone_factors(fresh), method.grouped(support), scorer, steps=3, lr=0.3, beta=0.0, seeds=lambda k: [None],
        micro_batch_size=config.meta.micro_batch_size,
    )  # fmt: skip
    for key in fresh:
        assert torch.equal(phi[key], expected[key].detach()), key
    assert any(not torch.equal(phi[k], fresh[k]) for k in fresh)  # it did move
    # the mean ΔW (σ unused) even though the config asks for samples
    with torch.no_grad():
        mean = torch.softmax(_scores(model, scorer, phi, query), dim=-1)
    assert torch.equal(method.predict(phi, query, seed=5), mean)


def _scores(model, scorer, phi, examples):
    with posterior(model, phi), weight_sample(model, None):
        return scorer(model, examples)


# --- Reptile -----------------------------------------------------------------------------------------
def test_reptile_update_equals_hand_formula(toy_examples):
    eps = 0.3
    config = make_config(**{"reptile.epsilon": eps, "inner.inner_lr": 0.5, "reptile.inner_steps": 3})
    model, scorer = adapted_tiny(config)
    method = Reptile(model, scorer, config)
    assert config.inner.inner_steps != 3 and config.meta.outer_lr != eps  # Reptile's own settings are used
    _perturb(method.theta, 1)
    theta0 = _snapshot(method.theta)
    episode = _episode(toy_examples)
    record = method.meta_step([episode])

    # by hand on a copy: K SGD steps on support ∪ query from θ, then θ + ε (φᴷ − θ)
    phi = adapt(
        model, clone_factors(theta0), episode.support + episode.query, scorer, steps=3, lr=0.5, beta=0.0,
        seeds=lambda k: [None], micro_batch_size=config.meta.micro_batch_size,
    )  # fmt: skip
    moved = 0.0
    for key, value in method.theta.items():
        expected = theta0[key] + eps * (phi[key].detach() - theta0[key])
        torch.testing.assert_close(value.detach(), expected, rtol=1e-6, atol=1e-7)
        moved += float((value.detach() - theta0[key]).abs().sum())
    assert moved > 0 and method.step == 1 and record["step"] == 1
    assert record["support_nll_last"] < record["support_nll_first"]
    assert method.optimizer.state_dict()["state"] == {}  # plain SGD: no optimiser state


def test_reptile_moves_theta_toward_the_mean_of_the_tasks(toy_examples):
    eps = 0.5
    config = make_config(**{"reptile.epsilon": eps, "inner.inner_lr": 0.5, "inner.inner_steps": 2})
    model, scorer = adapted_tiny(config)
    method = Reptile(model, scorer, config)
    _perturb(method.theta, 2)
    theta0 = _snapshot(method.theta)
    other = family_task("other", PAIRS[4:6], 12, seed=3).examples
    episodes = [_episode(toy_examples), _episode(other, "other")]
    method.meta_step(episodes)
    phis = [
        adapt(
            model, clone_factors(theta0), ep.support + ep.query, scorer, steps=2, lr=0.5, beta=0.0,
            seeds=lambda k: [None], micro_batch_size=config.meta.micro_batch_size,
        )  # fmt: skip
        for ep in episodes
    ]
    for key, value in method.theta.items():
        mean = (phis[0][key].detach() + phis[1][key].detach()) / 2
        torch.testing.assert_close(value.detach(), theta0[key] + eps * (mean - theta0[key]), rtol=1e-6, atol=1e-7)


def test_reptile_with_its_own_epsilon_differs_from_lora_task(toy_examples):
    """Reptile at its default ε (reptile.epsilon) moves θ enough that its adapted predictions on an unseen task
    differ from those of a fresh LoRA (lora-task) with the same seed; at ε = meta.outer_lr = 1e-3, as before ε
    was Reptile's own setting, they were within 5e-4."""
    config = make_config(**{"inner.inner_lr": 0.5})
    tasks = [family_task(f"t{i}", [PAIRS[i], PAIRS[i + 1]], 16, seed=i) for i in range(4)]
    sampler = MetaBatchSampler(tasks, k=4, query_size=4, meta_batch_size=2, seed=0)
    unseen = family_task("unseen", PAIRS[6:8], 12, seed=9).examples
    probs = {}
    for name in ("reptile", "lora-task"):
        model, scorer = adapted_tiny(config)
        method = create_method(name, model, scorer, config)
        method.meta_train(sampler, steps=5)
        probs[name] = method.predict(method.adapt(unseen[:4], seed=0), unseen[4:], seed=0)
    assert float((probs["reptile"] - probs["lora-task"]).abs().max()) > 0.02


# --- MAML --------------------------------------------------------------------------------------------
MAML_LR, MAML_K = 0.5, 2


def _maml(order: str, toy_examples):
    config = make_config(**{"maml.order": order, "inner.inner_lr": MAML_LR, "inner.inner_steps": MAML_K})
    model, scorer = adapted_tiny(config)
    method = MAML(model, scorer, config)
    assert all(k.endswith(("mu_A", "mu_B")) for k in method.theta)  # a deterministic LoRA: no σ factors
    _perturb(method.theta, 3)
    episode = _episode(toy_examples)
    method.zero_gradients()
    method.task_gradient(episode, step=0, task_index=0, weight=1.0)
    return method, model, scorer, episode, {k: p.grad.clone() for k, p in method.theta.items()}


def test_maml_second_order_gradient_equals_autograd_through_the_unrolled_inner_loop(toy_examples):
    method, model, scorer, episode, got = _maml("second_order", toy_examples)
    theta = {k: v.detach().clone().requires_grad_() for k, v in method.theta.items()}
    with sdpa_kernel(SDPBackend.MATH):
        phi = dict(theta)
        for _ in range(MAML_K):
            loss = _nll(model, scorer, phi, episode.support)
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True, allow_unused=True)
            phi = {k: (p if g is None else p - MAML_LR * g) for (k, p), g in zip(phi.items(), grads, strict=True)}
        outer = _nll(model, scorer, phi, episode.query)
        expected = torch.autograd.grad(outer, list(theta.values()), allow_unused=True)
    norm = 0.0
    for key, g in zip(theta, expected, strict=True):
        torch.testing.assert_close(got[key], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()))
        norm += float(g.norm())
    assert norm > 0

    # it is not the first-order gradient
    *_, first = _maml("first_order", toy_examples)
    diff = sum(float((got[k] - first[k]).norm()) for k in got)
    assert diff > 1e-3 * sum(float(first[k].norm()) for k in first)


def test_maml_first_order_gradient_is_the_query_gradient_at_phi_k(toy_examples):
    method, model, scorer, episode, got = _maml("first_order", toy_examples)
    phi = clone_factors(method.theta)
    for _ in range(MAML_K):
        loss = _nll(model, scorer, phi, episode.support)
        grads = torch.autograd.grad(loss, list(phi.values()), allow_unused=True)
        with torch.no_grad():
            phi = {
                k: (p if g is None else p - MAML_LR * g).detach().requires_grad_()
                for (k, p), g in zip(phi.items(), grads, strict=True)
            }
    outer = _nll(model, scorer, phi, episode.query)
    expected = torch.autograd.grad(outer, list(phi.values()), allow_unused=True)
    for key, g in zip(phi, expected, strict=True):
        g = torch.zeros_like(got[key]) if g is None else g
        torch.testing.assert_close(got[key], g, rtol=1e-5, atol=1e-7 * max(float(g.abs().max()), 1.0))


def test_maml_order_is_its_own_setting_second_order_by_default():
    default = ABMLLConfig()
    assert default.inner.order == "first_order" and default.maml.order == "second_order"
    assert method_overrides("maml", default) == {} and method_config("maml", default) == default
    model, tokenizer = tiny_llama(seed=0)
    method = create_method("maml", model, Scorer(tokenizer, default.scoring), default)
    assert method.order == "second_order"  # inner.order is ABMLL's and structured-lora's, not MAML's
    fomaml = default.override({"maml.order": "first_order", "inner.order": "second_order"})
    model, tokenizer = tiny_llama(seed=0)
    assert create_method("maml", model, Scorer(tokenizer, fomaml.scoring), fomaml).order == "first_order"
    with pytest.raises(ConfigError, match="maml.order"):
        default.override({"maml.order": "third_order"})
    (line,) = _overrides_markdown(["zero-shot", "maml", "abmll"], default)
    assert "`maml`: `maml.order=second_order`" in line


# --- ICL ---------------------------------------------------------------------------------------------
def test_icl_prompt_holds_exactly_the_support_examples_in_order(toy_examples):
    config = make_config()
    _, tokenizer = tiny_llama(seed=0)
    scorer = Scorer(tokenizer, config.scoring)
    support, query = toy_examples[:8], toy_examples[8:]
    shown = demonstrate(support, query, scorer)
    for ex, got in zip(query, shown, strict=True):
        expected = SEPARATOR.join([f"{s.input} {s.answer}" for s in support] + [ex.input])
        assert got.input == expected
        assert (got.options, got.gold, got.id) == (ex.options, ex.gold, ex.id)
        positions = [got.input.index(f"{s.input} {s.answer}") for s in support]
        assert positions == sorted(positions) and got.input.endswith(ex.input)
    # the label scorer shows each demonstration in its own format: lettered prompt, then the gold letter
    label = Scorer(tokenizer, make_config(**{"scoring.scorer": "label"}).scoring)
    got = with_demonstrations(support, query[0], label).input
    demos = [f"{label_prompt(s)} {'AB'[s.gold]}" for s in support]
    assert got == SEPARATOR.join(demos + [query[0].input])


def test_icl_drops_the_oldest_demonstrations_first_to_fit(toy_examples):
    _, tokenizer = tiny_llama(seed=0)
    support, query = toy_examples[:8], toy_examples[8]
    # room for the query, its longest option and exactly the 3 newest demonstrations
    demo_tokens = [len(tokenizer(f"{s.input} {s.answer}")["input_ids"]) for s in support]
    longest = max(len(tokenizer(" " + o)["input_ids"]) for o in query.options)
    max_length = len(tokenizer(query.input)["input_ids"]) + longest + sum(demo_tokens[-3:])
    scorer = Scorer(tokenizer, make_config(**{"scoring.max_length": max_length}).scoring)
    got = with_demonstrations(support, query, scorer)
    assert got.input == SEPARATOR.join([f"{s.input} {s.answer}" for s in support[-3:]] + [query.input])
    assert scored_length(got, scorer) <= max_length
    one_more = SEPARATOR.join([f"{s.input} {s.answer}" for s in support[-4:]] + [query.input])
    assert scored_length(type(query)(one_more, query.options, query.gold), scorer) > max_length
    # scored without any left cut
    model, _ = tiny_llama(seed=0)
    method = ICL(model, scorer, make_config(**{"scoring.max_length": max_length}))
    probs = method.predict(method.adapt(support, 0), [query], 0)
    assert scorer.truncated == 0 and probs.shape == (1, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))


def test_icl_scores_the_demonstrated_query_with_the_base_model(toy_examples):
    config = make_config()
    model, tokenizer = tiny_llama(seed=0)
    scorer = Scorer(tokenizer, config.scoring)
    icl = create_method("icl", model, scorer, config)
    support, query = toy_examples[:6], toy_examples[6:]
    assert icl.adapt(support, 0) == support
    expected = ZeroShot(model, scorer, config).predict(None, demonstrate(support, query, scorer), 0)
    assert torch.equal(icl.predict(icl.adapt(support, 0), query, 0), expected)
    assert not torch.equal(expected, ZeroShot(model, scorer, config).predict(None, query, 0))


def test_abmll_icl_is_abmll_adaptation_scored_with_demonstrations(toy_examples):
    config = make_config(**{"lora.sigma_init": 0.02})
    model, scorer = adapted_tiny(config)
    plain = ABMLL(model, scorer, config)
    _perturb(plain.theta, 4)
    with_icl = ABMLLICL(model, scorer, config)  # the same θ (the model's own factors)
    support, query = toy_examples[:6], toy_examples[6:]
    adapted = with_icl.adapt(support, seed=7)
    phi = plain.adapt(support, seed=7)
    assert adapted.support == support and all(torch.equal(adapted.phi[k], phi[k]) for k in phi)
    expected = plain.predict(phi, demonstrate(support, query, scorer), seed=7)
    assert torch.equal(with_icl.predict(adapted, query, seed=7), expected)


# --- structured LoRA = ABMLL with σ ≡ 0, β = γ = 0 -----------------------------------------------------
def test_structured_lora_equals_abmll_without_weight_samples_and_regularisers(toy_examples, monkeypatch):
    monkeypatch.setattr(ABMLL, "seeds", lambda self, *coords, count: [None])
    runs = {}
    for name, config in (
        ("structured-lora", make_config(**{"meta.outer_lr": 1e-2, "inner.inner_lr": 0.3})),
        (
            "abmll",
            make_config(
                **{
                    "meta.outer_lr": 1e-2,
                    "inner.inner_lr": 0.3,
                    "objective.beta": 0.0,
                    "objective.gamma": 0.0,
                    "predict.mode": "mean",
                }
            ),
        ),
    ):
        model, scorer = adapted_tiny(config)
        method = (StructuredLoRA if name == "structured-lora" else ABMLL)(model, scorer, config)
        initial = _snapshot(method.theta)
        other = family_task("other", PAIRS[4:6], 12, seed=3).examples
        records = [method.meta_step([_episode(toy_examples), _episode(other, "other")]) for _ in range(2)]
        phi = method.adapt(toy_examples[:6], seed=3)
        runs[name] = (records, _snapshot(method.theta), method.predict(phi, toy_examples[6:], seed=3))
        assert any(not torch.equal(method.theta[k], initial[k]) for k in initial)
    (rec_s, theta_s, probs_s), (rec_a, theta_a, probs_a) = runs["structured-lora"], runs["abmll"]
    assert [r["outer_nll"] for r in rec_s] == [r["outer_nll"] for r in rec_a]
    for key in theta_s:
        assert torch.equal(theta_s[key], theta_a[key]), key
    assert torch.equal(probs_s, probs_a)


# --- zero-shot through the CLI -----------------------------------------------------------------------
def test_zero_shot_predictions_equal_abmll_evaluate(tmp_path):
    from abmll.cli import app
    from abmll.evaluation import load_episodes, read_predictions
    from abmll.models import load_model
    from abmll.tasks.readers import write_metaicl_task

    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    data, k, seeds = tmp_path / "data", 4, (100, 13)
    task = family_task("unseen", PAIRS[::3], 20, seed=9)
    for i, seed in enumerate(seeds):
        rotated = task.examples[5 * i :] + task.examples[: 5 * i]
        write_metaicl_task(Task("unseen", rotated[:k]), data, k, seed, "train")
        write_metaicl_task(Task("unseen", rotated[k : k + 6]), data, k, seed, "test")
    out = tmp_path / "ev"
    argv = [
        "evaluate", "--method", "zero-shot", "--model", tmp_path / "tiny", "--data", data, "--tasks", "unseen",
        "--k", k, "--seeds", ",".join(map(str, seeds)), "--out", out, "--device", "cpu",
    ]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["method"] == "zero-shot"
    written = {(r["seed"], r["id"]): r["probs"] for r in read_predictions(out / "predictions.jsonl")}

    config = ABMLLConfig()
    mdl, tok = load_model(tmp_path / "tiny")
    method = ZeroShot(mdl, Scorer(tok, config.scoring), config)
    expected = {}
    for ep in load_episodes(data, ["unseen"], k, list(seeds))["unseen"]:
        probs = method.predict(method.adapt(ep.support, ep.seed), ep.query, ep.seed)
        for ex, row in zip(ep.query, probs.tolist(), strict=True):
            expected[(ep.seed, ex.id)] = row[: len(ex.options)]
    # the two seeds' disjoint parts of the 11 pooled test examples, less each seed's own support examples
    assert len(expected) == 9 and written == expected


@pytest.mark.parametrize("name", ["lora-task", "icl"])
def test_untrained_baselines_evaluate_without_a_checkpoint(tmp_path, name):
    from abmll.cli import app
    from abmll.tasks.readers import write_metaicl_task

    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    task = family_task("unseen", PAIRS[::3], 10, seed=9)
    write_metaicl_task(Task("unseen", task.examples[:2]), tmp_path / "data", 2, 100, "train")
    write_metaicl_task(Task("unseen", task.examples[2:6]), tmp_path / "data", 2, 100, "test")
    argv = [
        "evaluate", "--method", name, "--model", tmp_path / "tiny", "--data", tmp_path / "data", "--tasks",
        "unseen", "--k", 2, "--seeds", 100, "--out", tmp_path / "ev", "--device", "cpu", "--inner-steps", 1,
    ]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["method"] == name and res["tasks"]["unseen"]["n"] == 4


def test_baselines_run_through_the_comparison_harness(tmp_path):
    from abmll.compare import run_comparison

    methods = ["icl", "lora-task", "reptile", "maml", "abmll-icl"]
    comparison = tiny_comparison(tmp_path, methods)
    out = tmp_path / "out"
    results = run_comparison(comparison, out)
    assert list(results["methods"]) == methods
    for name in methods:
        assert results["methods"][name]["tasks"]["unseen"]["n"] == 8
        assert (out / name / "seed-100" / "train" / "final").is_dir() == METHODS[name].meta_learns
    train_info = json.loads((out / "maml" / "seed-100" / "train" / "config.json").read_text())
    assert train_info["config"]["maml"]["order"] == "second_order"
    assert "`maml`: `maml.order=second_order`" in (out / "report.md").read_text()
