"""What a user sees of the command line and of the files it writes: ``abmll --version``, choice options listed
in ``--help`` and checked before anything runs, usage errors as one line, a ``schema_version`` in results and
checkpoint manifests (older files still read, newer ones refused by name), a checkpoint config file that is not
PEFT's ``adapter_config.json`` (old checkpoints still load), and no matplotlib backend switch on import."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import abmll
from abmll import cli
from abmll.checkpoint import (
    CHECKPOINT_SCHEMA_VERSION,
    CONFIG_FILE,
    LEGACY_CONFIG_FILE,
    MANIFEST,
    load_checkpoint,
    save_checkpoint,
    sha256,
)
from abmll.config import ABMLLConfig
from abmll.errors import CheckpointError, DataError
from abmll.evaluation import RESULTS_SCHEMA_VERSION, read_results, write_results

runner = CliRunner()
THETA = {"model.layers.0.q_proj.mu_A": torch.arange(6.0).reshape(2, 3), "model.layers.0.q_proj.mu_B": torch.ones(3, 2)}


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ------------------------------------------------------------------------------------------------ the CLI
def test_version_flag_prints_the_installed_version():
    result = runner.invoke(cli.app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"abmll {abmll.__version__}" == f"abmll {metadata.version('abmll')}"


def test_choice_enums_match_the_library_and_are_listed_in_help():
    from abmll.compare import BUDGETS
    from abmll.config import PRESETS

    assert {p.value for p in cli.ConfigPreset} == set(PRESETS)
    assert {p.value for p in cli.Budget} == set(BUDGETS)
    wide = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}
    text = runner.invoke(cli.app, ["train", "--help"], env=wide).output
    assert "one of lora, structured-lora, reptile, maml, abmll, abmll-icl." in text
    assert "default|paper-v1|paper-v2" in text
    text = runner.invoke(cli.app, ["evaluate", "--help"], env=wide).output
    assert "sample|mean" in text and "One of zero-shot, icl, lora, lora-task, structured-lora" in text
    assert "smoke|quick|full" in runner.invoke(cli.app, ["compare", "--help"], env=wide).output


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["train", "--out", "o", "--method", "nope"], ["abmll train", "--method", "unknown method 'nope'; available:"]),
        (["train", "--out", "o", "--method", "zero-shot"], ["--method zero-shot learns nothing across tasks"]),
        (["train", "--out", "o", "--steps", "many"], ["--steps", "valid integer"]),
        (["evaluate", "--out", "o", "--mode", "vote"], ["--mode", "'vote' is not one of 'sample', 'mean'"]),
        (["plan", "--dtype", "int3"], ["--dtype", "'int3' is not one of"]),
        (["train"], ["Missing option '--out'"]),
        (["trian"], ["No such command 'trian'"]),
    ],
    ids=["choice", "untrainable", "integer", "mode", "dtype", "missing", "command"],
)
def test_usage_errors_are_one_line_with_status_2(tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(runner.invoke(cli.app, args))
    assert all(n in line for n in needles), line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------- results.json
def test_results_json_carries_a_schema_version_and_older_files_still_read(tmp_path):
    rows = [{"task": "t", "seed": 1, "id": f"t:{i}", "gold": i % 2, "probs": [0.7, 0.3]} for i in range(4)]
    written = write_results(tmp_path / "new", rows, {"method": "zero-shot", "model": "m", "k": 4, "seeds": [1]})
    on_disk = json.loads((tmp_path / "new" / "results.json").read_text())
    assert on_disk["schema_version"] == written["schema_version"] == RESULTS_SCHEMA_VERSION == 1
    assert read_results(tmp_path / "new" / "results.json")["mean"] == on_disk["mean"]

    old = {k: v for k, v in on_disk.items() if k != "schema_version"}  # written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert read_results(tmp_path / "old.json")["schema_version"] == 1
    (tmp_path / "newer.json").write_text(json.dumps({**old, "schema_version": RESULTS_SCHEMA_VERSION + 1}))
    with pytest.raises(DataError, match=r"newer.json: schema_version 2 is newer than this abmll reads \(1\)"):
        read_results(tmp_path / "newer.json")
    (tmp_path / "bad.json").write_text(json.dumps({**old, "schema_version": "one"}))
    with pytest.raises(DataError, match="field 'schema_version' = 'one' is invalid"):
        read_results(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------ checkpoints
def _legacy(folder: Path) -> Path:
    """Turn a checkpoint into one written the old way: ``adapter_config.json`` and a manifest without
    ``schema_version``."""
    (folder / CONFIG_FILE).rename(folder / LEGACY_CONFIG_FILE)
    files = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    (folder / MANIFEST).write_text(json.dumps({"files": {n: sha256(folder / n) for n in files}}))
    return folder


def test_checkpoint_config_file_is_not_peft_s_and_the_manifest_has_a_schema_version(tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", THETA, ABMLLConfig(), {"method": "abmll", "model": "m"})
    assert (folder / CONFIG_FILE).is_file() and CONFIG_FILE == "abmll_config.json"
    assert not (folder / "adapter_config.json").exists()  # PEFT's file name: PEFT never takes it for an adapter
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["schema_version"] == CHECKPOINT_SCHEMA_VERSION == 2 and CONFIG_FILE in manifest["files"]
    assert load_checkpoint(folder)["info"]["method"] == "abmll"


def test_a_checkpoint_written_the_old_way_still_loads(tmp_path):
    config = ABMLLConfig().override({"lora.rank": 2})
    info = {"method": "abmll", "model": "m"}
    folder = _legacy(save_checkpoint(tmp_path / "old", THETA, config, info, {}, {"step": 3}))
    assert sorted(p.name for p in folder.iterdir())[0] == LEGACY_CONFIG_FILE
    loaded = load_checkpoint(folder, trainer=True)
    assert loaded["config"] == config and loaded["trainer_values"]["step"] == 3
    assert all(torch.equal(loaded["theta"][k], THETA[k]) for k in THETA)

    # Its legacy config file is still covered by the checksums.
    (folder / LEGACY_CONFIG_FILE).write_text((folder / LEGACY_CONFIG_FILE).read_text().replace("abmll", "abmlx"))
    with pytest.raises(CheckpointError, match=f"{LEGACY_CONFIG_FILE}: checksum mismatch"):
        load_checkpoint(folder)


def test_a_checkpoint_of_a_newer_schema_is_refused_by_name(tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", THETA, ABMLLConfig(), {"method": "abmll", "model": "m"})
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(CheckpointError, match="schema_version 99 is newer than this abmll reads"):
        load_checkpoint(folder)


# ------------------------------------------------------------------------------------------- matplotlib
def test_importing_the_report_module_keeps_the_matplotlib_backend(tmp_path):
    """A notebook's backend survives ``import abmll.report``, and the figures are still written."""
    code = f"""
import matplotlib
matplotlib.use("pdf")
import abmll.report as report
assert matplotlib.get_backend() == "pdf", matplotlib.get_backend()
rows = [{{"task": "t", "seed": 1, "id": str(i), "gold": i % 2, "probs": [0.6, 0.4]}} for i in range(8)]
report.reliability_diagram(rows, {{"ece": 0.1, "accuracy": 0.5}}, {str(tmp_path / "r.png")!r}, "t")
assert matplotlib.get_backend() == "pdf", matplotlib.get_backend()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
