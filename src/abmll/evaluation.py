"""Evaluate a method on unseen tasks: adapt on each k-shot support set, predict the query set, compute the
metrics of METHOD.md section 5 per seed, per task (mean over seeds, 95 % t-interval) and across tasks
(macro-average), and keep every per-example probability.

``results.json`` schema (stable; ``schema_version`` :data:`RESULTS_SCHEMA_VERSION`, files without one are
version 1 and read the same)::

    {"schema_version", "method", "model", "config", "versions", "k", "seeds", "query_size", "query_sets",
     "tasks": {NAME: {"n", "accuracy", "macro_f1", "ece", "mce", "nll", "brier", "majority_accuracy",
                      "top_prediction_share", "auroc", "reliability", "interval": {METRIC: {mean, low, high, n}},
                      "per_seed": [{"seed", METRIC...}]}},
     "mean": {METRIC..., "n_tasks", "interval": {METRIC: {mean, low, high, n}}}}

``query_sets`` says how each task's query sets were drawn, disjoint across seeds (:func:`query_sets`).
Task metrics are the means over seeds; ``reliability`` pools the predictions of all seeds; ``mean`` is the
macro-average over tasks, with its interval taken over the per-seed macro-averages. Everything is computed
from the per-example probabilities kept in ``predictions.jsonl`` (:func:`summarise`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from abmll.checkpoint import read_json_object, versions, write_json_atomic, write_text_atomic
from abmll.errors import ConfigError, DataError, NonFiniteError
from abmll.methods.base import Method
from abmll.metrics import macro_average, mean_interval, reliability_bins, task_metrics
from abmll.tasks.data import Episode, Example, Task, disjoint_queries, example_key, sample_support
from abmll.tasks.readers import ColumnData, metaicl_files, metaicl_path, read_metaicl_file, union_of_files

SCALARS = (
    "accuracy",
    "macro_f1",
    "ece",
    "mce",
    "nll",
    "brier",
    "majority_accuracy",
    "top_prediction_share",
    "auroc",
)
ProgressFn = Callable[[str, int, int], None]
#: Version of the ``results.json`` schema above (written by :func:`write_results` and ``abmll compare``).
RESULTS_SCHEMA_VERSION = 1


def load_episodes(
    data_dir: str | Path | ColumnData,
    tasks: Sequence[str],
    k: int,
    seeds: Sequence[int],
    query_size: int | None = None,
    all_seeds: Sequence[int] | None = None,
) -> dict[str, list[Episode]]:
    """Episodes of each task and seed (:func:`support_set`, :func:`query_pool`), with query sets disjoint
    across ``all_seeds`` (every seed of the evaluation; default ``seeds``): see
    :func:`abmll.tasks.data.disjoint_queries`. Each episode's ``meta`` records its query set's provenance
    (:func:`query_sets`). From :class:`~abmll.tasks.readers.ColumnData`, a task's examples are what a
    ``{task}.jsonl`` file would hold: each support set is drawn from them with the seed, the query pool is all
    of them."""
    order = list(seeds if all_seeds is None else all_seeds)
    out: dict[str, list[Episode]] = {}
    for name in tasks:
        if isinstance(data_dir, ColumnData):
            task, pool_source = data_dir.task(name), data_dir.sources[name]
            supports = {seed: _drawn_support(task, k, seed, pool_source) for seed in seeds}
            pool = task.examples
        else:
            files = metaicl_files(data_dir, name)
            supports = {seed: support_set(data_dir, name, k, seed, files) for seed in seeds}
            pool, pool_source = query_pool(data_dir, name, files)
        queries = disjoint_queries(name, pool, order, {s: sup for s, (sup, _) in supports.items()}, query_size)
        n_pool = len({example_key(name, ex) for ex in pool})
        out[name] = [
            Episode(
                name,
                supports[seed][0],
                queries[seed],
                seed,
                {"pool": n_pool, "pool_source": pool_source, "parts": len(order), "support_source": supports[seed][1]},
            )
            for seed in seeds
        ]
    return out


def support_set(
    data_dir: str | Path, task: str, k: int, seed: int, files: dict | None = None
) -> tuple[list[Example], str]:
    """The k-shot support set of ``task`` for ``seed`` and where it came from: the file
    ``{task}_{k}_{seed}_train.jsonl``; else k examples drawn with the seed from the file of the smallest larger
    k (``{task}_{k'}_{seed}_train.jsonl``); else k examples drawn with the seed from ``{task}.jsonl``."""
    files = metaicl_files(data_dir, task) if files is None else files
    larger = sorted(kf for (kf, s, split) in files if s == seed and split == "train" and kf >= k)
    if larger:
        path = files[(larger[0], seed, "train")]
        examples = read_metaicl_file(path, task).examples
        if len(examples) != larger[0]:
            raise DataError(f"{path}: holds {len(examples)} examples, expected k = {larger[0]}")
        if larger[0] == k:
            return examples, path.name
        picked = random.Random(seed).sample(range(len(examples)), k)
        return [examples[i] for i in picked], f"{k} of {path.name}, drawn with seed {seed}"
    whole = Path(data_dir) / task / f"{task}.jsonl"
    if not whole.is_file():
        have = sorted(p.name for p in files.values()) or "none"
        raise DataError(
            f"{metaicl_path(data_dir, task, k, seed, 'train')}: no support file for task '{task}' at k={k}, "
            f"seed={seed} (nor at a larger k), and no {task}.jsonl to draw one from; its k-shot files: {have}"
        )
    return _drawn_support(read_metaicl_file(whole, task), k, seed, whole.name)


def _drawn_support(task: Task, k: int, seed: int, source: str) -> tuple[list[Example], str]:
    """k examples of ``task`` drawn with the seed (:func:`~abmll.tasks.data.sample_support`), and a line saying so."""
    picked = sample_support(task, k, seed)
    return [task.examples[i] for i in picked], f"{k} drawn from {source} with seed {seed}"


def query_pool(data_dir: str | Path, task: str, files: dict | None = None) -> tuple[list[Example], str]:
    """The examples query sets are drawn from and where they came from: ``{task}.jsonl`` when present, else
    the union of every ``{task}_{k}_{seed}_test.jsonl`` file (any k and seed; a copy counted once)."""
    files = metaicl_files(data_dir, task) if files is None else files
    whole = Path(data_dir) / task / f"{task}.jsonl"
    if whole.is_file():
        return read_metaicl_file(whole, task).examples, whole.name
    tests = [path for (_, _, split), path in files.items() if split == "test"]
    if not tests:
        raise DataError(
            f"{Path(data_dir) / task}: task '{task}' has no {task}.jsonl and no {task}_{{k}}_{{seed}}_test.jsonl "
            "file to draw query sets from"
        )
    source = tests[0].name if len(tests) == 1 else f"the union of {len(tests)} test files"
    return union_of_files(task, tests).examples, source


def query_sets(episodes: dict[str, list[Episode]], query_size: int | None) -> dict[str, Any]:
    """Per task, how its query sets were drawn: ``{"pool", "source", "parts", "requested", "disjoint": true,
    "enough", "per_seed": [{"seed", "query", "support"}]}``; ``enough`` is false when a seed got fewer than
    ``query_size`` examples (its disjoint part of the pool was too small)."""
    record: dict[str, Any] = {}
    for name, eps in episodes.items():
        first = eps[0].meta
        per_seed = [{"seed": ep.seed, "query": len(ep.query), "support": ep.meta["support_source"]} for ep in eps]
        record[name] = {
            "pool": first["pool"],
            "source": first["pool_source"],
            "parts": first["parts"],
            "requested": query_size,
            "disjoint": True,
            "enough": query_size is None or all(r["query"] >= query_size for r in per_seed),
            "per_seed": per_seed,
        }
    return record


def query_warnings(record: dict[str, Any]) -> list[str]:
    """One line per task whose query pool was too small for disjoint query sets of the requested size."""
    lines = []
    for name, r in record.items():
        if not r["enough"]:
            got = ", ".join(f"seed {s['seed']}: {s['query']}" for s in r["per_seed"])
            lines.append(
                f"task '{name}': its query pool ({r['source']}) holds {r['pool']} examples, too few for "
                f"{r['parts']} disjoint query sets of {r['requested']}; each seed gets a smaller disjoint part "
                f"({got})"
            )
    return lines


CellRows = list[dict[str, Any]]


def evaluate(
    method: Method,
    episodes: dict[str, list[Episode]],
    progress: ProgressFn | None = None,
    done: dict[tuple[str, int], CellRows] | None = None,
    on_cell: Callable[[str, int, CellRows], None] | None = None,
) -> list[dict[str, Any]]:
    """Per-example predictions ``{"task", "seed", "id", "gold", "probs"}`` for every task and seed. The
    (task, seed) cells in ``done`` are taken from there (their ids must be the episode's query ids); every
    other cell, once predicted, is passed to ``on_cell`` (e.g. :meth:`PartialResults.save`). ``progress`` is
    called before each cell with the number of cells finished, and after it with one more."""
    predictions: list[dict[str, Any]] = []
    total = sum(len(v) for v in episodes.values())
    count = 0
    for name, eps in episodes.items():
        for ep in eps:
            what = f"{method.name}: {name} seed {ep.seed}"
            if progress is not None:
                progress(what, count, total)
            rows = (done or {}).get((name, ep.seed))
            if rows is not None:
                if [r["id"] for r in rows] != [ex.id for ex in ep.query]:
                    raise DataError(
                        f"the kept results of task '{name}' seed {ep.seed} are for other query examples than "
                        "its query set now (did the data change?); evaluate again without --resume into a new --out"
                    )
                what += " (kept)"
            else:
                method.task = name
                adapted = method.adapt(ep.support, ep.seed)
                probs = method.predict(adapted, ep.query, ep.seed)
                if not torch.isfinite(probs).all():
                    raise NonFiniteError(_diverged(method, name, ep.seed))
                kl = method.posterior_kl(adapted)
                rows = [
                    {"task": name, "seed": ep.seed, "id": ex.id, "gold": ex.gold, "probs": row[: len(ex.options)]}
                    | ({} if kl is None else {"posterior_kl": kl})
                    for ex, row in zip(ep.query, probs.tolist(), strict=True)
                ]
                if on_cell is not None:
                    on_cell(name, ep.seed, rows)
            predictions += rows
            count += 1
            if progress is not None:
                progress(what, count, total)
    return predictions


def _diverged(method: Method, task: str, seed: int) -> str:
    inner = method.config.inner
    alpha = inner.inner_lr if inner.test_inner_lr is None else inner.test_inner_lr
    return (
        f"{method.name}: task '{task}' seed {seed}: the predicted probabilities are not finite (the test-time "
        f"adaptation diverged: K_test = {inner.test_inner_steps} steps at α = {alpha}); lower inner.test_inner_lr "
        "(or inner.sigma_lr), or choose it on meta-validation tasks with abmll tune"
    )


class PartialResults:
    """The finished (task, seed) cells of an evaluation that has not written ``results.json`` yet, in
    ``OUT/.partial/``: ``run.json`` (what is evaluated) and one ``{task}.seed-{seed}.jsonl`` per cell, each
    written atomically, so a run killed at any point keeps every cell it finished. ``resume`` continues from
    them when ``run.json`` matches; without it an existing ``.partial/`` is refused (nothing is removed)."""

    NAME = ".partial"

    def __init__(self, out_dir: str | Path, run: dict[str, Any], resume: bool) -> None:
        self.folder = Path(out_dir) / self.NAME
        self.run = json.loads(json.dumps(run))  # as it reads back from JSON
        recorded = self.folder / "run.json"
        if self.folder.exists() and not resume:
            raise ConfigError(
                f"{self.folder} holds the finished cells of an interrupted evaluation; pass --resume to continue it, "
                f"or remove {self.folder} to start over"
            )
        if resume and recorded.is_file():
            try:
                before = json.loads(recorded.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise DataError(f"{recorded}: unreadable ({exc}); remove {self.folder} to start over") from None
            differ = sorted(key for key in set(before) | set(self.run) if before.get(key) != self.run.get(key))
            if differ:
                raise ConfigError(
                    f"{recorded}: the interrupted evaluation had other {', '.join(differ)}; resume with the same "
                    f"options, or remove {self.folder} to start over"
                )
        else:
            write_json_atomic(recorded, self.run)

    def path(self, task: str, seed: int) -> Path:
        return self.folder / f"{task}.seed-{seed}.jsonl"

    def cells(self, episodes: dict[str, list[Episode]]) -> dict[tuple[str, int], CellRows]:
        """The kept cells of ``episodes``."""
        out = {}
        for name, eps in episodes.items():
            for ep in eps:
                path = self.path(name, ep.seed)
                if path.is_file():
                    out[(name, ep.seed)] = read_predictions(path)
        return out

    def save(self, task: str, seed: int, rows: CellRows) -> None:
        write_text_atomic(self.path(task, seed), "".join(json.dumps(r) + "\n" for r in rows))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def prediction_matrix(rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities padded with zeros to the widest row, gold indices) of prediction records."""
    width = max(len(r["probs"]) for r in rows)
    probs = torch.tensor([r["probs"] + [0.0] * (width - len(r["probs"])) for r in rows], dtype=torch.float64)
    return probs, torch.tensor([r["gold"] for r in rows])


def summarise(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"tasks", "mean"}`` of the results schema, recomputed from per-example predictions alone."""
    by_task: dict[str, dict[int, list[dict]]] = {}
    for row in predictions:
        by_task.setdefault(row["task"], {}).setdefault(row["seed"], []).append(row)
    tasks: dict[str, Any] = {}
    per_seed_by_seed: dict[int, list[dict]] = {}
    for name, seeds in by_task.items():
        per_seed = []
        for seed, rows in seeds.items():
            metrics = task_metrics(*prediction_matrix(rows))
            metrics.pop("reliability")
            per_seed.append({"seed": seed, **metrics})
            per_seed_by_seed.setdefault(seed, []).append(metrics)
        summary: dict[str, Any] = {"n": sum(r["n"] for r in per_seed) / len(per_seed)}
        for key in SCALARS:
            values = [r[key] for r in per_seed if r[key] is not None]
            summary[key] = sum(values) / len(values) if values else None
        summary["reliability"] = reliability_bins(*prediction_matrix([r for rows in seeds.values() for r in rows]))
        summary["interval"] = {
            key: mean_interval([r[key] for r in per_seed]) for key in SCALARS if summary[key] is not None
        }
        summary["per_seed"] = per_seed
        kls = [rows[0]["posterior_kl"] for rows in seeds.values() if "posterior_kl" in rows[0]]
        if kls:  # how far the task's posterior moved from the prior, mean over seeds (a Bayesian method)
            summary["posterior_kl"] = sum(kls) / len(kls)
        tasks[name] = summary
    mean = macro_average([{k: v for k, v in t.items() if k in SCALARS or k == "n"} for t in tasks.values()])
    seed_means = [macro_average(rows) for rows in per_seed_by_seed.values()]
    mean["interval"] = {
        key: mean_interval([m[key] for m in seed_means]) for key in SCALARS if mean.get(key) is not None
    }
    return {"tasks": tasks, "mean": mean}


def format_metric(row: dict[str, Any], key: str, scale: float = 1.0, digits: int = 3) -> str:
    """One table cell: the value (times ``scale``) and, across several seeds, its 95 % interval half-width."""
    value = row.get(key)
    if value is None:
        return "–"
    text = f"{value * scale:.{digits}f}"
    interval = row.get("interval", {}).get(key)
    if interval and interval["n"] > 1:
        text += f" ± {(interval['high'] - interval['mean']) * scale:.{digits}f}"
    return text


def results_markdown(results: dict[str, Any]) -> str:
    """A Markdown table: per task and mean, accuracy, ECE (%), NLL, Brier and the diagnostics."""
    seeds = results.get("seeds", [])
    lines = [
        f"Method `{results.get('method')}` on model `{results.get('model')}`, k = {results.get('k')}, "
        f"seeds {seeds}. Values are means over seeds"
        + (" ± 95 % t-interval half-width." if len(seeds) > 1 else "."),
        "",
        "| task | n | accuracy | ECE % | NLL | Brier | macro-F1 | majority acc | top-pred share | AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    rows = list(results["tasks"].items()) + [("**mean**", results["mean"])]
    for name, row in rows:
        n = row.get("n")
        cells = [format_metric(row, "accuracy"), format_metric(row, "ece", 100, 1)]
        cells += [format_metric(row, key) for key in ("nll", "brier", "macro_f1", "majority_accuracy")]
        cells += [format_metric(row, key) for key in ("top_prediction_share", "auroc")]
        lines.append(f"| {name} | {n:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines + query_sets_markdown(results.get("query_sets"))) + "\n"


def query_sets_markdown(record: dict[str, Any] | None) -> list[str]:
    """Lines saying how the query sets were drawn, naming every task whose pool was too small."""
    if not record:
        return []
    any_task = next(iter(record.values()))
    lines = [
        "",
        f"Query sets are disjoint across the {any_task['parts']} seed(s) of the evaluation: each task's query "
        "pool is shuffled by content and cut into one part per seed, less that seed's support examples"
        + (f", at most {any_task['requested']} per seed." if any_task["requested"] is not None else "."),
    ]
    lines += [f"- {line}" for line in query_warnings(record)]
    return lines


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_results(out_dir: str | Path, predictions: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``predictions.jsonl``, ``results.md`` and, last and atomically, ``results.json``; returns the
    results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = {"schema_version": RESULTS_SCHEMA_VERSION, **meta, "versions": versions(), **summarise(predictions)}
    tmp = out / ".predictions.jsonl.tmp"
    with open(tmp, "w") as fh:
        for row in predictions:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, out / "predictions.jsonl")
    (out / "results.md").write_text(results_markdown(full))
    write_json_atomic(out / "results.json", full)
    return full


def read_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` as a dict (one without ``schema_version`` is version 1); raises :class:`DataError`
    naming the file when it is unreadable or of a newer schema than this abmll writes."""
    path = Path(path)
    data = read_json_object(path, DataError)
    version = data.setdefault("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DataError(f"{path}: field 'schema_version' = {version!r} is invalid: expected an integer ≥ 1")
    if version > RESULTS_SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema_version {version} is newer than this abmll reads ({RESULTS_SCHEMA_VERSION}); "
            "upgrade abmll to read it"
        )
    return data


def clear_results(out_dir: str | Path) -> None:
    """Remove a previous ``results.json`` so that an interrupted run never leaves one that looks complete."""
    Path(out_dir, "results.json").unlink(missing_ok=True)
