"""``--report-to`` on ``train``, ``compare`` and ``demo`` (accelerate's trackers), on the tiny Llama: the TensorBoard
event files hold every meta-step's ``log.jsonl`` fields at their steps and every comparison cell's metrics; a
backend whose package is missing is refused with one line naming the package, before anything is loaded or
written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import comparison_folder, ok
from typer.testing import CliRunner

import abmll.models
import abmll.suite
from abmll import cli
from abmll.cli import app
from abmll.errors import ConfigError
from abmll.tracking import BACKENDS, REPORT_TO, Tracker, scalars

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
STEPS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """tiny_comparison's model (tiny/) and data (data/), a setting and a fast config."""
    return comparison_folder(tmp_path_factory.mktemp("tracking"))


def train_args(tiny: Path, out: Path, *extra) -> list[str]:
    return [str(a) for a in (
        "train", "--model", tiny / "tiny", "--data", tiny / "data", "--tasks", "fam0,fam1", "--out", out,
        "--steps", STEPS, "--config", tiny / "fast.json", "--device", "cpu", *extra,
    )]  # fmt: skip


def compare_args(tiny: Path, out: Path, *extra) -> list[str]:
    return [str(a) for a in (
        "compare", "--methods", "zero-shot,abmll", "--preset", "smoke", "--model", tiny / "tiny", "--data",
        tiny / "data", "--setting", tiny / "setting.json", "--k", 4, "--out", out, "--device", "cpu", *extra,
    )]  # fmt: skip


def events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_train_logs_every_log_jsonl_field_at_its_meta_step_to_tensorboard(tiny, tmp_path):
    out = tmp_path / "run"
    ok(runner.invoke(app, train_args(tiny, out, "--report-to", "tensorboard")))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    acc = events(out / "tracking" / "tensorboard")
    fields = sorted(k for k in log[0] if k != "step")
    assert "outer_nll" in fields and "kl" in fields and "grad_norm" in fields
    assert sorted(acc.Tags()["scalars"]) == fields
    for field in fields:
        got = acc.Scalars(field)
        assert [e.step for e in got] == [r["step"] for r in log], field
        assert [e.value for e in got] == pytest.approx([float(r[field]) for r in log], rel=1e-6), field
    # the config as hyperparameters, beside the event file
    hparams = list((out / "tracking" / "tensorboard").glob("*/hparams.yml"))
    assert hparams and "inner.inner_steps: 1" in hparams[0].read_text()


def test_compare_logs_each_cells_meta_steps_and_metrics_to_tensorboard(tiny, tmp_path):
    out = tmp_path / "cmp"
    ok(runner.invoke(app, compare_args(tiny, out, "--report-to", "tensorboard")))
    acc = events(out / "tracking" / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    log_path = out / "abmll" / "seed-100" / "train" / "log.jsonl"
    train_log = [json.loads(line) for line in log_path.read_text().splitlines()]
    curve = acc.Scalars("abmll/seed-100/train/outer_nll")
    assert [e.step for e in curve] == [r["step"] for r in train_log] == [1, 2]  # the smoke preset: 2 meta-steps
    assert [e.value for e in curve] == pytest.approx([r["outer_nll"] for r in train_log], rel=1e-6)
    assert not any(t.startswith("zero-shot/seed-100/train/") for t in tags)  # zero-shot does not meta-train
    for method, step in (("zero-shot", 0), ("abmll", 2)):  # at the meta-step θ was trained to
        cell = json.loads((out / method / "seed-100" / "results.json").read_text())
        for metric in ("accuracy", "ece", "nll", "brier"):
            for task, row in (("unseen", cell["tasks"]["unseen"]), ("mean", cell["mean"])):
                (event,) = acc.Scalars(f"{method}/seed-100/eval/{task}/{metric}")
                assert event.step == step and event.value == pytest.approx(row[metric], rel=1e-6)
        (wall,) = acc.Scalars(f"{method}/seed-100/wall_s")
        assert wall.value == pytest.approx(cell["wall_s"], rel=1e-6)


def test_report_to_none_writes_no_tracker_files(tiny, tmp_path):
    out = tmp_path / "run"
    ok(runner.invoke(app, train_args(tiny, out)))
    assert not (out / "tracking").exists()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("command", ["train", "compare", "demo"])
def test_a_missing_backend_package_is_refused_before_any_work(tiny, tmp_path, monkeypatch, command, backend):
    monkeypatch.setitem(sys.modules, BACKENDS[backend], None)  # the package cannot be imported
    monkeypatch.setattr(abmll.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(abmll.suite, "build_suite", lambda **_: pytest.fail("the data was touched"))
    out = tmp_path / "out"
    argv = {
        "train": train_args(tiny, out),
        "compare": compare_args(tiny, out),
        "demo": ["demo", "--preset", "smoke", "--out", str(out), "--device", "cpu"],
    }[command]
    result = runner.invoke(app, [*argv, "--report-to", backend])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --report-to"), result.output
    assert f"pip install {BACKENDS[backend]}" in lines[0] and f"'{BACKENDS[backend]}'" in lines[0]
    assert not out.exists()


def test_a_tracker_that_cannot_start_stops_the_run_before_the_first_meta_step(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tracking").write_text("not a folder")  # the TensorBoard run cannot be created
    result = runner.invoke(app, train_args(tiny, out, "--report-to", "tensorboard"))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: --report-to tensorboard: the tensorboard run could not")
    assert str(out / "tracking") in errors[0] and "Traceback" not in result.output
    assert not (out / "log.jsonl").exists() and not (out / "final").exists()


def test_report_to_choices_are_the_librarys():
    assert [r.value for r in cli.ReportTo] == list(REPORT_TO)
    with pytest.raises(ConfigError, match="expected one of none, tensorboard, wandb, mlflow"):
        Tracker("comet", "x")


def test_scalars_keep_the_numeric_fields_of_a_record():
    record = {"step": 3, "outer_nll": 0.5, "skipped": True, "event": "x", "none": None, "nested": {"a": 1}}
    assert scalars(record, "p/") == {"p/outer_nll": 0.5, "p/skipped": 1, "p/nested/a": 1}
