"""Reliability of a meta-training run, on a tiny random Llama on the CPU, deterministic:

- ``abmll train`` killed with SIGKILL at three seeded random points and resumed ends with a θ bitwise equal
  to an uninterrupted run's (and the same log); while it runs, a second run into its folder fails at once;
- a truncated or altered latest checkpoint fails its checksum: the previous one is used, with a warning;
- a NaN injected into the loss stops training with one clear error and leaves the last checkpoint intact
  (or, with ``meta.nonfinite = skip``, the step is skipped and counted);
- SIGINT / SIGTERM write a checkpoint and exit with 130 / 143 and one clear line;
- a held ``OUT/.lock`` stops a second run before it loads anything;
- RNG states are restored on resume; a failed checkpoint write leaves the previous one; no pickle anywhere.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_process, ok, save_tiny, write_families
from safetensors.torch import load_file
from typer.testing import CliRunner

from abmll.checkpoint import PRIOR_FILE, TRAINER_JSON, TRAINER_TENSORS, load_checkpoint, save_checkpoint
from abmll.cli import app
from abmll.config import ABMLLConfig
from abmll.methods.abmll import ABMLL

#: The same thread count as the subprocesses: CPU kernels then reduce in the same order.
pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = [f"fam{i}" for i in range(4)]
STEPS = 10
FAST = {
    "inner": {"inner_steps": 1, "test_inner_steps": 1},
    "meta": {"meta_batch_size": 2, "micro_batch_size": 16, "support_size": 8, "query_size": 8},
    "lora": {"rank": 2},
    "predict": {"samples": 2},
}
#: Kill points of the SIGKILL test: three distinct meta-steps drawn with a fixed seed.
KILL_STEPS = sorted(random.Random(2024).sample(range(2, STEPS - 2), 3))
#: Run by ``abmll train`` in a fresh process with the settings of this test process (:func:`cli_process`). From
#: meta-step ``hold`` on it sleeps instead of training, so that it cannot finish before the test kills it; this
#: changes the timing only, never a number.
HOLD_META_STEP = """
from abmll.methods.abmll import ABMLL
hold, real = int(sys.argv[1]), ABMLL.meta_step
def meta_step(self, episodes):
    if self.step >= hold:
        time.sleep(600)
    return real(self, episodes)
ABMLL.meta_step = meta_step
"""

runner = CliRunner()


@dataclass
class Env:
    root: Path
    model: Path
    data: Path
    fast: Path

    def args(self, out: Path, *extra, steps: int = STEPS) -> list[str]:
        argv = [
            "train", "--model", self.model, "--data", self.data, "--tasks", ",".join(TASKS), "--out", out,
            "--steps", steps, "--config", self.fast, "--set", "meta.checkpoint_every=1", "--device", "cpu", *extra,
        ]  # fmt: skip
        return [str(a) for a in argv]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("rel")
    save_tiny(root)
    write_families(root / "data", TASKS, 24)
    (root / "fast.json").write_text(json.dumps(FAST))
    return Env(root, root / "tiny", root / "data", root / "fast.json")


def invoke(args: list[str]):
    return runner.invoke(app, args)


def theta(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / PRIOR_FILE))


def assert_same_theta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def one_line(result, prefix: str = "error:") -> str:
    lines = [line for line in result.output.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def reference(env) -> Path:
    """An uninterrupted run of STEPS meta-steps."""
    out = env.root / "reference"
    ok(invoke(env.args(out)))
    return out


def assert_matches_reference(out: Path, reference: Path) -> None:
    assert_same_theta(theta(out / "final"), theta(reference / "final"))
    got, want = log(out), log(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["outer_nll"] for r in got] == [r["outer_nll"] for r in want]
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers


# ------------------------------------------------------------------------------------------ kill -9, resume


def wait_for_step(proc: subprocess.Popen, log_path: Path, step: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if log_path.exists():
            lines = log_path.read_text().splitlines()
            if any(line.endswith("}") and json.loads(line)["step"] >= step for line in lines):
                return
        time.sleep(0.01)
    raise AssertionError(f"step {step} never appeared in {log_path}")


@pytest.mark.parametrize("kill_step", KILL_STEPS)
def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(env, reference, tmp_path, kill_step):
    out = tmp_path / "run"
    with cli_process(HOLD_META_STEP, kill_step + 2, env.args(out)) as proc:
        wait_for_step(proc, out / "log.jsonl", kill_step)
        # While it runs, a second run into the same folder fails at once, naming the folder.
        second = invoke(env.args(out, "--resume"))
        assert second.exit_code == 2
        line = one_line(second)
        assert str(out) in line and "in use by another abmll run" in line
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()  # it was killed mid-run
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if line.endswith("}")]
    assert max(logged) >= kill_step

    ok(invoke(env.args(out, "--resume")))
    assert_matches_reference(out, reference)


def test_kill_steps_are_distinct_and_inside_the_run():
    assert len(set(KILL_STEPS)) == 3 and all(1 < s < STEPS - 1 for s in KILL_STEPS)


# ------------------------------------------------------------------------------------------ corrupt checkpoint


def interrupted_run(env, out: Path, at: int, monkeypatch, *extra) -> None:
    """Train until meta-step ``at`` is done, then raise KeyboardInterrupt (checkpoints every step)."""
    real = ABMLL.meta_step

    def stop(self, episodes):
        if self.step == at:
            raise KeyboardInterrupt
        return real(self, episodes)

    with monkeypatch.context() as m:
        m.setattr(ABMLL, "meta_step", stop)
        result = invoke(env.args(out, *extra))
    assert result.exit_code == 130, result.output


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize(
    ("damage", "file"),
    [(_truncate, PRIOR_FILE), (_flip_byte, TRAINER_TENSORS), (_flip_byte, TRAINER_JSON)],
    ids=["truncated-theta", "altered-optimizer-state", "altered-step"],
)
def test_corrupt_latest_checkpoint_is_detected_and_the_previous_one_used(
    env, reference, tmp_path, monkeypatch, caplog, damage, file
):
    out = tmp_path / "run"
    interrupted_run(env, out, 5, monkeypatch)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    damage(out / "checkpoints" / "step-000005" / file)

    with caplog.at_level("WARNING", logger="abmll.runner"):
        ok(invoke(env.args(out, "--resume")))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "step-000005" in warnings[0] and "checksum mismatch" in warnings[0] and file in warnings[0]
    assert "using the previous one" in warnings[0]
    assert_matches_reference(out, reference)  # resumed from step 4, so step 5 was taken again


def test_resume_removes_the_leftovers_of_an_interrupted_write(env, reference, tmp_path, monkeypatch, caplog):
    """What a kill in the middle of writing leaves: a temporary checkpoint folder and a log line cut short."""
    out = tmp_path / "run"
    interrupted_run(env, out, 5, monkeypatch)
    partial = out / "checkpoints" / ".step-000006.abc123"
    partial.mkdir()
    (partial / PRIOR_FILE).write_bytes(b"half")
    with open(out / "log.jsonl", "a") as fh:
        fh.write('{"step": 6, "outer_nl')
    with caplog.at_level("WARNING", logger="abmll.runner"):
        ok(invoke(env.args(out, "--resume")))
    assert any("dropping unreadable line 6" in r.getMessage() for r in caplog.records)
    assert not partial.exists()
    assert_matches_reference(out, reference)


def test_checkpoint_failing_its_checksum_is_refused_when_loaded(env, reference, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(reference / "final", folder)
    load_checkpoint(folder, trainer=True)  # intact: loads
    _truncate(folder / PRIOR_FILE)
    with pytest.raises(Exception, match="checksum mismatch") as info:
        load_checkpoint(folder)
    assert type(info.value).__name__ == "CheckpointError"


# ------------------------------------------------------------------------------------------ NaN / Inf guard


@pytest.fixture
def poison_loss_at(monkeypatch):
    """``poison_loss_at(n)`` multiplies every training loss of meta-step n (1-based) by NaN."""
    from abmll.scoring import Scorer

    real_step, real_nll, state = ABMLL.meta_step, Scorer.nll, {"on": False}

    def arm(n: int) -> None:
        def meta_step(self, episodes):
            state["on"] = self.step + 1 == n
            return real_step(self, episodes)

        def nll(self, model, examples):
            loss = real_nll(self, model, examples)
            return loss * float("nan") if state["on"] else loss

        monkeypatch.setattr(ABMLL, "meta_step", meta_step)
        monkeypatch.setattr(Scorer, "nll", nll)

    return arm


def test_nan_in_the_loss_stops_with_one_clear_error_and_keeps_the_last_checkpoint(
    env, reference, tmp_path, monkeypatch, poison_loss_at
):
    out = tmp_path / "run"
    poison_loss_at(4)
    result = invoke(env.args(out))
    monkeypatch.undo()
    assert result.exit_code == 2
    line = one_line(result)
    assert "meta-step 4" in line and "nan" in line and "meta.nonfinite" in line
    assert not (out / "final").exists()
    assert [r["step"] for r in log(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    last = load_checkpoint(out / "checkpoints" / "step-000003", trainer=True)  # verifies every checksum
    assert last["trainer_values"]["step"] == 3
    assert all(torch.isfinite(t).all() for t in last["theta"].values())
    # Intact: resumed without the NaN, it reaches the uninterrupted run's θ bit for bit.
    ok(invoke(env.args(out, "--resume")))
    assert_matches_reference(out, reference)


def test_nan_with_nonfinite_skip_skips_the_step_and_counts_it(env, tmp_path, monkeypatch, poison_loss_at):
    out = tmp_path / "run"
    poison_loss_at(4)
    ok(invoke(env.args(out, "--set", "meta.nonfinite=skip", steps=4)))
    records = log(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in records] == [0, 0, 0, 1]
    assert np.isnan(records[3]["outer_nll"]) and np.isnan(records[3]["grad_norm"])
    final = load_checkpoint(out / "final", trainer=True)
    before = load_checkpoint(out / "checkpoints" / "step-000003", trainer=True)
    assert final["trainer_values"]["skipped_steps"] == 1 and final["trainer_values"]["step"] == 4
    assert_same_theta(final["theta"], before["theta"])  # the skipped step left θ ...
    optimizer = {k: v for k, v in final["trainer_tensors"].items() if k.startswith("optimizer.")}
    assert optimizer
    for key, value in optimizer.items():  # ... and the optimiser state as they were
        assert torch.equal(value, before["trainer_tensors"][key]), key


def test_bad_nonfinite_value_is_rejected():
    with pytest.raises(Exception, match=r"'meta\.nonfinite' = 'ignore' is invalid.*'stop', 'skip'"):
        ABMLLConfig().override({"meta.nonfinite": "ignore"})


# ------------------------------------------------------------------------------------------ SIGINT / SIGTERM


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_writes_a_checkpoint_and_exits_non_zero(env, reference, tmp_path, monkeypatch, sig, code):
    out = tmp_path / "run"
    real, before = ABMLL.meta_step, signal.getsignal(sig)

    def signalled(self, episodes):
        if self.step == 2:  # during meta-step 3
            os.kill(os.getpid(), sig)
        return real(self, episodes)

    with monkeypatch.context() as m:
        m.setattr(ABMLL, "meta_step", signalled)
        result = invoke(env.args(out, "--set", "meta.checkpoint_every=50"))  # no periodic checkpoint
    assert result.exit_code == code
    line = one_line(result, "interrupted:")
    assert f"{sig.name} received" in line and "after meta-step 3 of 10" in line and "--resume" in line
    assert str(out / "checkpoints" / "step-000003") in line
    assert not (out / "final").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    assert load_checkpoint(out / "checkpoints" / "step-000003", trainer=True)["trainer_values"]["step"] == 3
    assert signal.getsignal(sig) == before  # the handlers are restored

    ok(invoke(env.args(out, "--resume")))
    assert_same_theta(theta(out / "final"), theta(reference / "final"))


def test_second_signal_interrupts_at_once_without_a_new_checkpoint(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = ABMLL.meta_step

    def signalled(self, episodes):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, episodes)

    with monkeypatch.context() as m:
        m.setattr(ABMLL, "meta_step", signalled)
        result = invoke(env.args(out))
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert not (out / "final").exists()


# ------------------------------------------------------------------------------------------ lock


def test_a_locked_output_folder_fails_at_once_naming_it(env, tmp_path, monkeypatch):
    import fcntl

    import abmll.models

    out = tmp_path / "busy"
    out.mkdir()

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the lock was checked")

    monkeypatch.setattr(abmll.models, "load_model", never)
    with open(out / ".lock", "w") as held:  # what another process's run holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = invoke(env.args(out))
    assert result.exit_code == 2
    line = one_line(result)
    assert str(out) in line and "in use by another abmll run" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_evaluate_and_compare_refuse_a_locked_output_folder(env, tmp_path, command):
    """``abmll evaluate`` and ``abmll compare`` take the same lock on ``--out`` as ``abmll train``."""
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    (out / "results.json").write_text("{}")  # another run's result: must survive the refused run
    common = ["--model", str(env.model), "--data", str(env.data), "--out", str(out)]
    if command == "evaluate":
        argv = ["evaluate", "--method", "zero-shot", "--tasks", TASKS[0], "--device", "cpu", *common]
    else:
        setting = tmp_path / "setting.json"
        setting.write_text(json.dumps({"train": TASKS[:2], "test": TASKS[2:3]}))
        argv = ["compare", "--methods", "zero-shot", "--preset", "smoke", "--setting", str(setting), *common]
    with open(out / ".lock", "w") as held:  # what another process's run holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = invoke(argv)
    assert result.exit_code == 2
    line = one_line(result)
    assert str(out) in line and "in use by another abmll run" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock", "results.json"]


# ------------------------------------------------------------------------------------------ a changed config


def test_resume_with_a_changed_config_is_refused_unless_allowed_and_then_recorded(env, tmp_path):
    """``--resume`` with another config names the fields and stops; ``--allow-config-change`` continues with
    it and records the change with its step in log.jsonl and config_history.jsonl."""
    out = tmp_path / "run"
    ok(invoke(env.args(out, steps=2)))
    before = {p.name: p.read_bytes() for p in (out / "final", out / "log.jsonl", out / "config.json") if p.is_file()}

    refused = invoke(env.args(out, "--resume", "--set", "inner.inner_lr=0.5", "--set", "objective.beta=0.5", steps=4))
    assert refused.exit_code == 2
    line = one_line(refused)
    assert "final" in line and "inner.inner_lr=0.1" in line and "inner.inner_lr=0.5" in line, line
    assert "objective.beta" in line and "--allow-config-change" in line, line
    assert {p.name: p.read_bytes() for p in (out / "log.jsonl", out / "config.json")} == {
        k: v for k, v in before.items() if k != "final"
    }
    assert [r["step"] for r in log(out)] == [1, 2]
    assert load_checkpoint(out / "final")["config"].inner.inner_lr == 0.1

    ok(invoke(env.args(out, "--resume", "--set", "inner.inner_lr=0.5", "--allow-config-change", steps=4)))
    rows = log(out)
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 4]
    assert rows[2] == {"step": 2, "event": "config_change", "changes": {"inner.inner_lr": {"from": 0.1, "to": 0.5}}}
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["config"]["inner"]["inner_lr"]) for h in history] == [(0, 0.1), (2, 0.5)]
    assert history[1]["changes"] == {"inner.inner_lr": {"from": 0.1, "to": 0.5}}
    assert load_checkpoint(out / "final")["config"].inner.inner_lr == 0.5

    # The run's length is not a config change; resuming with the config in force records nothing new.
    ok(invoke(env.args(out, "--resume", "--set", "inner.inner_lr=0.5", steps=5)))
    assert [r["step"] for r in log(out)] == [1, 2, 2, 3, 4, 5]
    assert len((out / "config_history.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------ RNG, atomic writes


def test_resume_restores_the_rng_states(env, tmp_path):
    """The global RNGs (torch, numpy, random) continue after a resume exactly where the checkpoint left them."""
    out = tmp_path / "run"
    ok(invoke(env.args(out, steps=2)))
    want = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    ok(invoke(env.args(out, "--resume", steps=2)))  # nothing left to train: restores, saves final again
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import abmll.checkpoint as ckpt_module

    config = ABMLLConfig()
    folder = tmp_path / "ckpt"
    old = {"m.A_mu": torch.ones(2, 3)}
    save_checkpoint(folder, old, config, {"method": "abmll", "model": "tiny"}, {}, {"step": 1})
    real = ckpt_module.save_file

    def fail_after_writing(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module, "save_file", fail_after_writing)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(folder, {"m.A_mu": torch.zeros(2, 3)}, config, {"method": "abmll", "model": "tiny"})
    assert_same_theta(load_checkpoint(folder, trainer=True)["theta"], old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left


def test_no_pickle_anywhere_in_the_library():
    """Only safetensors and JSON are loaded: no torch.load, pickle, dill or joblib in the source."""
    src = Path(__file__).resolve().parents[1] / "src" / "abmll"
    pattern = re.compile(
        r"torch\.load\(|^\s*(import|from)\s+(pickle|cPickle|cloudpickle|dill|joblib)\b|\bpickle\.|"
        r"allow_pickle\s*=\s*True|weights_only\s*=\s*False"
    )
    hits = [
        f"{path.relative_to(src)}:{n}: {line.strip()}"
        for path in sorted(src.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and "weights_only=True" not in line
    ]
    assert hits == []
