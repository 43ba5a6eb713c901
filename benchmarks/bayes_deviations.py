"""Benchmark: each deviation that left ABMLL's Bayesian part inert, measured before and after its fix in one run.

On the tiny Llama and the synthetic ``identical`` family (:mod:`abmll.synthetic`), every "before" row is the old
behaviour reached through a config option that still exists, every "after" row the library default:

1. the paper presets with σ_init = c = e^-20 (before) and with σ_init = 1e-3 (after): meta-steps until the first
   non-finite loss, out of ``--steps``;
2. σ at test time: max over layers of |σφ/σθ − 1| after K_test = 10 steps on a 16-shot support set, with
   softplus and the mean's step size on σ (before) and exp + λ with α_σ (after);
3. σ in meta-training: mean σθ / σ_init per layer after ``--steps`` meta-steps, with softplus and the mean's
   AdamW rate (before) and exp + λ with ``meta.sigma_lr`` (after);
4. the KL's pull on the prior mean: the norm of β ∂KL/∂(μ factors) that reaches θ after a real inner loop, sent
   straight through (``straight_through_kl``, before) and by its direct partial (``first_order``, after);
5. the KL in the inner loop: the norm of β ∇_φ KL summed over the inner steps of a meta-step, at K = 1 (before)
   and K = 2 (after);
6. the logged support loss: at K = 1, the loss before the last step (before: equal to the first) and after it;
7. Reptile against lora-task: max |Δp| of their predictions on an unseen task, at ε = ``meta.outer_lr`` = 1e-3
   (before) and at ``reptile.epsilon`` = 0.1 (after);
8. query sets of seeds 100, 13 and 21 on the built-in suite's unseen tasks (16-shot, 100 query examples, as the
   ``full`` preset): the largest pairwise overlap of two seeds' query sets, with each seed's first 100 examples
   of its own test file (before) and with ``load_episodes`` (after); skipped when the suite is not fetched.

Run from the repository root::

    .venv/bin/python benchmarks/bayes_deviations.py            # print a Markdown section
    .venv/bin/python benchmarks/bayes_deviations.py --write    # and replace its section in RESULTS.md
"""

from __future__ import annotations

import argparse
import math

import torch
from _common import Record, emit, parse_args

from abmll.bayes.inject import bayes_layers, group_by_layer
from abmll.config import ABMLLConfig, preset
from abmll.evaluation import load_episodes
from abmll.inner import adapt
from abmll.methods import create_method
from abmll.methods.template import INNER
from abmll.objectives import LayerwiseGrad, kl_divergence, outer_kl_backward
from abmll.scoring import Scorer
from abmll.synthetic import SyntheticFamily
from abmll.tasks.data import MetaBatchSampler
from abmll.tasks.readers import metaicl_path, read_metaicl_file, read_setting

SECTION = "bayes_deviations"
SMALL = {"meta.meta_batch_size": 2, "meta.support_size": 16, "meta.query_size": 16, "meta.micro_batch_size": 32,
         "predict.samples": 2, "inner.inner_steps": 2, "meta.nonfinite": "skip"}  # fmt: skip
BEFORE_SIGMA = {"lora.sigma_transform": "softplus", "inner.sigma_lr": None, "meta.sigma_lr": None}


def method(family: SyntheticFamily, name: str, config: ABMLLConfig):
    model, tokenizer = family.base_model()
    return create_method(name, model, Scorer(tokenizer, config.scoring), config)


def sigmas(m, factors) -> dict[str, torch.Tensor]:
    grouped = group_by_layer({k: v.detach() for k, v in factors.items()})
    return {name: layer.sigma(grouped[name]) for name, layer in bayes_layers(m.model).items()}


def steps_until_nonfinite(family, sampler, config, steps: int) -> str:
    m = method(family, "abmll", config)
    for _ in range(steps):
        record = m.meta_step(sampler.meta_batch(m.step))
        if not math.isfinite(record["outer_nll"]) or not math.isfinite(record["support_nll_last"]):
            return f"non-finite at meta-step {m.step}"
    return f"finite for {steps} meta-steps (outer NLL {record['outer_nll']:.3f})"


def sigma_at_test_time(family, support, config) -> float:
    m = method(family, "abmll", config)
    st, sp = sigmas(m, m.theta), sigmas(m, m.adapt(support, seed=0))
    return max(float((sp[n] / st[n] - 1).abs().max()) for n in st)


def sigma_in_meta_training(family, sampler, config, steps: int) -> list[float]:
    m = method(family, "abmll", config)
    m.meta_train(sampler, steps=steps)
    return [float(s.mean()) / config.lora.sigma_init for s in sigmas(m, m.theta).values()]


def kl_pull_on_the_mean(family, episode, config) -> float:
    m = method(family, "abmll", config)
    phi = m.inner_loop(episode.support, lambda k: m.seeds(INNER, 0, 0, k, count=1), config.inner.inner_steps)
    theta = m.theta
    for p in theta.values():
        p.grad = None
    order = config.inner.order
    given = phi if order == "first_order" else {k: theta[k] + (phi[k] - theta[k]).detach() for k in theta}
    outer_kl_backward(given, theta, m.layers, config.objective.beta, order)
    return math.sqrt(sum(float(p.grad.square().sum()) for k, p in theta.items() if k.endswith(("mu_A", "mu_B"))))


def inner_kl_gradient(family, episode, config) -> float:
    """Σ over the inner steps of ‖β ∇_φ KL(q_φᵏ ‖ p_θ)‖ at the φᵏ the inner loop visits."""
    m = method(family, "abmll", config)
    total, theta = 0.0, {k: v.detach() for k, v in m.theta.items()}
    for k in range(1, config.inner.inner_steps + 1):
        phi = adapt(m.model, m.theta, episode.support, m.scorer, steps=k - 1, lr=config.inner.inner_lr,
                    sigma_lr=config.inner.sigma_lr, beta=config.objective.beta,
                    seeds=lambda j: m.seeds(INNER, 0, 0, j, count=1), micro_batch_size=32)  # fmt: skip
        grad = LayerwiseGrad(list(phi.values()), config.objective.beta)
        kl_divergence(phi, theta, m.layers, grad)
        total += math.sqrt(sum(float(g.square().sum()) for g in grad.grads if g is not None))
    return total


def support_losses(family, episode, config) -> list[float]:
    m = method(family, "abmll", config)
    losses: list[float] = []
    m.inner_loop(episode.support, lambda k: m.seeds(INNER, 0, 0, k, count=1), 1, losses=losses)
    return losses  # [before step 1, after step 1]


def reptile_vs_lora_task(family, sampler, unseen, config, steps: int) -> float:
    probs = []
    for name in ("reptile", "lora-task"):
        m = method(family, name, config)
        m.meta_train(sampler, steps=steps)
        probs.append(m.predict(m.adapt(unseen[:16], seed=0), unseen[16:], seed=0))
    return float((probs[0] - probs[1]).abs().max())


def query_overlap(seeds=(100, 13, 21), k: int = 16, size: int = 100) -> tuple[str, str] | None:
    """The largest overlap (fraction of a query set) between two seeds' query sets over the built-in suite's
    unseen tasks, before (each seed's first ``size`` test examples) and after (``load_episodes``)."""
    from abmll.suite import suite_dir

    data = suite_dir()
    if not (data / "settings" / "builtin.json").is_file():
        return None
    tasks = read_setting(data / "settings" / "builtin.json")["test"]
    after = load_episodes(data, tasks, k, list(seeds), size)
    worst = {"before": 0.0, "after": 0.0}
    for task in tasks:
        files = [read_metaicl_file(metaicl_path(data, task, k, s, "test"), task) for s in seeds]
        old = [{(e.input, e.options) for e in f.examples[:size]} for f in files]
        new = [{(e.input, e.options) for e in ep.query} for ep in after[task]]
        for label, sets in (("before", old), ("after", new)):
            for a, b in ((0, 1), (0, 2), (1, 2)):
                worst[label] = max(worst[label], len(sets[a] & sets[b]) / min(len(sets[a]), len(sets[b])))
    return f"{worst['before']:.0%}", f"{worst['after']:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="meta-steps of the meta-training rows")
    parser.add_argument("--tasks", type=int, default=16, help="meta-training tasks of the family")
    args = parse_args(parser)
    record = Record()
    family = SyntheticFamily.named("identical")
    tasks = family.tasks(range(args.tasks), 48)
    sampler = MetaBatchSampler(tasks, k=16, query_size=16, meta_batch_size=2, seed=0)
    episode = sampler.meta_batch(0)[0]
    unseen = family.task(10_000, 48).examples
    base = ABMLLConfig().override(SMALL)
    c = math.exp(-20)
    rows = []

    for name in ("paper-v1", "paper-v2"):
        cfg = preset(name).override(SMALL)
        before = steps_until_nonfinite(family, sampler, cfg.override({"lora.sigma_init": c}), args.steps)
        after = steps_until_nonfinite(family, sampler, cfg, args.steps)
        rows.append((f"`{name}`: σ_init = e^-20 (before) vs 1e-3 (after)", before, after))

    test = {"inner.test_inner_steps": 10}
    before = sigma_at_test_time(family, unseen[:16], base.override({**BEFORE_SIGMA, **test}))
    after = sigma_at_test_time(family, unseen[:16], base.override(test))
    rows.append(("max \\|σφ/σθ − 1\\| after K_test = 10 steps", f"{before:.2e}", f"{after:.3f}"))

    before = sigma_in_meta_training(family, sampler, base.override(BEFORE_SIGMA), args.steps)
    after = sigma_in_meta_training(family, sampler, base, args.steps)
    rows.append((f"σθ / σ_init per layer after {args.steps} meta-steps", ", ".join(f"{x:.3f}" for x in before),
                 ", ".join(f"{x:.2f}" for x in after)))  # fmt: skip

    before = kl_pull_on_the_mean(family, episode, base.override({"inner.order": "straight_through_kl"}))
    after = kl_pull_on_the_mean(family, episode, base)
    rows.append(("‖β ∂KL/∂(μθ factors)‖ reaching θ (K = 2)", f"{before:.2e}", f"{after:.2e}"))

    before = inner_kl_gradient(family, episode, base.override({"inner.inner_steps": 1}))
    after = inner_kl_gradient(family, episode, base)
    rows.append(("Σ_k ‖β ∇_φ KL‖ in the inner loop: K = 1 (before) vs K = 2", f"{before:.2e}", f"{after:.2e}"))

    first, last = support_losses(family, episode, base)
    what = "`support_nll_last` at K = 1: before the last step (= first) vs after it"
    rows.append((what, f"{first:.4f}", f"{last:.4f}"))

    before = reptile_vs_lora_task(family, sampler, unseen, base.override({"reptile.epsilon": 1e-3}), args.steps)
    after = reptile_vs_lora_task(family, sampler, unseen, base, args.steps)
    rows.append((f"max \\|p_reptile − p_lora-task\\| after {args.steps} meta-steps", f"{before:.2e}", f"{after:.3f}"))

    overlap = query_overlap()
    what = "largest overlap of two seeds' query sets, built-in suite, unseen tasks"
    rows.append((what, *(overlap or ("suite not fetched (`abmll fetch`)", "—"))))

    record.stop()
    lines = [
        "## ABMLL's Bayesian part: each deviation before and after its fix",
        "",
        f"- date: {record.date}",
        f"- command: `{record.command}`",
        f"- setup: tiny Llama, synthetic `identical` family ({args.tasks} meta-training tasks of 48 examples, "
        "16-shot support and 16 query examples, meta-batch 2, K = 2, S = 2), seed 0; library defaults otherwise",
        f"- elapsed: {record.elapsed():.0f} s",
        "",
        "| deviation | before | after |",
        "|---|---|---|",
        *[f"| {what} | {b} | {a} |" for what, b, a in rows],
    ]
    emit(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
