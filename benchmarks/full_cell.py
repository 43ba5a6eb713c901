"""Benchmark: one whole ``full``-preset comparison cell (meta-training, then evaluation on every test task of the
built-in suite) with the exact speed-ups off and on, side by side in one run, and the numbers each gives.

Each cell is ``abmll compare --preset full --seeds 100 --methods M --out DIR`` in a child process on the embedded
SmolLM2-135M, one torch thread; "plain" adds ``--set scoring.shared_prefix=false --set
compute.merge_without_grad=false --set scoring.trunk_cache_mb=0 --set meta.group_by_length=false`` (every option
scored as a whole sequence, each weight sample through two products per adapted layer, σ ⊙ ε formed at every pass,
the frozen blocks run at every pass, micro-batches as the sets come), "fast" is the
library's defaults. The two variants of a method run at the same time (so that they share whatever else loads the
machine), and each is measured by the CPU seconds of its own process (user + system: the work it did, whatever
the load) beside its wall-clock seconds. The two cells' predictions are compared example by example (largest
difference of an option probability) and so are their per-task metrics. Run from the repository root::

    .venv/bin/python benchmarks/full_cell.py                 # print a Markdown section
    .venv/bin/python benchmarks/full_cell.py --write         # and replace its section in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Record, emit, parse_args

SECTION = "full_cell"
PLAIN = [
    "scoring.shared_prefix=false", "compute.merge_without_grad=false", "scoring.trunk_cache_mb=0",
    "meta.group_by_length=false",
]  # fmt: skip
METRICS = ("accuracy", "macro_f1", "ece", "nll", "brier")


def start_cell(method: str, out: Path, sets: list[str], threads: int, preset: str = "full") -> subprocess.Popen:
    """One cell in a child process."""
    abmll = Path(sys.executable).with_name("abmll")
    cmd = [str(abmll), "compare", "--preset", preset, "--seeds", "100", "--methods", method, "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)


def wait_cells(children: dict[str, subprocess.Popen], start: float) -> dict[str, dict[str, float]]:
    """Wait for the cells, in the order they end; each one's wall-clock seconds and the CPU seconds (user +
    system) of its process."""
    by_pid = {child.pid: name for name, child in children.items()}
    out = {}
    while by_pid:
        pid, status, usage = os.wait4(-1, 0)
        name = by_pid.pop(pid, None)
        if name is None:
            continue
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{children[name].args} failed with exit code {os.waitstatus_to_exitcode(status)}")
        children[name].returncode = 0
        out[name] = {"wall": time.perf_counter() - start, "cpu": usage.ru_utime + usage.ru_stime}
    return out


def cell_folder(out: Path, method: str) -> Path:
    return out / method / "seed-100"


def predictions(folder: Path) -> dict[tuple[str, str], list[float]]:
    rows = {}
    with open(folder / "predictions.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            rows[(row["task"], str(row["id"]))] = row["probs"]
    return rows


def differences(plain: Path, fast: Path) -> dict[str, float]:
    a, b = predictions(plain), predictions(fast)
    assert a.keys() == b.keys(), "the two cells predicted different examples"
    probs = max(abs(x - y) for key in a for x, y in zip(a[key], b[key], strict=True))
    top = sum(max(range(len(a[k])), key=a[k].__getitem__) != max(range(len(b[k])), key=b[k].__getitem__) for k in a)
    ra = json.loads((plain / "results.json").read_text())["tasks"]
    rb = json.loads((fast / "results.json").read_text())["tasks"]
    metric = max(abs(ra[t][m] - rb[t][m]) for t in ra for m in METRICS if m in ra[t] and ra[t][m] is not None)
    return {"examples": len(a), "probs": probs, "top_changed": top, "metric": metric}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["abmll", "icl"])
    args = parse_args(parser)
    record = Record()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:  # plain and fast side by side, at the same time
            start = time.perf_counter()
            children = {
                variant: start_cell(method, Path(tmp) / f"{method}-{variant}", sets, args.threads)
                for variant, sets in (("plain", PLAIN), ("fast", []))
            }
            seconds = wait_cells(children, start)
            print(f"{method}: {seconds}", file=sys.stderr)
            diff = differences(cell_folder(Path(tmp) / f"{method}-plain", method),
                               cell_folder(Path(tmp) / f"{method}-fast", method))  # fmt: skip
            rows.append((method, seconds, diff))
    record.stop()
    lines = [
        *record.header("A whole `full`-preset comparison cell with the exact speed-ups off and on"),
        "- cell: `abmll compare --preset full --seeds 100 --methods M` (built-in suite: meta-training on its 'train' "
        "tasks, then every 'test' task's 16-shot support set and up to 100 query questions), embedded SmolLM2-135M, "
        "float32, one torch thread, each cell in its own process (model load included); plain and fast of a method "
        "at the same time",
        f"- plain: `--set {' --set '.join(PLAIN)}`; fast: the defaults (shared prompt prefix, merged-weight "
        "sampling, micro-batches grouped by length; the trunk cache has nothing to cache with adapters on every "
        "block)",
        "",
        "| method | plain CPU | fast CPU | plain / fast (CPU) | wall plain / fast | predictions compared | "
        "largest Δ option probability | top option changed | largest Δ per-task metric |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, seconds, diff in rows:
        plain, fast = seconds["plain"], seconds["fast"]
        lines.append(
            f"| {method} | {plain['cpu']:.0f} s | {fast['cpu']:.0f} s | {plain['cpu'] / fast['cpu']:.2f}× | "
            f"{plain['wall']:.0f} s / {fast['wall']:.0f} s | {diff['examples']} | {diff['probs']:.2e} | "
            f"{diff['top_changed']} | {diff['metric']:.2e} |"
        )
    lines.append("")
    emit(SECTION, lines, args.write)
    print(f"done at {record.elapsed():.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
