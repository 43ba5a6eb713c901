"""Benchmark: ABMLL against its deterministic twins on a synthetic task family that knows its truth.

Every task of :mod:`abmll.synthetic` is labelled by a known teacher ΔW_i = M + s ⊙ E_i on the tiny Llama's
q_proj and v_proj. Two families: ``identical`` (s = 0: one teacher for every task) and ``spread`` (tasks stray
from the mean teacher W0 + M). For each family and seed, ``abmll`` and ``structured-lora`` are meta-trained on
the family's meta-training tasks (``--fresh-tasks``: new tasks at every meta-step, no example seen twice;
``lora-task`` learns nothing across tasks and is only evaluated; ``--methods lora`` adds the pooled LoRA, the
plainest estimator of the mean teacher: how well the training labels pin it down), then each
method adapts to every unseen task's k-shot support set (k = 4 and 16, the config's K_test steps for all) and
predicts its query set. Reported, with 95 % t-intervals across seeds:

- NLL, ECE and accuracy on the query sets, the predictive KL to each task's own teacher, and the paired
  differences ABMLL − each baseline (per seed, on the same episodes);
- prior recovery: the predictive KL of the model at μθ (no adaptation, ``predict.mode = mean``) to the mean
  teacher as a fraction of the base model's, the relative distance ‖μθ − M‖ / ‖M‖, and ABMLL's learned mean
  σθ per adapted layer;
- references that need no training: the task's teacher itself (the Bayes-optimal predictor), the mean
  teacher and the base model.

Run from the repository root::

    .venv/bin/python benchmarks/synthetic_family.py --quick                  # a small run, printed only
    .venv/bin/python benchmarks/synthetic_family.py --write                  # the full run, written to RESULTS.md
                                                                             # and synthetic_family.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import Record, emit, parse_args

from abmll import ABMLLConfig, MetaBatchSampler, Scorer, create_method, make_episode
from abmll.bayes.inject import bayes_layers
from abmll.checkpoint import versions
from abmll.errors import NonFiniteError
from abmll.methods import method_config
from abmll.metrics import macro_average, mean_interval, task_metrics
from abmll.synthetic import FAMILIES, FRESH, FreshTasks, SyntheticFamily, predictive_kl

SECTION = "synthetic_family"
JSON_PATH = Path(__file__).with_name("synthetic_family.json")
METRICS = ("nll", "ece", "accuracy", "kl_task")
REFERENCES = ("teacher", "mean teacher", "base")
QUICK = {"steps": 4, "train_tasks": 8, "test_tasks": 6, "seeds": [100, 13], "probe": 64}
def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["inner.inner_lr=0.05", …]`` → ``{"inner.inner_lr": 0.05, …}`` (values parsed as JSON when they can be)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def scalars(probs: torch.Tensor, query, teacher: torch.Tensor) -> dict[str, float]:
    m = task_metrics(probs, [ex.gold for ex in query])
    return {"nll": m["nll"], "ece": m["ece"], "accuracy": m["accuracy"], "kl_task": predictive_kl(teacher, probs)}


@torch.no_grad()
def prior_figures(name: str, model, scorer: Scorer, config: ABMLLConfig, family: SyntheticFamily, probe, ref) -> dict:
    """Prior recovery of a (meta-trained) method: the model at μθ against the mean teacher M."""
    at_mean = create_method(name, model, scorer, config.override({"predict.mode": "mean"}))  # shares θ
    probs = at_mean.predict(None, probe, seed=0)
    layers = bayes_layers(model)
    mean = family.delta()
    distance = [
        float((layer.mean(layer.prior_factors()) - mean[n]).norm() / mean[n].norm()) for n, layer in layers.items()
    ]
    out = {
        "kl_fraction": predictive_kl(ref["mean"], probs) / predictive_kl(ref["mean"], ref["base"]),
        "mean_distance": sum(distance) / len(distance),
    }
    if name == "abmll":
        sigmas = {n: layer.sigma(layer.prior_factors()) for n, layer in layers.items()}
        out["sigma"] = {n: float(v.mean()) for n, v in sigmas.items()}
        out["sigma_all"] = float(sum(v.sum() for v in sigmas.values()) / sum(v.numel() for v in sigmas.values()))
    return out


def evaluate(method, tasks, k: int, seed: int, query: int, score) -> tuple[list[dict], int]:
    """Adapt ``method`` to every task's k-shot support set and score its query set; (results, non-finite count)."""
    results, failed = [], 0
    for task in tasks:
        ep = make_episode(task, k, seed, query_size=query)
        probs = method.predict(method.adapt(ep.support, seed), ep.query, seed)
        if not torch.isfinite(probs).all():
            failed += 1
            continue
        results.append(score(probs, ep, task))
    return results, failed


def run_family(fname: str, args, config: ABMLLConfig, log) -> dict[str, Any]:
    family = SyntheticFamily.named(fname, seed=args.family_seed)
    meta = config.meta
    methods = args.family_methods.get(fname, args.methods)
    train = (
        []
        if args.fresh_tasks
        else family.tasks(range(args.train_tasks), meta.support_size + meta.query_size + args.train_extra)
    )
    test = family.tasks(range(args.train_tasks, args.train_tasks + args.test_tasks), max(args.shots) + args.query)
    # Meta-validation tasks: teachers of their own (indices after the test tasks'), never scored in the tables.
    first_val = args.train_tasks + args.test_tasks
    val = (
        family.tasks(range(first_val, first_val + args.val_tasks), max(args.shots) + args.query)
        if args.select_test_lr
        else []
    )
    teacher = {t.name: family.probs(t.examples, family.delta(args.train_tasks + j)) for j, t in enumerate(test)}
    mean_teacher = {t.name: family.probs(t.examples, family.delta()) for t in test}
    base = {t.name: family.probs(t.examples) for t in test}
    probe = family.probe(args.probe)
    ref = {"mean": family.probs(probe, family.delta()), "base": family.probs(probe)}

    def rows(table: dict[str, torch.Tensor], episode, task) -> torch.Tensor:
        index = {ex.id: i for i, ex in enumerate(task.examples)}
        return table[task.name][[index[ex.id] for ex in episode.query]]

    def test_score(probs, ep, task) -> dict[str, float]:
        return scalars(probs, ep.query, rows(teacher, ep, task))

    def val_score(probs, ep, task) -> dict[str, float]:
        return {"nll": task_metrics(probs, [ex.gold for ex in ep.query])["nll"]}

    per_seed: dict[str, dict[str, dict[int, dict | None]]] = {}  # "k=4" → method → seed → macro-average
    notes: list[str] = []
    prior: dict[str, dict[int, dict]] = {}
    timing: dict[str, float] = {}
    selection: dict[str, dict[str, dict[int, dict]]] = {}  # "k=4" → method → seed → {"lr", "val_nll": {α: NLL}}
    for seed in args.seeds:
        for name in methods:
            cfg = method_config(name, config.override({"seed": seed}))
            model, tok = family.base_model()
            scorer = Scorer(tok, cfg.scoring)
            method = create_method(name, model, scorer, cfg)
            t0 = time.perf_counter()
            records: list[dict] = []
            curve: list[dict] = []

            def on_step(
                record, seed=seed, name=name, model=model, scorer=scorer, cfg=cfg, records=records, curve=curve
            ):
                records.append(record)
                step = record["step"]
                if args.curve and (step % args.curve == 0 or step == args.steps):
                    recent = records[-args.curve :]
                    point = {"step": step}
                    for key in ("outer_nll", "kl", "support_nll_first", "support_nll_last"):
                        if all(r[key] is not None for r in recent):  # pooled `lora` has no inner loop
                            point[key] = sum(r[key] for r in recent) / len(recent)
                    point.update(prior_figures(name, model, scorer, cfg, family, probe, ref))
                    curve.append(point)
                    sigma = f", σθ {point['sigma_all']:.5f}" if "sigma_all" in point else ""
                    log(f"{fname} seed {seed} {name} step {step}: outer NLL {point['outer_nll']:.4f}, "
                        f"KL fraction {point['kl_fraction']:.3f}{sigma}")  # fmt: skip

            if method.meta_learns:
                sampler = (
                    FreshTasks(family, meta.support_size, meta.query_size, meta.meta_batch_size, seed)
                    if args.fresh_tasks
                    else MetaBatchSampler(train, meta.support_size, meta.query_size, meta.meta_batch_size, seed=seed)
                )
                try:
                    method.meta_train(sampler, steps=args.steps, log=on_step)
                except NonFiniteError as exc:  # θ stays as after the last finite step; evaluated as such
                    notes.append(f"{name}, seed {seed}: meta-training stopped: {exc}")
            t1 = time.perf_counter()
            figures = prior_figures(name, model, scorer, cfg, family, probe, ref)
            figures["outer_nll_first_last"] = [records[0]["outer_nll"], records[-1]["outer_nll"]] if records else None
            figures["meta_steps_done"], figures["skipped_steps"] = method.step, method.skipped_steps
            if curve:
                figures["curve"] = curve
            prior.setdefault(name, {})[seed] = figures
            for k in args.shots:
                chosen = None
                if args.select_test_lr:  # α of this method, seed and k: the lowest mean NLL on validation tasks
                    val_nll = {}
                    for lr in args.select_test_lr:
                        at_lr = create_method(name, model, scorer, cfg.override({"inner.test_inner_lr": lr}))
                        results, failed = evaluate(at_lr, val, k, seed, args.query, val_score)
                        val_nll[lr] = macro_average(results)["nll"] if not failed else float("inf")
                    chosen = min(val_nll, key=val_nll.get)
                    selection.setdefault(f"k={k}", {}).setdefault(name, {})[seed] = {"lr": chosen, "val_nll": val_nll}
                    log(
                        f"{fname} seed {seed} {name} k={k}: validation NLL "
                        + ", ".join(f"α={lr:g}: {v:.4f}" for lr, v in val_nll.items())
                        + f"; chosen α = {chosen:g}"
                    )
                at = method if chosen is None else create_method(
                    name, model, scorer, cfg.override({"inner.test_inner_lr": chosen})
                )  # fmt: skip
                results, failed = evaluate(at, test, k, seed, args.query, test_score)
                if failed:  # the whole cell is left out of the tables rather than averaged over fewer tasks
                    notes.append(f"{name}, seed {seed}, k = {k}: non-finite predictions on {failed} tasks; left out")
                cell = macro_average(results) if not failed else None
                per_seed.setdefault(f"k={k}", {}).setdefault(name, {})[seed] = cell
            t2 = time.perf_counter()
            timing[f"{name} seed {seed} meta-train s"] = t1 - t0
            timing[f"{name} seed {seed} evaluate s"] = t2 - t1
            log(f"{fname} seed {seed} {name}: meta-train {t1 - t0:.0f} s, evaluate {t2 - t1:.0f} s")
        for k in args.shots:
            for label, table in zip(REFERENCES, (teacher, mean_teacher, base), strict=True):
                results = []
                for task in test:
                    ep = make_episode(task, k, seed, query_size=args.query)
                    results.append(scalars(rows(table, ep, task), ep.query, rows(teacher, ep, task)))
                per_seed[f"k={k}"].setdefault(label, {})[seed] = macro_average(results)
    calibration = {
        "kl_mean_teacher_to_base": predictive_kl(ref["mean"], ref["base"]),
        "sigma_init": config.lora.sigma_init,
    }
    return {"family": {**FAMILIES[fname], "seed": args.family_seed}, "calibration": calibration, "methods": methods,
            "per_seed": per_seed, "prior": prior, "selection": selection, "timing": timing, "notes": notes}  # fmt: skip


def summarise(result: dict[str, Any], methods: list[str]) -> None:
    """Add 95 % t-intervals across seeds and paired differences ABMLL − each baseline."""
    intervals, paired = {}, {}
    for k, by_method in result["per_seed"].items():
        kept = {m: [s for s, cell in v.items() if cell is not None] for m, v in by_method.items()}
        intervals[k] = {
            m: {x: mean_interval([by_method[m][s][x] for s in seeds]) for x in METRICS} if seeds else None
            for m, seeds in kept.items()
        }
        if "abmll" in by_method:
            a = by_method["abmll"]
            paired[k] = {}
            for b in methods:
                both = [s for s in kept["abmll"] if s in kept[b]]
                if b != "abmll" and both:
                    paired[k][b] = {x: mean_interval([a[s][x] - by_method[b][s][x] for s in both]) for x in METRICS}
    result["interval"], result["paired"] = intervals, paired
    prior = {}
    for name, by_seed in result["prior"].items():
        prior[name] = {x: mean_interval(f[x] for f in by_seed.values()) for x in ("kl_fraction", "mean_distance")}
        if name == "abmll":
            layers = next(iter(by_seed.values()))["sigma"]
            prior[name]["sigma"] = {n: mean_interval(f["sigma"][n] for f in by_seed.values()) for n in layers}
            prior[name]["sigma_all"] = mean_interval(f["sigma_all"] for f in by_seed.values())
        curves = [f["curve"] for f in by_seed.values() if f.get("curve")]
        if curves:  # the mean over seeds at each recorded step (of the seeds that reached it)
            steps = sorted({p["step"] for c in curves for p in c})
            keys = ("outer_nll", "kl_fraction", "sigma_all") if name == "abmll" else ("outer_nll", "kl_fraction")
            prior[name]["curve"] = [
                {"step": st, **{x: mean_interval(p[x] for c in curves for p in c if p["step"] == st) for x in keys}}
                for st in steps
            ]
    result["prior_interval"] = prior


def sigma_ratio(results: dict[str, Any]) -> dict[str, Any] | None:
    """ABMLL's entry-weighted mean σθ on the spread family over that on the identical family, per seed (the
    same seed meta-trains both), with its 95 % t-interval; None unless both families ran ABMLL."""
    try:
        spread, identical = results["spread"]["prior"]["abmll"], results["identical"]["prior"]["abmll"]
    except KeyError:
        return None
    per_seed = {s: spread[s]["sigma_all"] / identical[s]["sigma_all"] for s in spread if s in identical}
    return {"per_seed": per_seed, "interval": mean_interval(per_seed.values())} if per_seed else None


def fmt(i: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
    if i["n"] == 1:
        return f"{i['mean'] * scale:.{digits}f}"
    return f"{i['mean'] * scale:.{digits}f} [{i['low'] * scale:.{digits}f}, {i['high'] * scale:.{digits}f}]"


SCALE = {"nll": (1.0, 3), "ece": (100.0, 1), "accuracy": (1.0, 3), "kl_task": (1.0, 3)}
HEAD = "| NLL | ECE (%) | accuracy | KL(task teacher ‖ model) |"


def family_lines(fname: str, result: dict[str, Any], methods: list[str]) -> list[str]:
    cal = result["calibration"]
    lines = [
        f"### Family `{fname}` ({', '.join(f'{k} = {v}' for k, v in result['family'].items())})",
        "",
        f"KL(mean teacher ‖ base) on the probe inputs: {cal['kl_mean_teacher_to_base']:.3f} nats.",
        "",
    ]
    selection = result.get("selection") or {}
    for k, table in result["interval"].items():
        chosen = selection.get(k, {})
        alpha = " test-time α (per seed) |" if chosen else ""
        lines += [f"{k}: mean over tasks, 95 % t-interval over seeds", "", "| method " + HEAD + alpha,
                  "|---" * (5 + bool(chosen)) + "|"]  # fmt: skip
        for m in [*methods, *REFERENCES]:
            cells = " | ".join(fmt(table[m][x], *SCALE[x]) if table[m] else "—" for x in METRICS)
            if chosen:
                cells += " | " + (", ".join(f"{v['lr']:g}" for v in chosen[m].values()) if m in chosen else "—")
            lines.append(f"| {m if m in methods else f'*{m}* (reference)'} | {cells} |")
        lines.append("")
        if chosen:
            grid = list(next(iter(next(iter(chosen.values())).values()))["val_nll"])
            lines += [
                f"{k}: mean NLL on the meta-validation tasks at each test-time α (mean over seeds); the "
                "lowest, per seed, is the α used on the test tasks",
                "",
                "| method | " + " | ".join(f"α = {a:g}" for a in grid) + " |",
                "|---" * (len(grid) + 1) + "|",
            ]
            for m, by_seed in chosen.items():
                vals = [sum(v["val_nll"][a] for v in by_seed.values()) / len(by_seed) for a in grid]
                lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
            lines.append("")
        if result["paired"].get(k):
            lines += [f"{k}: paired differences ABMLL − baseline (same episodes, per seed)", ""]
            lines += ["| baseline " + HEAD, "|---" * 5 + "|"]
            for b, d in result["paired"][k].items():
                lines.append(f"| {b} | " + " | ".join(fmt(d[x], *SCALE[x]) for x in METRICS) + " |")
            lines.append("")
    lines += [
        "Prior recovery (no adaptation): KL(mean teacher ‖ model at μθ) / KL(mean teacher ‖ base), and "
        "‖μθ − M‖ / ‖M‖ averaged over the adapted layers",
        "",
        "| method | KL fraction | ‖μθ − M‖ / ‖M‖ |",
        "|---|---|---|",
    ]
    for m, p in result["prior_interval"].items():
        lines.append(f"| {m} | {fmt(p['kl_fraction'])} | {fmt(p['mean_distance'])} |")
    if "abmll" in result["prior_interval"]:
        sigma = result["prior_interval"]["abmll"]["sigma"]
        lines += ["", f"ABMLL's mean σθ per adapted layer (σ_init = {cal['sigma_init']:g}):", "",
                  "| layer | mean σθ |", "|---|---|"]  # fmt: skip
        lines += [f"| `{n}` | {fmt(v, digits=5)} |" for n, v in sigma.items()]
        lines.append(f"| all entries | {fmt(result['prior_interval']['abmll']['sigma_all'], digits=5)} |")
    for m, p in result["prior_interval"].items():
        if p.get("curve"):
            lines += ["", f"{m} over meta-training (mean over seeds; outer NLL averaged over the steps since the "
                      "previous row; KL fraction of the model at μθ):", "",
                      "| meta-step | outer NLL | KL fraction |" + (" mean σθ |" if m == "abmll" else ""),
                      "|---" * (3 + (m == "abmll")) + "|"]  # fmt: skip
            for point in p["curve"]:
                row = f"| {point['step']} | {fmt(point['outer_nll'])} | {fmt(point['kl_fraction'])} |"
                lines.append(row + (f" {fmt(point['sigma_all'], digits=5)} |" if m == "abmll" else ""))
    return lines + ["", *(f"- note: {note}" for note in result["notes"]), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a small run: {QUICK}")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", default=["abmll", "structured-lora", "lora-task"])
    parser.add_argument("--steps", type=int, default=500, help="meta-steps of each meta-learned method")
    parser.add_argument("--train-tasks", type=int, default=64, help="meta-training tasks per family")
    parser.add_argument("--train-extra", type=int, default=16, help="examples per meta-training task beyond k + query")
    parser.add_argument(
        "--fresh-tasks",
        action="store_true",
        help="meta-train on new tasks drawn at every meta-step (no example seen twice) instead of --train-tasks",
    )
    parser.add_argument("--test-tasks", type=int, default=200, help="unseen tasks per family")
    parser.add_argument("--shots", type=int, nargs="+", default=[4, 16], help="k of the test support sets")
    parser.add_argument("--query", type=int, default=16, help="query examples per unseen task")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 13, 21])
    parser.add_argument("--family-seed", type=int, default=0, help="the families' seed (M, the E_i, examples)")
    parser.add_argument("--probe", type=int, default=256, help="fresh inputs of the prior-recovery figures")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override FIELD=VALUE")
    parser.add_argument("--name", default="", help="a suffix of this run's section and JSON file (a second run)")
    parser.add_argument(
        "--family-methods",
        action="append",
        default=[],
        metavar="FAMILY=METHOD,...",
        help="the methods of one family instead of --methods, e.g. identical=abmll",
    )
    parser.add_argument(
        "--curve",
        type=int,
        default=0,
        metavar="N",
        help="every N meta-steps record the outer NLL, the KL fraction at μθ and ABMLL's mean σθ",
    )
    parser.add_argument(
        "--select-test-lr",
        type=float,
        nargs="+",
        default=None,
        metavar="α",
        help="choose each method's test-time α (per seed and k) among these by the mean NLL on "
        "meta-validation tasks of the family; the test tasks are then scored at that α",
    )
    parser.add_argument("--val-tasks", type=int, default=32, help="meta-validation tasks per family (--select-test-lr)")
    parser.add_argument("--json", type=Path, default=None, help=f"write the results here (--write: {JSON_PATH.name})")
    args = parse_args(parser)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.family_methods = {f: m.split(",") for f, _, m in (x.partition("=") for x in args.family_methods)}
    record = Record()
    config = ABMLLConfig().override(parse_sets(args.sets))
    results = {}
    for fname in args.families:
        results[fname] = run_family(fname, args, config, lambda msg: print(msg, file=sys.stderr, flush=True))
        summarise(results[fname], results[fname]["methods"])
    record.stop()
    run = {
        "families": args.families, "methods": args.methods, "steps": args.steps, "train_tasks": args.train_tasks,
        "train_examples": config.meta.support_size + config.meta.query_size + args.train_extra,
        "test_tasks": args.test_tasks, "shots": args.shots, "query": args.query, "seeds": args.seeds,
        "fresh_tasks": args.fresh_tasks, "family_seed": args.family_seed, "probe": args.probe,
        "overrides": parse_sets(args.sets),
        "family_methods": args.family_methods, "curve": args.curve, "select_test_lr": args.select_test_lr,
        "val_tasks": args.val_tasks if args.select_test_lr else 0,
    }  # fmt: skip
    inner, lora = config.inner, config.lora
    lines = [
        *record.header(
            "Synthetic task family: ABMLL vs its deterministic twins on tasks with known teachers"
            + ("" if args.families == list(FAMILIES) else f" ({', '.join(args.families)})"),
            f"- versions: {', '.join(f'{k} {v}' for k, v in versions().items())}",
        ),
        f"- run: {json.dumps(run)}; total {record.elapsed():.0f} s",
        f"- config (library defaults{' + ' + json.dumps(run['overrides']) if args.sets else ''}): meta-training "
        f"{config.meta.meta_batch_size} tasks × ({config.meta.support_size} support + {config.meta.query_size} query) "
        f"per meta-step, K = {inner.inner_steps}, K_test = {inner.test_inner_steps}, α = {inner.inner_lr}, "
        f"β = {config.objective.beta:g}, outer lr {config.meta.outer_lr:g}, rank {lora.rank}, σ = "
        f"{lora.sigma_transform}, σ_init = {lora.sigma_init:g}, predict {config.predict.mode} (S = "
        f"{config.predict.samples}); each method with its own preset (`abmll.methods.method_config`)",
        "- every unseen task: a k-shot support set and a query set drawn with the seed (`make_episode`); the seed "
        "also seeds θ's initialisation, the meta-batches and ε",
        "",
    ]
    if args.fresh_tasks:
        lines[-1:-1] = [
            f"- meta-training tasks: {config.meta.meta_batch_size} new tasks at every meta-step (indices from "
            f"{FRESH:,}; {config.meta.support_size} + {config.meta.query_size} examples each, drawn with the seed), "
            "so no example is seen twice; `train_tasks` only offsets the test tasks' indices"
        ]
    if args.select_test_lr:
        lines[-1:-1] = [
            f"- test-time α of each method, seed and k: the one of {args.select_test_lr} with the lowest "
            f"mean NLL on {args.val_tasks} meta-validation tasks of the family (their own teachers, "
            "disjoint from the training and test tasks; episodes drawn like the test tasks')"
        ]
    for fname, result in results.items():
        lines += family_lines(fname, result, result["methods"])
    ratio = sigma_ratio(results)
    if ratio is not None:
        results["sigma_ratio"] = ratio
        per = ", ".join(f"{v:.2f}" for v in ratio["per_seed"].values())
        lines += ["### σθ: spread family against identical family", "",
                  f"ABMLL's entry-weighted mean σθ on the spread family / on the identical family, per seed ({per}): "
                  f"{fmt(ratio['interval'], digits=2)} (95 % t-interval over seeds).", ""]  # fmt: skip
    # One section (and JSON file) per set of families, so that the families can run as separate processes.
    suffix = "" if args.families == list(FAMILIES) else "_" + "_".join(args.families)
    suffix += f"_{args.name}" if args.name else ""
    emit(SECTION + suffix, lines, args.write)
    path = args.json or (JSON_PATH.with_name(f"{JSON_PATH.stem}{suffix}.json") if args.write else None)
    if path is not None:
        payload = {"date": record.date, "command": record.command, "versions": versions(), "run": run,
                   "config": config.to_dict(), "results": results}  # fmt: skip
        path.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    print(f"done at {record.elapsed():.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
