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


def training_curves(logs: dict[str, list[Path]], path: str | Path) -> Path | None:
    """Outer NLL per meta-step for every method that meta-trains (one line per seed)."""
    logs = {name: files for name, files in logs.items() if files}
    if not logs:
        return None
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (name, files) in zip(colours, logs.items(), strict=False):
        for i, file in enumerate(files):
            rows = [json.loads(line) for line in Path(file).read_text().splitlines() if line.strip()]
            rows = [r for r in rows if "outer_nll" in r]  # meta-step records (not e.g. a config change)
            ax.plot(
                [r["step"] for r in rows],
                [r["outer_nll"] for r in rows],
                color=colour,
                alpha=0.8,
                label=name if i == 0 else None,
            )
    ax.set(xlabel="meta-step", ylabel="outer NLL (query)", title="Meta-training")
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
