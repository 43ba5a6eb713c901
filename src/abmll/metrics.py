"""Evaluation metrics of one task's query set, and their aggregation across tasks and seeds (METHOD.md
section 5).

Every per-task function takes ``probs`` ``[N, n_options]`` (rows sum to 1; options a task's example does
not have are trailing columns of probability exactly 0) and ``gold`` ``[N]`` (the gold option index), as
torch tensors, numpy arrays or lists, and returns Python floats: fractions, not percents.

Conventions (METHOD.md section 5):

- The prediction is the top-label option ``argmax probs``; ties go to the lowest option index (``torch.max``),
  and its probability is the confidence. An absent option (probability 0) is never predicted unless the row
  is all zeros, so absent options need no special handling anywhere below: they add 0 to the Brier sum and
  never enter the macro-F1 class set.
- ECE / MCE follow ``torchmetrics.functional.classification.multiclass_calibration_error`` exactly: the
  edges are ``torch.linspace(0, 1, n_bins + 1)`` in float32, the float32 confidence goes to bin
  ``bucketize(conf, edges, right=True) - 1``, so bin ``k`` is ``[k/n_bins, (k+1)/n_bins)`` (a confidence
  exactly on an edge belongs to the bin above it) and a confidence of exactly 1.0 gets an extra bin of its
  own. ECE = Σ_b (count_b / N)·|acc_b − conf_b| (L1); MCE = max_b |acc_b − conf_b| over non-empty bins.
- ``reliability_bins`` returns exactly ``n_bins`` bins for plotting: the last one is closed,
  ``[1 − 1/n_bins, 1]``, and also holds the confidences of exactly 1.0. So Σ count/N·|acc − conf| over
  the diagram equals ``ece`` whenever no confidence is exactly 1.0 (otherwise it can only be smaller).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from abmll.errors import AbmllError

NLL_FLOOR = 1e-12
"""p_gold is clamped at this floor before the log, so that NLL stays finite (at most −log 1e-12 ≈ 27.6)."""

# Two-sided 95% Student-t critical values t_{0.975, df} for df = 1..30 (computed with mpmath).
_T975 = (
    12.7062047362, 4.30265272975, 3.18244630528, 2.7764451052, 2.57058183564, 2.44691185114,
    2.36462425159, 2.3060041352, 2.2621571628, 2.22813885199, 2.20098516009, 2.17881282967,
    2.16036865646, 2.14478668792, 2.13144954556, 2.11990529922, 2.10981557783, 2.10092204024,
    2.09302405441, 2.08596344727, 2.07961384473, 2.0738730679, 2.06865761042, 2.06389856163,
    2.05953855275, 2.05552943864, 2.05183051648, 2.0484071418, 2.04522964213, 2.0422724563,
)  # fmt: skip
_Z975 = 1.959963984540054


class MetricsError(AbmllError, ValueError):
    """The inputs of a metric are malformed."""


def _inputs(probs: Any, gold: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs`` as float64 ``[N, K]`` and ``gold`` as int64 ``[N]`` on the CPU, validated."""
    # Lists go through numpy as float64 (torch.as_tensor would make them float32); tensors keep their dtype
    # until the lossless cast to float64, so the top label and its ties are those of the caller's dtype.
    p = torch.as_tensor(probs if torch.is_tensor(probs) else np.asarray(probs, dtype=np.float64))
    p = p.detach().cpu().to(torch.float64)
    g = torch.as_tensor(gold if torch.is_tensor(gold) else np.asarray(gold, dtype=np.int64))
    g = g.detach().cpu().to(torch.int64)
    if p.ndim != 2 or g.ndim != 1 or p.shape[0] != g.shape[0] or p.shape[0] == 0:
        shapes = f"{tuple(p.shape)} and {tuple(g.shape)}"
        raise MetricsError(f"expected probs [N, K] and gold [N] with N > 0, got {shapes}")
    if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise MetricsError("probs must be probabilities in [0, 1] (got log-probabilities or logits?)")
    if ((p.sum(1) - 1).abs() > 1e-3).any():
        raise MetricsError("every row of probs must sum to 1")
    if (g < 0).any() or (g >= p.shape[1]).any():
        raise MetricsError(f"gold indices must lie in [0, {p.shape[1]})")
    return p, g


def _top_label(p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidence, predicted option and correctness (float 0/1) of the top label."""
    conf, pred = p.max(dim=1)
    return conf, pred, (pred == g).to(torch.float64)


def _calibration_bins(p: torch.Tensor, g: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, ...]:
    """Per-bin count, Σ confidence and Σ correctness over torchmetrics' ``n_bins + 1`` bins (module doc)."""
    if not isinstance(n_bins, int) or n_bins < 1:
        raise MetricsError(f"n_bins must be a positive integer, got {n_bins!r}")
    conf, _, correct = _top_label(p, g)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    idx = torch.bucketize(conf.to(torch.float32), edges, right=True) - 1
    zeros = torch.zeros(n_bins + 1, dtype=torch.float64)
    count = zeros.index_add(0, idx, torch.ones_like(conf))
    return count, zeros.index_add(0, idx, conf), zeros.index_add(0, idx, correct)


def expected_calibration_error(probs: Any, gold: Any, n_bins: int = 15) -> float:
    """Top-label ECE, equal-width bins, L1 (METHOD.md section 5); = torchmetrics ``norm='l1'``."""
    count, conf_sum, acc_sum = _calibration_bins(*_inputs(probs, gold), n_bins)
    return float((acc_sum - conf_sum).abs().sum() / count.sum())


def max_calibration_error(probs: Any, gold: Any, n_bins: int = 15) -> float:
    """Top-label MCE: the largest |accuracy − confidence| of a non-empty bin; = torchmetrics ``norm='max'``
    (METHOD.md section 5)."""
    count, conf_sum, acc_sum = _calibration_bins(*_inputs(probs, gold), n_bins)
    full = count > 0
    return float(((acc_sum[full] - conf_sum[full]).abs() / count[full]).max())


def reliability_bins(probs: Any, gold: Any, n_bins: int = 15) -> list[dict[str, float | int | None]]:
    """Reliability diagram: ``n_bins`` dicts ``{"lower", "upper", "confidence", "accuracy", "count"}``
    (METHOD.md section 5). Empty bins have ``confidence = accuracy = None`` and ``count = 0``. Same bin
    assignment as :func:`expected_calibration_error`, except that confidences of exactly 1.0 join the last
    bin (see the module doc)."""
    count, conf_sum, acc_sum = (t.clone() for t in _calibration_bins(*_inputs(probs, gold), n_bins))
    for t in (count, conf_sum, acc_sum):
        t[n_bins - 1] += t[n_bins]
    out = []
    for k in range(n_bins):
        c = int(count[k])
        out.append({
            "lower": k / n_bins,
            "upper": (k + 1) / n_bins,
            "confidence": float(conf_sum[k] / c) if c else None,
            "accuracy": float(acc_sum[k] / c) if c else None,
            "count": c,
        })  # fmt: skip
    return out


def gold_nll(probs: Any, gold: Any) -> float:
    """Mean of −log p_gold, with p_gold clamped at :data:`NLL_FLOOR` = 1e-12 (METHOD.md section 5)."""
    p, g = _inputs(probs, gold)
    return float(-p.gather(1, g[:, None]).clamp_min(NLL_FLOOR).log().mean())


def brier_score(probs: Any, gold: Any) -> float:
    """Multi-class Brier score (Brier 1950): mean over examples of Σ_j (p_j − onehot_j)², in [0, 2]
    (METHOD.md section 5). Absent options (p = 0, never gold) add 0. torchmetrics 1.9 has no Brier score;
    this equals ``n_options · mean_squared_error(probs, onehot)``."""
    p, g = _inputs(probs, gold)
    onehot = torch.nn.functional.one_hot(g, p.shape[1]).to(p.dtype)
    return float(((p - onehot) ** 2).sum(1).mean())


def accuracy(probs: Any, gold: Any) -> float:
    """Share of examples whose top-label option is the gold one."""
    p, g = _inputs(probs, gold)
    return float(_top_label(p, g)[2].mean())


def macro_f1(probs: Any, gold: Any) -> float:
    """Macro-F1 over option indices that appear in gold or in the predictions (sklearn ``f1_score(average=
    'macro')`` with labels = their union; equals torchmetrics ``multiclass_f1_score(average='macro')``, which
    gives weight 0 to classes with tp + fp + fn = 0). A class with tp = 0 scores 0 (METHOD.md section 5)."""
    p, g = _inputs(probs, gold)
    pred = _top_label(p, g)[1]
    scores = []
    for c in torch.cat([g, pred]).unique().tolist():
        tp = int(((pred == c) & (g == c)).sum())
        fp = int(((pred == c) & (g != c)).sum())
        fn = int(((pred != c) & (g == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(sum(scores) / len(scores))


def auroc(probs: Any, gold: Any) -> float | None:
    """AUROC of the top-label confidence as a score for correctness (METHOD.md section 5): the Mann–Whitney
    U statistic / (n_right · n_wrong), ties counted ½ (average ranks); = torchmetrics ``binary_auroc``.
    ``None`` when every prediction is right or every one is wrong (undefined)."""
    p, g = _inputs(probs, gold)
    conf, _, correct = _top_label(p, g)
    s, y = conf.numpy(), correct.numpy().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # average 1-based rank of each tie group
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def task_metrics(probs: Any, gold: Any, n_bins: int = 15) -> dict[str, Any]:
    """All metrics of one task's query set (METHOD.md section 5), JSON-serialisable: ``n``, ``accuracy``,
    ``macro_f1``, ``ece``, ``mce``, ``nll``, ``brier``, ``majority_accuracy`` (always answering the query
    set's most frequent gold index), ``top_prediction_share`` (share of the most-predicted index: collapse
    onto one answer), ``auroc`` (None when undefined) and ``reliability`` (the diagram's bins)."""
    p, g = _inputs(probs, gold)
    n, k = p.shape
    pred = _top_label(p, g)[1]
    return {
        "n": int(n),
        "accuracy": accuracy(p, g),
        "macro_f1": macro_f1(p, g),
        "ece": expected_calibration_error(p, g, n_bins),
        "mce": max_calibration_error(p, g, n_bins),
        "nll": gold_nll(p, g),
        "brier": brier_score(p, g),
        "majority_accuracy": float(torch.bincount(g, minlength=k).max() / n),
        "top_prediction_share": float(torch.bincount(pred, minlength=k).max() / n),
        "auroc": auroc(p, g),
        "reliability": reliability_bins(p, g, n_bins),
    }


def macro_average(task_results: Sequence[dict[str, Any]]) -> dict[str, float | int | None]:
    """Unweighted mean of every scalar metric across tasks, skipping ``None`` values (a key whose values
    are all None stays None); lists such as ``reliability`` are not averaged. ``n`` becomes the mean query
    size and ``n_tasks`` counts the tasks (METHOD.md section 5)."""
    if not task_results:
        raise MetricsError("macro_average needs at least one task")
    out: dict[str, float | int | None] = {}
    for key in task_results[0]:
        values = [r.get(key) for r in task_results]
        if any(isinstance(v, (list, dict, str)) for v in values):
            continue
        kept = [float(v) for v in values if v is not None]
        out[key] = sum(kept) / len(kept) if kept else None
    out["n_tasks"] = len(task_results)
    return out


def t_critical_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom: a table for df ≤ 30, the
    Cornish–Fisher expansion (error < 1e-7) beyond."""
    if df < 1:
        raise MetricsError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4)
    )


def mean_interval(values: Iterable[float | None]) -> dict[str, float | int]:
    """Mean and 95% Student-t interval across seeds (METHOD.md section 5): mean ± t_{0.975, n−1}·s/√n with
    the sample standard deviation s (ddof = 1). ``None`` values are dropped; n = 1 gives low = high = mean."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        raise MetricsError("mean_interval needs at least one value")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_critical_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}
