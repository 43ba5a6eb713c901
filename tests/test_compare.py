"""The paired comparison of the report: ABMLL minus each baseline on the same support sets."""

from __future__ import annotations

import pytest

from abmll.compare import _paired_markdown, paired_differences


def _results(per_seed: dict[str, list[tuple[int, float, float]]]) -> dict:
    return {
        "tasks": {
            task: {"per_seed": [{"seed": s, "accuracy": a, "ece": e} for s, a, e in rows]}
            for task, rows in per_seed.items()
        }
    }


def test_paired_differences_pair_by_seed_and_give_a_t_interval():
    results = {
        "lora": _results({"rte": [(100, 0.50, 0.20), (13, 0.60, 0.10), (21, 0.55, 0.15)]}),
        "abmll": _results({"rte": [(13, 0.70, 0.05), (100, 0.55, 0.10), (21, 0.60, 0.05)]}),
    }
    paired = paired_differences(results)
    acc = paired["lora"]["rte"]["accuracy"]
    # differences by seed: 100 → 0.05, 13 → 0.10, 21 → 0.05 (the order of the lists must not matter)
    assert acc["mean"] == pytest.approx(0.2 / 3)
    assert acc["n"] == 3 and acc["low"] < acc["mean"] < acc["high"]
    assert paired["lora"]["rte"]["ece"]["mean"] == pytest.approx((-0.10 - 0.05 - 0.10) / 3)
    table = _paired_markdown(paired)
    assert "| lora | rte | +0.067 [" in table


def test_no_paired_section_without_abmll():
    assert paired_differences({"lora": _results({"rte": [(100, 0.5, 0.2)]})}) == {}
