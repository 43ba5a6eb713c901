"""``abmll evaluate --resume``: every finished (task, seed) cell is kept on disk (written atomically), so an
evaluation killed with SIGKILL and resumed ends with results identical to an uninterrupted run's, without
predicting the kept cells again; a left-over partial evaluation is never silently replaced."""

from __future__ import annotations

import json
import signal
import time

import pytest
from conftest import FAST, cli_process, ok, save_tiny, write_families, write_whole_tasks
from typer.testing import CliRunner

from abmll.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
TEST_TASKS = ["unseen0", "unseen1"]
SEEDS = "100,13"
#: Run by ``abmll evaluate`` in a fresh process (:func:`cli_process`): from the ``hold``-th prediction on it
#: sleeps instead, so that the test can kill it after the cells before it.
HOLD_PREDICTION = """
from abmll.methods.abmll import ABMLL
hold, real, calls = int(sys.argv[1]), ABMLL.predict, []
def predict(self, *args, **kwargs):
    calls.append(1)
    if len(calls) >= hold:
        time.sleep(600)
    return real(self, *args, **kwargs)
ABMLL.predict = predict
"""
runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evres")
    save_tiny(root)
    data = root / "data"
    write_families(data, ["fam0", "fam1"], 16)
    write_whole_tasks(data, TEST_TASKS)
    fast = root / "fast.json"
    fast.write_text(json.dumps(FAST))
    ok(runner.invoke(app, [str(a) for a in (
        "train", "--model", root / "tiny", "--data", data, "--tasks", "fam0,fam1", "--out", root / "run",
        "--steps", 2, "--config", fast, "--device", "cpu",
    )]))  # fmt: skip
    return root


def eval_args(env, out, *extra) -> list[str]:
    return [str(a) for a in (
        "evaluate", "--checkpoint", env / "run" / "final", "--data", env / "data", "--tasks", ",".join(TEST_TASKS),
        "--k", 4, "--seeds", SEEDS, "--query-size", 6, "--out", out, "--device", "cpu", *extra,
    )]  # fmt: skip


def cells(out) -> list[str]:
    folder = out / ".partial"
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".jsonl")) if folder.is_dir() else []


def test_sigkill_then_resume_gives_the_results_of_an_uninterrupted_run(env, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    ok(runner.invoke(app, eval_args(env, straight)))
    assert not (straight / ".partial").exists()  # removed once results.json is written

    out = tmp_path / "killed"
    with cli_process(HOLD_PREDICTION, 3, eval_args(env, out)) as proc:
        deadline = time.monotonic() + 300
        while len(cells(out)) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the evaluation never finished two cells"
            time.sleep(0.05)
        time.sleep(0.2)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists() and cells(out) == ["unseen0.seed-100.jsonl", "unseen0.seed-13.jsonl"]

    again = runner.invoke(app, eval_args(env, out))  # without --resume: refused, nothing removed
    assert again.exit_code == 2 and "--resume" in again.output and ".partial" in again.output
    assert len(cells(out)) == 2
    other = runner.invoke(app, eval_args(env, out, "--resume", "--query-size", 5))
    assert other.exit_code == 2 and "query_size" in other.output and len(cells(out)) == 2

    from abmll.methods.abmll import ABMLL

    real, calls = ABMLL.predict, []

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ABMLL, "predict", counting)
    result = runner.invoke(app, eval_args(env, out, "--resume"))
    ok(result)
    assert len(calls) == 2 and "2 (task, seed) cell(s) kept" in result.output  # only the two unfinished cells
    assert (out / "predictions.jsonl").read_text() == (straight / "predictions.jsonl").read_text()
    assert json.loads((out / "results.json").read_text()) == json.loads((straight / "results.json").read_text())
    assert not (out / ".partial").exists()
