"""Tests of abmll.metrics (METHOD.md section 5) against torchmetrics, direct formulas and hand computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from abmll import metrics as M

tmc = pytest.importorskip("torchmetrics.functional.classification")
tm_mse = pytest.importorskip("torchmetrics.functional").mean_squared_error

SEEDS = [0, 1, 2, 3]
CLASS_COUNTS = [2, 3, 4, 5, 10]


def random_case(seed: int, k: int, n: int = 300, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax rows at several temperatures, rows whose confidence lies exactly on a bin edge k/15 (and on
    1/3), one-hot rows (confidence 1.0), and rows with trailing absent options (probability 0)."""
    g = torch.Generator().manual_seed(seed)
    temps = torch.tensor([0.3, 1.0, 3.0, 8.0], dtype=torch.float64)[torch.randint(0, 4, (n,), generator=g)]
    probs = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * temps[:, None], dim=1)
    edge_rows = []
    for top in [j / 15 for j in range(1, 16)] + [1 / 3]:
        if top >= 1 / k:
            rest = (1 - top) / (k - 1)
            edge_rows.append([top] + [rest] * (k - 1))
    edge = torch.tensor(edge_rows, dtype=torch.float64)
    edge = edge[:, torch.randperm(k, generator=g)]  # top option at a random position
    onehot = F.one_hot(torch.randint(0, k, (5,), generator=g), k).to(torch.float64)
    probs = torch.cat([probs, edge, edge, onehot])
    if k >= 3:  # some rows only have the first two options
        short = torch.softmax(torch.randn(20, 2, generator=g, dtype=torch.float64) * 2, dim=1)
        probs = torch.cat([probs, torch.cat([short, torch.zeros(20, k - 2, dtype=torch.float64)], 1)])
    n_all = probs.shape[0]
    n_opts = (probs > 0).sum(1)
    gold = (torch.rand(n_all, generator=g, dtype=torch.float64) * n_opts).long()
    # make the model better than chance so that accuracy and calibration vary
    right = torch.rand(n_all, generator=g) < 0.5
    gold = torch.where(right, probs.argmax(1), gold)
    return probs.to(dtype), gold


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", CLASS_COUNTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_ece_mce_match_torchmetrics(seed, k, dtype):
    probs, gold = random_case(seed, k, dtype=dtype)
    for norm, fn in (("l1", M.expected_calibration_error), ("max", M.max_calibration_error)):
        ref = tmc.multiclass_calibration_error(probs, gold, num_classes=k, n_bins=15, norm=norm)
        assert fn(probs, gold) == pytest.approx(float(ref), abs=1e-6), norm


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15, 20])
def test_ece_other_bin_counts_match_torchmetrics(n_bins):
    probs, gold = random_case(7, 4, dtype=torch.float32)
    ref = tmc.multiclass_calibration_error(probs, gold, num_classes=4, n_bins=n_bins, norm="l1")
    assert M.expected_calibration_error(probs, gold, n_bins) == pytest.approx(float(ref), abs=1e-6)


def test_bin_edge_conventions():
    """A confidence exactly on an edge goes to the bin above it; confidence 1.0 gets its own bin."""
    # confidence 0.6 = 9/15 (an edge in float32 as well), wrong → bin [0.6, 0.6667): |0 − 0.6|.
    # confidence 1.0, right → its own bin: |1 − 1| = 0. ECE = (0.6 + 0)/2 = 0.3; MCE = 0.6.
    probs = torch.tensor([[0.6, 0.4], [1.0, 0.0]], dtype=torch.float32)
    gold = torch.tensor([1, 0])
    assert M.expected_calibration_error(probs, gold) == pytest.approx(0.3, abs=1e-6)
    assert M.max_calibration_error(probs, gold) == pytest.approx(0.6, abs=1e-6)
    bins = M.reliability_bins(probs, gold)
    assert bins[9]["count"] == 1 and bins[9]["lower"] == pytest.approx(0.6)
    assert bins[14]["count"] == 1 and bins[14]["accuracy"] == 1.0


def test_hand_computed_case():
    # preds [0, 0, 1, 2]; confidences .7, .5, .65, .75; correct [1, 0, 1, 0] → accuracy 0.5.
    # Bins (width 1/15): .5→7, .65→9, .7→10, .75→11, all distinct, so
    #   ECE = (|1−.7| + |0−.5| + |1−.65| + |0−.75|)/4 = (.3 + .5 + .35 + .75)/4 = 1.9/4 = 0.475; MCE = 0.75.
    # NLL = −(ln .7 + ln .4 + ln .65 + ln .1)/4.
    # Brier: .3²+.2²+.1² = .14; .5²+.6²+.1² = .62; .2²+.35²+.15² = .185; .9²+.15²+.75² = 1.395;
    #   mean 2.34/4 = .585.
    # Macro-F1: class 0 tp1 fp1 fn1 → 2/4 = .5; class 1 tp1 fp0 fn1 → 2/3; class 2 tp0 fp1 → 0; mean 7/18.
    # AUROC: right {.7, .65} vs wrong {.5, .75}: .7>.5, .65>.5 win, both lose to .75 → 2/4 = .5.
    # majority: gold counts {0: 2, 1: 2} → .5; top prediction share: option 0 predicted twice → .5.
    probs = [[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.2, 0.65, 0.15], [0.1, 0.15, 0.75]]
    gold = [0, 1, 1, 0]
    out = M.task_metrics(probs, gold)
    expected = {
        "n": 4,
        "accuracy": 0.5,
        "macro_f1": 7 / 18,
        "ece": 0.475,
        "mce": 0.75,
        "nll": -(math.log(0.7) + math.log(0.4) + math.log(0.65) + math.log(0.1)) / 4,
        "brier": 0.585,
        "majority_accuracy": 0.5,
        "top_prediction_share": 0.5,
        "auroc": 0.5,
    }
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-9), key
    assert [b["count"] for b in out["reliability"]] == [0] * 7 + [1, 0, 1, 1, 1, 0, 0, 0]
    assert out["reliability"][7] == {
        "lower": 7 / 15,
        "upper": 8 / 15,
        "confidence": 0.5,
        "accuracy": 0.0,
        "count": 1,
    }
    assert out["reliability"][0]["confidence"] is None and out["reliability"][0]["accuracy"] is None
    json.dumps(out)


def test_auroc_hand_computed_ties():
    # right confidences {.9, .9, .6}, wrong {.6}: pairs score 1, 1 and ½ (tie) → 2.5/3.
    probs = [[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.6, 0.4]]
    gold = [0, 1, 0, 1]
    assert M.auroc(probs, gold) == pytest.approx(2.5 / 3)


@pytest.mark.parametrize("k", CLASS_COUNTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_matches_torchmetrics(seed, k):
    probs, gold = random_case(seed, k)
    probs = (probs * 20).round() / 20  # coarse probabilities: many tied confidences
    probs = probs / probs.sum(1, keepdim=True)
    conf, pred = probs.max(1)
    ref = tmc.binary_auroc(conf, (pred == gold).long())
    assert M.auroc(probs, gold) == pytest.approx(float(ref), abs=1e-6)


def test_auroc_undefined_is_none():
    probs = [[0.9, 0.1], [0.3, 0.7]]
    assert M.auroc(probs, [0, 1]) is None
    assert M.auroc(probs, [1, 0]) is None
    assert M.task_metrics(probs, [0, 1])["auroc"] is None


@pytest.mark.parametrize("k", CLASS_COUNTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_nll_brier_f1_accuracy_references(seed, k):
    probs, gold = random_case(seed, k)
    logp = probs.clamp_min(M.NLL_FLOOR).log()
    assert M.gold_nll(probs, gold) == pytest.approx(float(F.nll_loss(logp, gold)), abs=1e-9)
    onehot = F.one_hot(gold, k).double()
    direct = sum(float(((probs[i] - onehot[i]) ** 2).sum()) for i in range(len(gold))) / len(gold)
    assert M.brier_score(probs, gold) == pytest.approx(direct, abs=1e-9)
    assert M.brier_score(probs, gold) == pytest.approx(k * float(tm_mse(probs, onehot)), abs=1e-6)
    ref_f1 = tmc.multiclass_f1_score(probs, gold, num_classes=k, average="macro")
    assert M.macro_f1(probs, gold) == pytest.approx(float(ref_f1), abs=1e-6)
    ref_acc = tmc.multiclass_accuracy(probs, gold, num_classes=k, average="micro")
    assert M.accuracy(probs, gold) == pytest.approx(float(ref_acc), abs=1e-6)


def test_macro_f1_ignores_absent_classes():
    """Classes 2 and 3 never appear in gold or predictions, so they are not averaged (sklearn labels=union;
    torchmetrics gives them weight 0), although the matrix has 4 columns."""
    # preds [0, 1, 1], gold [0, 1, 0]: class 0 tp1 fn1 → 2/3; class 1 tp1 fp1 → 2/3; mean 2/3.
    probs = [[0.9, 0.1, 0, 0], [0.2, 0.8, 0, 0], [0.4, 0.6, 0, 0]]
    assert M.macro_f1(probs, [0, 1, 0]) == pytest.approx(2 / 3)
    assert float(
        tmc.multiclass_f1_score(torch.tensor(probs), torch.tensor([0, 1, 0]), num_classes=4, average="macro")
    ) == pytest.approx(2 / 3)


def test_absent_options_do_not_change_scores():
    """Padding a 2-option task with zero columns changes no metric."""
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(50, 2, generator=g, dtype=torch.float64) * 2, 1)
    gold = torch.randint(0, 2, (50,), generator=g)
    padded = torch.cat([probs, torch.zeros(50, 3, dtype=torch.float64)], 1)
    a, b = M.task_metrics(probs, gold), M.task_metrics(padded, gold)
    for key in a:
        assert a[key] == (pytest.approx(b[key]) if isinstance(b[key], float) else b[key]), key


def test_nll_floor():
    probs = [[1.0, 0.0], [0.5, 0.5]]
    assert M.gold_nll(probs, [1, 0]) == pytest.approx((-math.log(1e-12) + math.log(2)) / 2)


@pytest.mark.parametrize("k", CLASS_COUNTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_reliability_bins_agree_with_ece(seed, k):
    probs, gold = random_case(seed, k)
    n = len(gold)
    bins = M.reliability_bins(probs, gold)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == n
    assert bins[0]["lower"] == 0.0 and bins[-1]["upper"] == 1.0
    for b in bins:
        if b["count"]:
            assert b["lower"] - 1e-6 <= b["confidence"] <= b["upper"] + 1e-6
    # With confidences of exactly 1.0 removed, the diagram reproduces ECE exactly.
    keep = probs.max(1).values.float() < 1.0
    bins = M.reliability_bins(probs[keep], gold[keep])
    n_keep = int(keep.sum())
    from_bins = sum(b["count"] / n_keep * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert from_bins == pytest.approx(M.expected_calibration_error(probs[keep], gold[keep]), abs=1e-9)
    json.dumps(bins)


def test_task_metrics_keys_types_and_input_kinds():
    probs, gold = random_case(0, 4)
    out_t = M.task_metrics(probs, gold)
    assert set(out_t) == {
        "n",
        "accuracy",
        "macro_f1",
        "ece",
        "mce",
        "nll",
        "brier",
        "majority_accuracy",
        "top_prediction_share",
        "auroc",
        "reliability",
    }
    assert all(type(out_t[k]) is float for k in out_t if k not in ("n", "reliability"))
    assert out_t["n"] == len(gold)
    assert out_t["majority_accuracy"] == pytest.approx(float(torch.bincount(gold).max()) / len(gold))
    assert out_t["top_prediction_share"] == pytest.approx(
        float(torch.bincount(probs.argmax(1)).max()) / len(gold)
    )
    assert M.task_metrics(probs.numpy(), gold.numpy()) == out_t
    assert M.task_metrics(probs.tolist(), gold.tolist()) == out_t
    json.dumps(out_t)


def test_bad_inputs_raise():
    with pytest.raises(M.MetricsError):
        M.task_metrics([[0.5, 0.5]], [2])
    with pytest.raises(M.MetricsError):
        M.task_metrics([[-0.1, -2.3]], [0])  # log-probabilities
    with pytest.raises(M.MetricsError):
        M.task_metrics([[0.5, 0.5]], [0, 1])
    with pytest.raises(ValueError):
        M.expected_calibration_error([[0.5, 0.5]], [0], n_bins=0)


def test_macro_average():
    a = {"n": 10, "accuracy": 0.5, "auroc": None, "reliability": [{"count": 1}]}
    b = {"n": 20, "accuracy": 0.7, "auroc": 0.6, "reliability": []}
    c = {"n": 30, "accuracy": 0.9, "auroc": 0.8, "reliability": []}
    out = M.macro_average([a, b, c])
    assert out == pytest.approx({"n": 20.0, "accuracy": 0.7, "auroc": 0.7, "n_tasks": 3})
    assert "reliability" not in out
    assert M.macro_average([a])["auroc"] is None


def test_mean_interval():
    # [1, 2, 3]: mean 2, s = 1, half-width t_{.975,2}·s/√3 = 4.302653·1/√3.
    out = M.mean_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert out["n"] == 3 and out["mean"] == pytest.approx(2.0)
    assert out["low"] == pytest.approx(2 - half, abs=1e-6)
    assert out["high"] == pytest.approx(2 + half, abs=1e-6)
    assert M.mean_interval([0.4]) == {"mean": 0.4, "low": 0.4, "high": 0.4, "n": 1}
    assert M.mean_interval([0.4, None, 0.4]) == {"mean": 0.4, "low": 0.4, "high": 0.4, "n": 2}
    # five seeds: t_{.975,4} = 2.776445
    xs = np.array([0.61, 0.64, 0.58, 0.66, 0.63])
    out = M.mean_interval(xs.tolist())
    assert out["high"] - out["mean"] == pytest.approx(2.776445 * xs.std(ddof=1) / math.sqrt(5), abs=1e-6)


@pytest.mark.parametrize(
    "df,t",
    [
        (1, 12.706205),
        (2, 4.302653),
        (4, 2.776445),
        (9, 2.262157),
        (30, 2.042272),
        (31, 2.039513),
        (40, 2.021075),
        (60, 2.000298),
        (120, 1.979930),
        (1000, 1.962339),
    ],
)
def test_t_critical_known_values(df, t):
    assert M.t_critical_975(df) == pytest.approx(t, abs=2e-6)


def test_t_critical_against_mpmath():
    mp = pytest.importorskip("mpmath")
    for df in list(range(1, 46)) + [80, 200]:

        def cdf_gap(t, v=df):
            return 1 - 0.5 * mp.betainc(v / 2, 0.5, 0, v / (v + t * t), regularized=True) - mp.mpf("0.975")

        assert M.t_critical_975(df) == pytest.approx(float(mp.findroot(cdf_gap, 2.5)), abs=1e-6), df
