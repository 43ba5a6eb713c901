"""Meta-validation: the episodes of the 'dev' tasks, the loss measured on them (the mean query NLL after adapting
to each support set, what ``abmll tune`` minimises and early stopping watches), and early stopping itself.

A run with ``meta.validate_every = N`` adapts to the meta-validation episodes every N meta-steps and after the last
one, and adds ``"validation": {"dev_nll", "best_step", "best_dev_nll", "sigma_theta"}`` to that step's line of
``log.jsonl``; with ``meta.patience = P`` it stops after P validations in a row without a lower NLL, and its final
θ is the θ of the best validation (kept in ``OUT/best`` meanwhile).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from abmll.errors import NonFiniteError
from abmll.evaluation import evaluate, load_episodes
from abmll.methods.base import Method
from abmll.metrics import gold_nll
from abmll.tasks.data import Episode
from abmll.tasks.readers import ColumnData, load_training_tasks, metaicl_files


def dev_episodes(
    data: Path | ColumnData, tasks: list[str], k: int, seeds: list[int], query_size: int | None
) -> dict[str, list[Episode]]:
    """The dev tasks' episodes (:func:`abmll.evaluation.load_episodes`). A task with only training files (no
    ``{task}.jsonl`` and no ``_test`` file, as the built-in suite's dev tasks) serves its training examples as
    a ``{task}.jsonl`` would: each support set drawn from them with its seed, query sets disjoint from it and
    across seeds."""
    if isinstance(data, ColumnData):
        return load_episodes(data, tasks, k, seeds, query_size)
    with_pool, without = [], []
    for name in tasks:
        files = metaicl_files(data, name)
        whole = Path(data) / name / f"{name}.jsonl"
        has_pool = whole.is_file() or any(split == "test" for (_, _, split) in files)
        (with_pool if has_pool else without).append(name)
    episodes = load_episodes(data, with_pool, k, seeds, query_size) if with_pool else {}
    if without:
        loaded, sources = load_training_tasks(data, without)
        pooled = ColumnData(Path(data), {}, {t.name: t for t in loaded}, sources)
        episodes.update(load_episodes(pooled, without, k, seeds, query_size))
    return {name: episodes[name] for name in tasks}


def episode_nll(rows: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """The mean query NLL of each (task, seed) episode of :func:`abmll.evaluation.evaluate`'s rows."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["task"], row["seed"]), []).append(row)
    out = {}
    for key, cell in cells.items():
        width = max(len(r["probs"]) for r in cell)
        probs = torch.tensor([r["probs"] + [0.0] * (width - len(r["probs"])) for r in cell], dtype=torch.float64)
        out[key] = gold_nll(probs, [r["gold"] for r in cell])
    return out


def mean_query_nll(method: Method, episodes: dict[str, list[Episode]]) -> float:
    """The meta-validation loss: the mean over episodes of the mean query NLL after adapting to each support set
    (``inf`` when a prediction is not finite, e.g. a diverged adaptation)."""
    try:
        rows = evaluate(method, episodes)
    except NonFiniteError:
        return math.inf
    values = list(episode_nll(rows).values())
    return sum(values) / len(values)


@torch.no_grad()
def mean_sigma(method: Method) -> float | None:
    """The mean σθ over every entry of every adapted layer (None for a method without σ)."""
    theta = getattr(method, "theta", None)
    if not getattr(method, "bayesian", False) or not theta:
        return None
    from abmll.bayes.inject import group_by_layer

    total, count = 0.0, 0
    for name, factors in group_by_layer(theta).items():
        sigma = method.layers[name].sigma({k: v.float() for k, v in factors.items()})
        total += float(sigma.sum())
        count += sigma.numel()
    return total / count


@dataclass
class EarlyStopping:
    """The best meta-validation NLL so far, its step, and the validations since; :attr:`stop` after ``patience``
    of them without improvement (never with ``patience`` None)."""

    patience: int | None
    best_nll: float = math.inf
    best_step: int | None = None
    since: int = 0

    def update(self, step: int, nll: float) -> bool:
        """Record a validation; True when it is the best so far."""
        if nll < self.best_nll:
            self.best_nll, self.best_step, self.since = nll, step, 0
            return True
        self.since += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.since >= self.patience

    @classmethod
    def from_log(cls, path: Path, patience: int | None) -> EarlyStopping:
        """The state after the validations recorded in a run's ``log.jsonl`` (a resumed run continues it)."""
        state = cls(patience)
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                    value = record["validation"]["dev_nll"]
                except (ValueError, KeyError, TypeError):
                    continue
                state.update(int(record["step"]), math.inf if value is None else float(value))
        return state


__all__ = ["EarlyStopping", "dev_episodes", "episode_nll", "mean_query_nll", "mean_sigma"]
