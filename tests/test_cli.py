"""The ``abmll`` command line end to end on a tiny random Llama: train → evaluate with the documented results
schema, resume (after a finished shorter run and after an interrupt) matching a straight run bit for bit, an
interrupted evaluation leaving no results.json, and a table of malformed inputs that each give exit status 2
and one clear error line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import PAIRS, family_task, invoke, ok, save_tiny, write_families, write_unseen
from safetensors.torch import load_file

from abmll.checkpoint import PRIOR_FILE, load_checkpoint
from abmll.metrics import expected_calibration_error

TRAIN_TASKS = [f"fam{i}" for i in range(4)]
TEST_TASK = "unseen"
SEEDS = (100, 13)
K, N_QUERY, N_TRAIN = 8, 12, 24
METRICS01 = ("accuracy", "macro_f1", "ece", "mce", "majority_accuracy", "top_prediction_share")
#: Settings that make a meta-step take a fraction of a second on the tiny model.
FAST = {
    "inner": {"inner_steps": 1, "test_inner_steps": 1},
    "meta": {"meta_batch_size": 2, "micro_batch_size": 16},
    "lora": {"rank": 2},
    "predict": {"samples": 2},
}


def _write_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class Env:
    root: Path
    model: Path
    data: Path
    setting: Path
    fast: Path

    def train_args(self, out: Path, steps: int, *extra) -> list:
        return [
            "train", "--model", self.model, "--data", self.data, "--setting", self.setting, "--out", out,
            "--steps", steps, "--config", self.fast, "--set", "meta.checkpoint_every=3",
            "--set", "meta.support_size=8", "--set", "meta.query_size=8", "--device", "cpu", *extra,
        ]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("cli")
    save_tiny(root)
    data = root / "data"
    write_families(data, TRAIN_TASKS, N_TRAIN)
    write_unseen(data, K, K + N_QUERY, SEEDS, TEST_TASK)
    # A task held in one whole file ({task}.jsonl), sampled into episodes: 10 examples.
    small = family_task("small", PAIRS[:2], 10, seed=5)
    _write_lines(
        data / "small" / "small.jsonl",
        [{"task": "small", "input": e.input, "output": e.answer, "options": list(e.options)} for e in small.examples],
    )
    setting = root / "setting.json"
    setting.write_text(json.dumps({"train": TRAIN_TASKS, "test": [TEST_TASK]}))
    fast = root / "fast.json"
    fast.write_text(json.dumps(FAST))
    return Env(root, root / "tiny", data, setting, fast)


@pytest.fixture(scope="module")
def trained(env) -> Path:
    """A straight 6-step run (checkpoint at step 3) into RUN."""
    out = env.root / "run"
    ok(invoke(*env.train_args(out, 6)))
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _theta(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / PRIOR_FILE))


def _assert_same_theta(a: Path, b: Path) -> None:
    ta, tb = _theta(a), _theta(b)
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


# ------------------------------------------------------------------------------------------ train → evaluate


def test_train_writes_config_log_checkpoints_and_final(trained):
    assert json.loads((trained / "config.json").read_text())["tasks"] == TRAIN_TASKS
    log = _log(trained)
    assert [r["step"] for r in log] == list(range(1, 7))
    for r in log:
        assert {"outer_nll", "kl", "beta_kl_over_nll"} <= r.keys()
        assert r["outer_nll"] > 0 and r["kl"] >= 0 and r["beta_kl_over_nll"] >= 0
    assert [p.name for p in (trained / "checkpoints").iterdir()] == ["step-000003"]
    final = load_checkpoint(trained / "final", trainer=True)
    assert final["info"]["method"] == "abmll" and final["trainer_values"]["step"] == 6
    assert final["config"].meta.meta_steps == 6 and final["config"].lora.rank == 2


def test_evaluate_checkpoint_results_schema_and_ece(env, trained):
    out = env.root / "ev"
    argv = [
        "evaluate", "--checkpoint", trained / "final", "--data", env.data, "--setting", env.setting,
        "--k", K, "--seeds", ",".join(map(str, SEEDS)), "--out", out, "--device", "cpu",
    ]  # fmt: skip
    ok(invoke(*argv))
    res = json.loads((out / "results.json").read_text())
    assert {"method", "model", "config", "versions", "k", "seeds", "tasks", "mean"} <= res.keys()
    assert res["method"] == "abmll" and res["model"] == str(env.model)
    assert res["k"] == K and res["seeds"] == list(SEEDS) and "torch" in res["versions"]
    assert res["config"]["lora"]["rank"] == 2 and res["config"]["inner"]["test_inner_steps"] == 1
    assert list(res["tasks"]) == [TEST_TASK]
    task = res["tasks"][TEST_TASK]
    assert {"n", "accuracy", "macro_f1", "ece", "mce", "nll", "brier", "majority_accuracy", "top_prediction_share",
            "auroc", "reliability", "per_seed", "interval"} <= task.keys()  # fmt: skip
    # query sets are disjoint across the seeds: each seed takes its part of the pooled test files
    sizes = {r["seed"]: r["query"] for r in res["query_sets"][TEST_TASK]["per_seed"]}
    assert list(sizes) == list(SEEDS) and task["n"] == sum(sizes.values()) / len(SEEDS)
    for row in (task, res["mean"], *task["per_seed"]):
        for key in METRICS01:
            assert 0.0 <= row[key] <= 1.0, key
        assert row["nll"] >= 0 and 0.0 <= row["brier"] <= 2.0
        assert row["auroc"] is None or 0.0 <= row["auroc"] <= 1.0
    assert [r["seed"] for r in task["per_seed"]] == list(SEEDS)
    for key in ("accuracy", "ece", "nll"):
        assert {"mean", "low", "high", "n"} <= task["interval"][key].keys() and task["interval"][key]["n"] == 2
        assert task["interval"][key]["mean"] == pytest.approx(task[key])
    assert res["mean"]["n_tasks"] == 1 and res["mean"]["accuracy"] == pytest.approx(task["accuracy"])
    assert sum(b["count"] for b in task["reliability"]) == sum(sizes.values())

    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == sum(sizes.values())
    eces = []
    for seed, reported in zip(SEEDS, task["per_seed"], strict=True):
        rows = [p for p in preds if p["task"] == TEST_TASK and p["seed"] == seed]
        assert len(rows) == sizes[seed] and all(len(p["probs"]) == 2 for p in rows)
        ece = expected_calibration_error([p["probs"] for p in rows], [p["gold"] for p in rows])
        assert ece == pytest.approx(reported["ece"], abs=1e-12)
        eces.append(ece)
    assert sum(eces) / len(eces) == pytest.approx(task["ece"], abs=1e-12)
    assert TEST_TASK in (out / "results.md").read_text()


def test_evaluate_zero_shot_without_checkpoint(env):
    out = env.root / "ev-zero"
    argv = [
        "evaluate", "--method", "zero-shot", "--model", env.model, "--data", env.data, "--tasks", "small",
        "--k", 4, "--seeds", "100,13", "--query-size", 5, "--out", out, "--device", "cpu",
    ]  # fmt: skip
    ok(invoke(*argv))
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "zero-shot" and res["checkpoint"] is None
    # 10 examples: two disjoint halves of 5, each less its seed's own 4 support examples drawn from the file
    sizes = [r["query"] for r in res["query_sets"]["small"]["per_seed"]]
    assert res["tasks"]["small"]["n"] == sum(sizes) / 2 and all(1 <= n <= 5 for n in sizes)
    assert 0.0 <= res["tasks"]["small"]["accuracy"] <= 1.0
    assert (out / "results.md").is_file()


# -------------------------------------------------------------------------------------------------- resume


def test_resume_a_finished_shorter_run_matches_a_straight_run(env, trained):
    out = env.root / "run-3"
    ok(invoke(*env.train_args(out, 3)))
    assert (out / "final").is_dir() and not (out / "checkpoints").exists()  # step 3 is the last: only final/
    # Mark the first run's log lines: a resumed run keeps them, a run restarted from scratch would not.
    marked = [{**r, "first_run": True} for r in _log(out)]
    _write_lines(out / "log.jsonl", marked)

    again = invoke(*env.train_args(out, 6))
    assert again.exit_code == 2 and "already holds a run" in again.output and "--resume" in again.output

    ok(invoke(*env.train_args(out, 6, "--resume")))
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 7))
    assert [r.get("first_run", False) for r in log] == [True] * 3 + [False] * 3
    assert [r["outer_nll"] for r in log[3:]] == [r["outer_nll"] for r in _log(trained)[3:]]
    _assert_same_theta(out / "final", trained / "final")

    # Resuming the finished run at the same --steps trains nothing more.
    ok(invoke(*env.train_args(out, 6, "--resume")))
    assert [r["step"] for r in _log(out)] == list(range(1, 7))
    _assert_same_theta(out / "final", trained / "final")


def test_resume_after_interrupt_matches_a_straight_run(env, trained, monkeypatch):
    from abmll.methods.abmll import ABMLL

    out = env.root / "run-int"
    real = ABMLL.meta_step

    def interrupt_at_4(self, episodes):
        if self.step == 4:
            raise KeyboardInterrupt
        return real(self, episodes)

    with monkeypatch.context() as m:
        m.setattr(ABMLL, "meta_step", interrupt_at_4)
        result = invoke(*env.train_args(out, 6, "--set", "meta.checkpoint_every=1"))
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output
    assert not (out / "final").exists()
    assert max(p.name for p in (out / "checkpoints").iterdir()) == "step-000004"  # resumed from here
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]

    ok(invoke(*env.train_args(out, 6, "--resume")))
    assert [r["step"] for r in _log(out)] == list(range(1, 7))
    _assert_same_theta(out / "final", trained / "final")


# --------------------------------------------------------------------------------- interrupted evaluation


def test_interrupted_evaluation_leaves_no_results_json(env, trained, monkeypatch):
    from abmll.methods.abmll import ABMLL

    out = env.root / "ev-int"
    out.mkdir()
    (out / "results.json").write_text('{"stale": true}\n')
    real, calls = ABMLL.predict, []

    def interrupt_second(self, adapted, query, seed):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, adapted, query, seed)

    monkeypatch.setattr(ABMLL, "predict", interrupt_second)
    result = invoke(
        "evaluate", "--checkpoint", trained / "final", "--data", env.data, "--setting", env.setting,
        "--k", K, "--seeds", "100,13", "--out", out, "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code != 0 and "interrupted" in result.output and "Traceback" not in result.output
    assert len(calls) == 2
    assert not (out / "results.json").exists()


# ------------------------------------------------------------------------------------------ malformed inputs


@dataclass
class Ctx:
    env: Env
    data: Path  # a private copy of the data folder, possibly altered
    tmp: Path
    run: Path  # the trained run

    def train(self, *extra) -> list:
        return [
            "train", "--model", self.env.model, "--data", self.data, "--setting", self.env.setting,
            "--out", self.tmp / "out", "--steps", 2, "--config", self.env.fast, "--device", "cpu", *extra,
        ]  # fmt: skip

    def evaluate(self, *extra, method: str | None = "zero-shot", setting: Path | None = None) -> list:
        return [
            "evaluate", "--model", self.env.model, "--data", self.data, "--setting", setting or self.env.setting,
            "--k", K, "--seeds", "100,13", "--out", self.tmp / "out", "--device", "cpu",
            *(["--method", method] if method else []), *extra,
        ]  # fmt: skip

    def ckpt(self, *extra) -> list:
        return self.evaluate("--checkpoint", self.run / "final", *extra, method=None)


def _edit_jsonl(rel: str, edit: Callable[[list[dict]], list[dict]]) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        path = data / rel
        _write_lines(path, edit([json.loads(line) for line in path.read_text().splitlines()]))

    return apply


def _set(i: int, **fields) -> Callable[[list[dict]], list[dict]]:
    return lambda rows: [{**r, **fields} if n == i else r for n, r in enumerate(rows)]


def _drop(i: int, key: str) -> Callable[[list[dict]], list[dict]]:
    return lambda rows: [{k: v for k, v in r.items() if not (n == i and k == key)} for n, r in enumerate(rows)]


def _raw(rel: str, change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        (data / rel).write_bytes(change((data / rel).read_bytes()))

    return apply


def _bad_byte(rel: str, line: int) -> Callable[[Path], None]:
    """Put a byte that is not UTF-8 (0xff) into 1-based ``line`` of the file."""

    def change(blob: bytes) -> bytes:
        lines = blob.split(b"\n")
        lines[line - 1] = lines[line - 1].replace(b'"input": "', b'"input": "\xff', 1)
        return b"\n".join(lines)

    return _raw(rel, change)


def _file(name: str, text: str) -> Callable[[Ctx], Path]:
    def make(c: Ctx) -> Path:
        (c.tmp / name).write_text(text)
        return c.tmp / name

    return make


def _corrupt_copy(c: Ctx) -> Path:
    folder = c.tmp / "corrupt"
    shutil.copytree(c.run / "final", folder)
    blob = bytearray((folder / PRIOR_FILE).read_bytes())
    blob[-1] ^= 0xFF
    (folder / PRIOR_FILE).write_bytes(bytes(blob))
    return folder


TRAIN0 = f"{TRAIN_TASKS[0]}/{TRAIN_TASKS[0]}_16384_100_train.jsonl"
SUPPORT13 = f"{TEST_TASK}/{TEST_TASK}_{K}_13_train.jsonl"
QUERY100 = f"{TEST_TASK}/{TEST_TASK}_{K}_100_test.jsonl"

# (id, alteration of the data copy or None, args(ctx), substrings of the one error line)
CASES = [
    ("missing-field", _edit_jsonl(TRAIN0, _drop(1, "output")), lambda c: c.train(),
     [TRAIN0.split("/")[1], "line 2", "missing field 'output'"]),
    ("output-not-string", _edit_jsonl(TRAIN0, _set(2, output=1)), lambda c: c.train(),
     ["line 3", "field 'output': expected a string, got an integer"]),
    ("empty-task-file", _raw(QUERY100, lambda b: b""), lambda c: c.evaluate(),
     [QUERY100.split("/")[1], "empty file"]),
    ("answer-not-an-option", _edit_jsonl(SUPPORT13, _set(2, output="maybe")), lambda c: c.evaluate(),
     [SUPPORT13.split("/")[1], "line 3", "'maybe' is not one of the options"]),
    ("duplicate-ids", _edit_jsonl(TRAIN0, lambda rows: [{**r, "id": "x"} if n in (0, 3) else r
                                                        for n, r in enumerate(rows)]),
     lambda c: c.train(), ["line 4", "duplicate example id 'x' (also on line 1)"]),
    ("k-larger-than-task", None, lambda c: c.evaluate("--tasks", "small", "--k", 16),
     ["small.jsonl", "task 'small'", "k = 16 is larger than the task (10 examples)"]),
    ("k-without-files", None, lambda c: c.evaluate("--k", 9),  # files hold k = 8; a smaller k draws from them
     ["unseen_9_100_train.jsonl", "no support file for task 'unseen' at k=9", "unseen_8_100_train.jsonl"]),
    ("support-larger-than-task", None, lambda c: c.train("--set", "meta.support_size=30"),
     ["task 'fam0' has 24 examples", "needs ≥ 31"]),
    ("non-utf8", _bad_byte(TRAIN0, 5),
     lambda c: c.train(), ["line 5", "not valid UTF-8", "0xff"]),
    ("truncated-json", _raw(QUERY100, lambda b: b[:-9]), lambda c: c.evaluate(),
     [QUERY100.split("/")[1], f"line {N_QUERY}", "invalid or truncated JSON"]),
    ("line-not-object", _raw(SUPPORT13, lambda b: b"[1, 2]\n" + b), lambda c: c.evaluate(),
     ["line 1", "expected a JSON object, got a list"]),
    ("no-options-anywhere", _edit_jsonl(SUPPORT13, lambda rows: [{**r, "options": []} for r in rows]),
     lambda c: c.evaluate(), [SUPPORT13.split("/")[1], "line 1", "no 'options' on this line", "config.json"]),
    ("setting-missing-task", None,
     lambda c: c.train("--setting", _file("s.json", json.dumps({"train": ["fam0", "nosuch"], "test": ["x"]}))(c)),
     ["no folder for task 'nosuch'", "fam0"]),
    ("setting-not-json", None, lambda c: c.train("--setting", _file("s.json", '{"train": [\n')(c)),
     ["s.json", "invalid JSON"]),
    ("setting-no-test", None,
     lambda c: c.evaluate(setting=_file("s.json", json.dumps({"train": TRAIN_TASKS}))(c)),
     ["s.json", "missing key 'test'"]),
    ("seeds-garbage", None, lambda c: c.evaluate("--seeds", "100,x"), ["--seeds '100,x' is invalid"]),
    ("seeds-empty", None, lambda c: c.evaluate("--seeds", ","), ["--seeds is empty"]),
    ("k-negative", None, lambda c: c.evaluate("--k", -3), ["--k -3 is invalid"]),
    ("set-unknown-field", None, lambda c: c.train("--set", "meta.bogus=1"), ["unknown config field 'meta.bogus'"]),
    ("set-bad-value", None, lambda c: c.train("--set", "lora.rank=0"), ["'lora.rank' = 0 is invalid", "≥ 1"]),
    ("set-no-equals", None, lambda c: c.train("--set", "lora.rank"), ["--set 'lora.rank' is invalid", "FIELD=VALUE"]),
    ("set-markup-value", None, lambda c: c.train("--set", "[/x]=1"), ["unknown config field '[/x]'"]),
    ("steps-negative", None, lambda c: c.train("--steps", -1), ["'meta.meta_steps' = -1 is invalid"]),
    ("config-missing", None, lambda c: c.train("--config", c.tmp / "nope.yaml"), ["nope.yaml", "does not exist"]),
    ("config-unknown-key", None, lambda c: c.train("--config", _file("c.json", '{"bogus": 1}')(c)),
     ["c.json", "unknown config field(s) ['bogus']"]),
    ("config-unknown-section-key", None,
     lambda c: c.train("--config", _file("c.json", '{"meta": {"stepz": 1}}')(c)),
     ["c.json", "['stepz']", "section 'meta'"]),
    ("config-not-parsable", None, lambda c: c.train("--config", _file("c.json", "{nope")(c)),
     ["c.json", "could not be parsed"]),
    ("config-and-preset", None, lambda c: c.train("--preset", "paper-v1"), ["give --config or --preset"]),
    ("model-missing", None, lambda c: c.train("--model", c.tmp / "no-model"),
     ["cannot load model", "no-model", "no such file or folder"]),
    ("checkpoint-missing", None, lambda c: c.evaluate("--checkpoint", c.tmp / "no-ckpt", method=None),
     ["no-ckpt", "does not exist"]),
    ("checkpoint-corrupt", None, lambda c: c.evaluate("--checkpoint", _corrupt_copy(c), method=None),
     [PRIOR_FILE, "checksum mismatch"]),
    ("checkpoint-misfit", None, lambda c: c.ckpt("--set", "lora.rank=3"),
     ["final", "has shape", "in the checkpoint but"]),
    ("method-unknown-train", None, lambda c: c.train("--method", "bogus"),
     ["--method", "unknown method 'bogus'; available:", "abmll"]),
    ("method-unknown-evaluate", None, lambda c: c.ckpt("--method", "bogus"),
     ["--method", "unknown method 'bogus'; available:", "zero-shot"]),
    ("device-bogus", None, lambda c: c.train("--device", "tpu"), ["--device 'tpu' is invalid"]),
    ("data-not-a-folder", None, lambda c: c.train("--data", c.env.setting), ["--data", "is not a folder"]),
    ("abmll-without-checkpoint", None, lambda c: c.evaluate(method="abmll"), ["--method abmll needs --checkpoint"]),
]  # fmt: skip


@pytest.mark.parametrize(("alter", "args", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_gives_one_clear_error(env, trained, tmp_path, alter, args, needles):
    data = env.data
    if alter is not None:
        data = tmp_path / "data"
        shutil.copytree(env.data, data)
        alter(data)
    ctx = Ctx(env, data, tmp_path, trained)
    result = invoke(*args(ctx))  # an option given again (--config, --data, ...) overrides the default one
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit)  # no other exception escaped
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    assert not (tmp_path / "out" / "results.json").exists() and not (tmp_path / "out" / "final").exists()


def test_console_script_prints_one_unwrapped_error_line(env, tmp_path):
    """The real process: exit status 2, one line on stderr (not wrapped even when long), nothing on stdout."""
    data = tmp_path / ("a-rather-long-folder-name-" * 3) / "data"
    shutil.copytree(env.data, data)
    _raw(QUERY100, lambda b: b[:-9])(data)
    script = Path(sys.executable).with_name("abmll")
    cmd = [script] if script.exists() else [sys.executable, "-c", "from abmll.cli import main; main()"]
    args = [
        *cmd, "evaluate", "--method", "zero-shot", "--model", env.model, "--data", data, "--setting", env.setting,
        "--k", K, "--seeds", "100", "--out", tmp_path / "out", "--device", "cpu",
    ]  # fmt: skip
    run_env = {**os.environ, "COLUMNS": "80"}  # rich would hard-wrap at 80 columns when not on a terminal
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, env=run_env)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and str(data / QUERY100) in lines[0] and len(lines[0]) > 80
    assert "invalid or truncated JSON" in lines[0]
