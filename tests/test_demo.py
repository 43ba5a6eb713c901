"""`abmll demo --preset smoke` on the real SmolLM2-135M and the built-in suite (what CI runs)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from abmll.cli import app
from abmll.evaluation import read_predictions
from abmll.metrics import expected_calibration_error

pytestmark = pytest.mark.slow

METHODS = ("zero-shot", "lora", "abmll")


@pytest.fixture(scope="module")
def smoke_reports(tmp_path_factory, smollm2):
    """The smoke demo run twice with the same seed."""
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"demo{i}")
        result = CliRunner().invoke(app, ["demo", "--preset", "smoke", "--out", str(out)])
        assert result.exit_code == 0, result.output
        outs.append(out)
    return outs


def test_smoke_report_structure_and_metric_ranges(smoke_reports):
    out = smoke_reports[0]
    for name in ["report.md", "results.json", "training-curves.png"] + [f"reliability-{m}.png" for m in METHODS]:
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == list(METHODS)
    for method, res in results["methods"].items():
        assert (out / method / "seed-100" / "train" / "final").is_dir() or method == "zero-shot"
        for row in list(res["tasks"].values()) + [res["mean"]]:
            for key in ("accuracy", "ece", "mce", "macro_f1", "majority_accuracy", "top_prediction_share"):
                assert 0.0 <= row[key] <= 1.0, (method, key, row[key])
            assert row["nll"] >= 0 and 0 <= row["brier"] <= 2
    report = (out / "report.md").read_text()
    assert "4-bit" in report and "dequantised" in report
    for source in ("GLUE", "COPA"):
        assert source in report


def test_reported_ece_equals_ece_recomputed_from_saved_probabilities(smoke_reports):
    out = smoke_reports[0]
    results = json.loads((out / "results.json").read_text())
    for method in METHODS:
        rows = read_predictions(out / method / "predictions.jsonl")
        for task, summary in results["methods"][method]["tasks"].items():
            mine = [r for r in rows if r["task"] == task]
            width = max(len(r["probs"]) for r in mine)
            probs = [r["probs"] + [0.0] * (width - len(r["probs"])) for r in mine]
            ece = expected_calibration_error(probs, [r["gold"] for r in mine])
            assert ece == pytest.approx(summary["ece"], abs=1e-9), (method, task)


def test_same_seed_gives_the_same_table(smoke_reports):
    marker = "## Accuracy and ECE per task"
    tables = [(out / "report.md").read_text().split(marker)[1].split("##")[0] for out in smoke_reports]
    assert tables[0] == tables[1]
