"""Report figures and tables: reliability diagrams, training curves, and the comparison table.

Figures are drawn on :class:`matplotlib.figure.Figure` objects and saved with their own canvas, without pyplot:
importing this module leaves matplotlib's backend (e.g. a notebook's) as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from abmll.evaluation import format_metric, prediction_matrix
from abmll.metrics import reliability_bins


def reliability_diagram(predictions: list[dict[str, Any]], mean: dict[str, Any], path: str | Path, title: str) -> Path:
    """Accuracy against confidence in 15 bins, the predictions of every task and seed pooled, with the ideal
    diagonal and the bin counts; ``mean`` holds the macro-averaged ECE and accuracy for the title."""
    bins = reliability_bins(*prediction_matrix(predictions))
    fig = Figure(figsize=(4.2, 4.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    lows = [b["lower"] for b in bins if b["count"]]
    widths = [b["upper"] - b["lower"] for b in bins if b["count"]]
    accs = [b["accuracy"] for b in bins if b["count"]]
    ax.bar(lows, accs, width=widths, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    for b in bins:
        if b["count"]:
            ax.text(b["lower"] + (b["upper"] - b["lower"]) / 2, 0.02, str(b["count"]), ha="center", fontsize=6)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.set_title(f"{title}\nECE {100 * mean['ece']:.1f} %, accuracy {mean['accuracy']:.3f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


#: The panels of :func:`training_curves`: (title, what is read from a meta-step's log line).
CURVES = (
    ("outer NLL (query)", lambda r: r.get("outer_nll")),
    ("support NLL: before (dashed) / after the inner loop", None),
    ("β·KL / NLL", lambda r: r.get("beta_kl_over_nll")),
    ("meta-validation NLL", lambda r: (r.get("validation") or {}).get("dev_nll")),
    ("mean σθ (at validations)", lambda r: (r.get("validation") or {}).get("sigma_theta")),
)


def _read_log(file: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(file).read_text().splitlines() if line.strip()]
    return [r for r in rows if "outer_nll" in r]  # meta-step records (not e.g. a config change)


def training_curves(logs: dict[str, list[Path]], path: str | Path) -> Path | None:
    """Learning curves of every method that meta-trains, one line per seed: outer NLL, the support NLL before and
    after the inner loop, β·KL/NLL, and (for runs that validate, ``meta.validate_every``) the meta-validation NLL
    and the mean σθ. Panels with nothing to draw are left out."""
    logs = {name: [_read_log(f) for f in files] for name, files in logs.items() if files}
    if not logs:
        return None
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]

    def points(rows, read):
        pairs = [(r["step"], read(r)) for r in rows if read(r) is not None]
        return [s for s, _ in pairs], [v for _, v in pairs]

    panels = []
    for title, read in CURVES:
        reads = [lambda r: r.get("support_nll_first"), lambda r: r.get("support_nll_last")] if read is None else [read]
        if any(points(rows, rd)[0] for runs in logs.values() for rows in runs for rd in reads):
            panels.append((title, reads))
    fig = Figure(figsize=(4.2 * min(len(panels), 3), 3.4 * ((len(panels) + 2) // 3)))
    axes = fig.subplots((len(panels) + 2) // 3, min(len(panels), 3), squeeze=False).flatten()
    for ax, (title, reads) in zip(axes, panels, strict=False):
        for colour, (name, runs) in zip(colours, logs.items(), strict=False):
            for i, rows in enumerate(runs):
                for j, read in enumerate(reads):
                    steps, values = points(rows, read)
                    style = "--" if len(reads) > 1 and j == 0 else "-"
                    marker = "o" if len(steps) < 30 else None
                    label = name if i == 0 and j == len(reads) - 1 else None
                    ax.plot(steps, values, style, marker=marker, markersize=3, color=colour, alpha=0.8, label=label)
        ax.set(xlabel="meta-step", title=title)
        ax.title.set_fontsize(9)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def coverage_plot(covered: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Each test task as a point: KL(q_φ ‖ p_θ) after adaptation against the accuracy gain over zero-shot (0 where
    there is no zero-shot cell), one colour per Bayesian method, tasks labelled."""
    fig = Figure(figsize=(5.2, 3.8))
    ax = fig.subplots()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (name, rows) in zip(colours, covered.items(), strict=False):
        xs = [r["posterior_kl"] for r in rows]
        ys = [r["accuracy_gain"] or 0.0 for r in rows]
        ax.scatter(xs, ys, color=colour, label=name, s=18)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(r["task"], (x, y), fontsize=6, alpha=0.8)
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set(xlabel="KL(q_φ ‖ p_θ) after adaptation", ylabel="accuracy − zero-shot", title="Coverage per test task")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def comparison_table(results: dict[str, dict[str, Any]]) -> str:
    """Per task and mean: accuracy and ECE (%) of every method side by side (± 95 % interval over seeds)."""
    methods = list(results)
    tasks = list(next(iter(results.values()))["tasks"])

    header = "| task | " + " | ".join(f"{m} acc | {m} ECE %" for m in methods) + " |"
    lines = [header, "|---|" + "---|---|" * len(methods)]
    for name in tasks + ["**mean**"]:
        cells = []
        for m in methods:
            row = results[m]["mean"] if name == "**mean**" else results[m]["tasks"].get(name, {})
            cells += [format_metric(row, "accuracy", 1, 3), format_metric(row, "ece", 100, 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
