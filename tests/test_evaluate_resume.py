"""``abmll evaluate --resume``: every finished (task, seed) cell is kept on disk (written atomically), so an
evaluation killed with SIGKILL and resumed ends with results identical to an uninterrupted run's, without
predicting the kept cells again; a left-over partial evaluation is never silently replaced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import PAIRS, family_task
from typer.testing import CliRunner

from abmll.cli import app
from abmll.models import tiny_llama
from abmll.tasks.readers import write_metaicl_task

TEST_TASKS = ["unseen0", "unseen1"]
SEEDS = "100,13"
#: Runs ``abmll evaluate`` in a fresh process with one thread and deterministic algorithms; from the
#: ``hold``-th prediction on it sleeps instead, so that the test can kill it after the cells before it.
WRAPPER = """
import sys, time, torch
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True, warn_only=True)
from abmll.methods.abmll import ABMLL
hold, real, calls = int(sys.argv[1]), ABMLL.predict, []
def predict(self, *args, **kwargs):
    calls.append(1)
    if len(calls) >= hold:
        time.sleep(600)
    return real(self, *args, **kwargs)
ABMLL.predict = predict
from abmll.cli import main
sys.argv = ["abmll", *sys.argv[2:]]
main()
"""
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evres")
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    data = root / "data"
    for i in range(2):
        write_metaicl_task(family_task(f"fam{i}", PAIRS[2 * i : 2 * i + 2], 16, seed=i), data, 16384, 100)
    for i, name in enumerate(TEST_TASKS):
        task = family_task(name, PAIRS[4 + i :: 3], 24, seed=10 + i)
        path = write_metaicl_task(task, data, 4, 100, "test")
        path.rename(data / name / f"{name}.jsonl")
    fast = root / "fast.json"
    fast.write_text(json.dumps({"inner": {"inner_steps": 1, "test_inner_steps": 1}, "lora": {"rank": 2},
                                "meta": {"meta_batch_size": 2, "support_size": 4, "query_size": 4}}))  # fmt: skip
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
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, "3", *eval_args(env, out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(cells(out)) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the evaluation never finished two cells"
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
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
