"""Progress without a terminal: ``train``, ``evaluate`` and ``compare`` run as real processes with standard error
to a file (as under nohup, a scheduler or CI) write one plain line per meta-step, per (task, seed) cell of an
evaluation and per comparison cell, each with the count, the elapsed time and the estimated remaining time, to
standard error and to ``OUT/progress.log``; on a terminal, bars (and the log)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import comparison_folder, write_whole_tasks
from rich.console import Console

import abmll.progress
from abmll.progress import PROGRESS_LOG, Reporter

#: One progress line: what, the count (with its unit), a note, the elapsed and the estimated remaining time.
LINE = re.compile(
    r"(?P<what>[^:]+): (?:(?P<unit>[a-z-]+) )?(?P<done>\d+)/(?P<total>\d+) \(\d+ %\)(?:, (?P<note>[^;]+))?; "
    r"elapsed \d+:\d\d:\d\d, remaining ~\d+:\d\d:\d\d"
)
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d "


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """tiny_comparison's model and data, two test tasks held in whole files, a setting and a fast config."""
    root = comparison_folder(tmp_path_factory.mktemp("progress"))
    write_whole_tasks(root / "data", ["ua", "ub"])
    return root


def run(tmp_path: Path, *args) -> list[str]:
    """``abmll ARGS`` in a new process with standard error to a file (not a terminal); its stderr lines."""
    stderr = tmp_path / f"stderr-{len(list(tmp_path.glob('stderr-*')))}.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(stderr, "w") as err:
        proc = subprocess.run(
            [sys.executable, "-c", "from abmll.cli import main; main()", *[str(a) for a in args]],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=600,
        )  # fmt: skip
    text = stderr.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text.splitlines()


def progress_lines(lines: list[str], what: str) -> list[re.Match]:
    return [m for m in map(LINE.fullmatch, lines) if m is not None and m["what"] == what]


def logged(out: Path) -> list[str]:
    """The lines of OUT/progress.log without their date and time (each must have one)."""
    lines = (out / PROGRESS_LOG).read_text().splitlines()
    assert all(re.match(STAMP, line) for line in lines), lines
    return [re.sub(STAMP, "", line, count=1) for line in lines]


def test_train_writes_a_line_per_meta_step_to_stderr_and_the_run_log(tiny, tmp_path):
    out = tmp_path / "run"
    common = ["--model", tiny / "tiny", "--data", tiny / "data", "--tasks", "fam0,fam1", "--out", out,
              "--config", tiny / "fast.json", "--device", "cpu"]  # fmt: skip
    lines = run(tmp_path, "train", *common, "--steps", 3)
    steps = progress_lines(lines, "meta-training abmll")
    assert [(m["unit"], int(m["done"]), int(m["total"])) for m in steps] == [("meta-step", n, 3) for n in (1, 2, 3)]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [m["note"] for m in steps] == [
        f"outer NLL {r['outer_nll']:.3f}, β·KL/NLL {r['beta_kl_over_nll']:.2g}" for r in log
    ]
    assert logged(out) == [m.string for m in steps]
    # resumed to 5 steps: two more lines, counted from where the run stands; the log is appended to
    more = progress_lines(run(tmp_path, "train", *common, "--steps", 5, "--resume"), "meta-training abmll")
    assert [(int(m["done"]), int(m["total"])) for m in more] == [(4, 5), (5, 5)]
    assert logged(out) == [m.string for m in steps + more]


def test_evaluate_writes_a_line_per_task_and_seed(tiny, tmp_path):
    out = tmp_path / "eval"
    lines = run(
        tmp_path, "evaluate", "--method", "zero-shot", "--model", tiny / "tiny", "--data", tiny / "data",
        "--tasks", "ua,ub", "--k", 2, "--seeds", "100,13", "--out", out, "--device", "cpu",
    )  # fmt: skip
    cells = progress_lines(lines, "evaluating zero-shot")
    assert [(m["unit"], int(m["done"]), int(m["total"]), m["note"]) for m in cells] == [
        ("cell", 1, 4, "ua seed 100"), ("cell", 2, 4, "ua seed 13"), ("cell", 3, 4, "ub seed 100"),
        ("cell", 4, 4, "ub seed 13"),
    ]  # fmt: skip
    assert logged(out) == [m.string for m in cells]


def test_compare_writes_a_line_per_cell_meta_step_and_evaluation_cell(tiny, tmp_path):
    out = tmp_path / "cmp"
    lines = run(
        tmp_path, "compare", "--methods", "zero-shot,abmll", "--preset", "smoke", "--model", tiny / "tiny",
        "--data", tiny / "data", "--setting", tiny / "setting.json", "--k", 4, "--out", out, "--device", "cpu",
    )  # fmt: skip
    cells = progress_lines(lines, "comparing")
    assert [(m["unit"], int(m["done"]), int(m["total"])) for m in cells] == [("cell", 1, 2), ("cell", 2, 2)]
    assert re.fullmatch(r"zero-shot seed 100 finished in \d+:\d\d:\d\d", cells[0]["note"])
    assert re.fullmatch(r"abmll seed 100 finished in \d+:\d\d:\d\d", cells[1]["note"])
    steps = progress_lines(lines, "meta-training abmll seed 100")
    assert [(m["unit"], int(m["done"]), int(m["total"])) for m in steps] == [("meta-step", 1, 2), ("meta-step", 2, 2)]
    for method in ("zero-shot", "abmll"):
        (cell,) = progress_lines(lines, f"evaluating {method} seed 100")
        assert (cell["unit"], cell["done"], cell["total"], cell["note"]) == ("cell", "1", "1", "unseen seed 100")
    every = [line for line in lines if LINE.fullmatch(line)]
    assert len(every) == 2 + 2 + 2 and logged(out) == every


def test_the_estimate_is_the_mean_time_per_item_times_the_items_left(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(abmll.progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    err = io.StringIO()
    with Reporter(Console(file=err, width=300), tmp_path / "progress.log", plain=True) as report:
        job = report.add("meta-training abmll", total=4, unit="meta-step")
        for step, seconds in ((1, 10), (2, 20), (3, 30)):  # each meta-step takes 10 s
            now[0] = 100.0 + seconds
            report.update(job, step, note="outer NLL 0.5")
        report.update(job, 3)  # nothing new finished: no line
    assert err.getvalue().splitlines() == [
        "meta-training abmll: meta-step 1/4 (25 %), outer NLL 0.5; elapsed 0:00:10, remaining ~0:00:30",
        "meta-training abmll: meta-step 2/4 (50 %), outer NLL 0.5; elapsed 0:00:20, remaining ~0:00:20",
        "meta-training abmll: meta-step 3/4 (75 %), outer NLL 0.5; elapsed 0:00:30, remaining ~0:00:10",
    ]
    assert logged(tmp_path) == err.getvalue().splitlines()


def test_on_a_terminal_bars_are_drawn_and_the_lines_go_only_to_the_run_log(tmp_path):
    err = io.StringIO()
    console = Console(file=err, force_terminal=True, width=200)
    with Reporter(console, tmp_path / "progress.log") as report:
        assert not report.plain
        job = report.add("evaluating abmll", total=2, unit="cell")
        report.update(job, 0, note="rte seed 100")
        report.update(job, 1, note="rte seed 100")
        report.update(job, 2, note="rte seed 13")
    assert "━" in err.getvalue() and "elapsed" not in err.getvalue()  # a bar, no plain line
    assert [m["note"] for m in map(LINE.fullmatch, logged(tmp_path))] == ["rte seed 100", "rte seed 13"]


def test_a_disabled_reporter_writes_nothing(tmp_path):
    err = io.StringIO()
    with Reporter(Console(file=err), tmp_path / "progress.log", enabled=False, plain=True) as report:
        report.update(report.add("meta-training abmll", total=2, unit="meta-step"), 1)
    assert err.getvalue() == "" and not (tmp_path / "progress.log").exists()
