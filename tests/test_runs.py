"""``abmll compare`` and ``abmll demo`` on the hardware and config the user names (``--device``, ``--set``,
``--config``), on the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import comparison_folder, ok
from typer.testing import CliRunner

import abmll.build
import abmll.suite
from abmll.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The folder of tiny_comparison: the model (tiny/), the data (data/) and a setting file."""
    return comparison_folder(tmp_path_factory.mktemp("runs"))


def compare_args(tiny: Path, out: Path, *extra) -> list[str]:
    argv = [
        "compare", "--methods", "zero-shot", "--preset", "smoke", "--model", tiny / "tiny", "--data", tiny / "data",
        "--setting", tiny / "setting.json", "--k", 4, "--out", out, *extra,
    ]  # fmt: skip
    return [str(a) for a in argv]


def test_compare_loads_the_model_with_the_configured_device_and_dtype(tiny, tmp_path, monkeypatch):
    calls = []
    original = abmll.build.load_model

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(abmll.build, "load_model", spy)  # every command loads its model through abmll.build
    config = tmp_path / "shared.yaml"
    config.write_text("scoring:\n  max_length: 96\n  length_norm: token\npredict:\n  samples: 1\n")
    out = tmp_path / "cmp"
    ok(runner.invoke(app, compare_args(tiny, out, "--device", "cpu", "--config", config,
                                       "--set", "compute.dtype=bfloat16")))  # fmt: skip
    assert calls and all(c["dtype"] == "bfloat16" and str(c["device"]) == "cpu" for c in calls), calls
    cell = json.loads((out / "zero-shot" / "seed-100" / "results.json").read_text())
    assert cell["config"]["compute"]["dtype"] == "bfloat16"
    assert cell["config"]["scoring"]["max_length"] == 96 and cell["config"]["predict"]["samples"] == 1
    assert json.loads((out / "results.json").read_text())["config"]["scoring"]["max_length"] == 96


@pytest.mark.parametrize("command", ["compare", "demo"])
@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--set", "meta.bogus=1"], ["unknown config field 'meta.bogus'"]),
        (["--set", "compute.dtype=int3"], ["'compute.dtype' = 'int3' is invalid"]),
        (["--device", "tpu"], ["--device 'tpu' is invalid"]),
        (["--config", "missing.yaml"], ["missing.yaml", "does not exist"]),
    ],
    ids=["set-unknown", "set-bad-dtype", "device", "config-missing"],
)
def test_compare_and_demo_check_config_and_device_before_loading_anything(
    tiny, tmp_path, monkeypatch, command, extra, needles
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(abmll.suite, "build_suite", lambda **_: pytest.fail("the data was touched"))
    argv = compare_args(tiny, tmp_path / "out") if command == "compare" else ["demo", "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*argv, *extra])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), result.output
    assert not (tmp_path / "out").exists()
