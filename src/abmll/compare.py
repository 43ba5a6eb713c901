"""The comparison harness behind ``abmll compare`` and ``abmll demo``: every method on the same model, the
same tasks, the same support sets, the same scorer and the same budget (METHOD.md section 6). A method's own
preset (:attr:`abmll.methods.Method.default_overrides`) is applied on
top of the shared config where that config leaves the field at the library default, and recorded in the
cell's ``train/config.json`` info, the method's ``results.json`` (``method_overrides``) and ``report.md``.
Values tuned on meta-validation tasks (:attr:`Comparison.tuned`, from ``abmll tune``'s ``tuned.json``) go on
top of both, recorded the same way (``tuned``).

One cell per (method, seed): meta-train with that seed (methods that learn across tasks), then adapt to every
test task from its k-shot support set drawn with that seed and score the query set. Cells are written to
``OUT/{method}/seed-{seed}/`` (checkpoint under ``train/final``, ``predictions.jsonl``, ``results.json``
written last, with the cell's wall time ``wall_s``), so ``resume`` skips the finished ones and a comparison
can grow over several sittings; a finished cell run with another config, k, query-set cap, model or test tasks
is refused by name, never pooled under this comparison's. A method that shares another's meta-training
(``abmll-icl``: ``abmll``'s) loads that cell's θ when it qualifies (:func:`shared_meta_training`). With
:attr:`Comparison.theta_from`, every meta-learner loads the θ of its (method, seed) cell in that other
comparison instead, which must qualify the same way (:func:`theta_from`): the test-time k does not enter
meta-training, so a study at k = 4 reuses the θ of the same study at k = 16.

The report pools each method's cells: ``OUT/report.md``, ``OUT/{method}/results.json``, a reliability
diagram per method, the training curves and, last, ``OUT/results.json`` with ``methods`` (each method's
results), ``paired`` (ABMLL minus each baseline per task), ``paired_mean`` (the same for the macro-average),
``demonstrations`` (how many support examples fit in the prompt, for methods that use them) and
``timings_s`` (seconds per cell).

About 500 lines on purpose: the cells, their resumption and the checks that a kept or shared cell was run as
this comparison would run it belong together; the report is :mod:`abmll.comparison_report`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abmll.assets import portable_path
from abmll.checkpoint import load_checkpoint
from abmll.comparison_report import write_report
from abmll.config import TEST_TIME_FIELDS, ABMLLConfig
from abmll.errors import AbmllError, CheckpointError, ConfigError, RunLockedError
from abmll.evaluation import (
    SCALARS,
    evaluate,
    load_episodes,
    query_sets,
    query_warnings,
    read_results,
    write_results,
)
from abmll.methods import METHODS, method_overrides
from abmll.models import DEFAULT_MODEL
from abmll.runner import meta_train_run, run_lock
from abmll.tasks.readers import ColumnData, load_training_tasks, read_column_data, read_setting
from abmll.tracking import Tracker, flatten
from abmll.validation import dev_episodes

logger = logging.getLogger("abmll.compare")

#: Budgets of the presets: config overrides shared by every method, and the evaluation protocol.
BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "setting": "smoke.json",
        "seeds": [100],
        "query_size": 8,
        "config": {
            "meta.meta_steps": 2, "meta.meta_batch_size": 1, "meta.support_size": 2, "meta.query_size": 2,
            "inner.inner_steps": 2, "inner.test_inner_steps": 1, "predict.samples": 2, "scoring.max_length": 128,
            "scoring.length_norm": "token", "meta.checkpoint_every": 1, "meta.micro_batch_size": 16,
        },
    },
    "quick": {
        "setting": "builtin.json",
        "seeds": [100],
        "query_size": 24,
        "config": {
            "meta.meta_steps": 10, "meta.meta_batch_size": 2, "meta.support_size": 4, "meta.query_size": 4,
            "inner.inner_steps": 2, "inner.test_inner_steps": 3, "predict.samples": 2, "scoring.max_length": 128,
            "scoring.length_norm": "token", "meta.checkpoint_every": 4, "meta.micro_batch_size": 8,
        },
    },
    "full": {
        "setting": "builtin.json",
        "seeds": [100, 13, 21],
        "query_size": 100,
        "config": {
            "meta.meta_steps": 10, "meta.meta_batch_size": 2, "meta.support_size": 4, "meta.query_size": 4,
            "inner.inner_steps": 2, "inner.test_inner_steps": 4, "predict.samples": 2, "scoring.max_length": 128,
            "scoring.length_norm": "token", "meta.checkpoint_every": 4, "meta.micro_batch_size": 8,
        },
    },
}


def check_methods(methods: list[str], seeds: list[int], what: str) -> None:
    """``--methods`` names only known methods, and ``what`` (a comparison, tuning) has at least one method and
    one seed; raises :class:`ConfigError` otherwise."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method(s) {unknown}; available: {sorted(METHODS)}")
    if not methods or not seeds:
        raise ConfigError(f"{what} needs at least one method and one seed")


@dataclass
class Comparison:
    """What to compare, on what, with which budget."""

    methods: list[str]
    data_dir: Path
    train_tasks: list[str]
    test_tasks: list[str]
    seeds: list[int]
    config: ABMLLConfig
    k: int = 16
    query_size: int | None = None
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``; None: where it loads); its dtype and
    #: quantisation are the config's ``compute`` section.
    device: str | None = None
    #: A column mapping: ``data_dir`` is then a datasets folder, a parquet, CSV or JSONL file, or a folder of
    #: them, read with :func:`abmll.tasks.readers.read_column_data` (None: a MetaICL folder).
    columns: dict[str, Any] | None = None
    #: Per method, config values tuned on meta-validation tasks (:func:`abmll.tune.read_tuned`), applied on top
    #: of the shared config and the method's own preset in each of its cells (:meth:`tuned_for`).
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The setting's meta-validation ('dev') tasks: with ``meta.validate_every`` every meta-training validates on
    #: them (and, with ``meta.patience``, stops early; :mod:`abmll.validation`).
    dev_tasks: list[str] = field(default_factory=list)
    #: Another comparison's folder: each meta-learner loads the θ of its (method, seed) cell there
    #: (:func:`theta_from`) instead of meta-training again (None: each meta-trains its own).
    theta_from: Path | None = None

    def tuned_for(self, method_name: str) -> dict[str, Any]:
        """The tuned values of ``method_name``; a method tuned on its own has its own, one that shares another's
        meta-training (``abmll-icl``: ``abmll``'s θ) and was not tuned on its own takes that method's, so that
        it can share its θ."""
        source = METHODS[method_name].meta_trained_as
        if method_name in self.tuned or source is None:
            return self.tuned.get(method_name, {})
        return self.tuned.get(source, {})
    _read: tuple[Any, Any] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def data(self) -> Path | ColumnData:
        """What :func:`load_episodes` and :func:`load_training_tasks` read: the MetaICL folder, or the tasks
        read through ``columns`` (read once)."""
        if self.columns is None:
            return self.data_dir
        key = (self.data_dir, json.dumps(self.columns, sort_keys=True))
        if self._read is None or self._read[0] != key:
            self._read = (key, read_column_data(self.data_dir, self.columns))
        return self._read[1]

    def __post_init__(self) -> None:
        check_methods(self.methods, self.seeds, "a comparison")
        if not self.train_tasks and self.config.meta.meta_steps > 0:
            learners = [m for m in self.methods if METHODS[m].meta_learns]
            if learners:
                raise ConfigError(
                    f"method(s) {', '.join(learners)} meta-train on the setting's 'train' tasks, but this comparison "
                    "has none (a setting without 'train', or --tasks); compare only methods that do not meta-train "
                    f"({', '.join(sorted(m for m, c in METHODS.items() if not c.meta_learns))}) or name 'train' tasks"
                )


def from_preset(
    name: str,
    methods: list[str],
    data_dir: Path,
    model: str | None,
    setting: Path | None = None,
    test_tasks: list[str] | None = None,
    columns: dict[str, Any] | None = None,
) -> Comparison:
    """A comparison with a preset's budget on a data folder: its tasks are ``setting``'s (default: the
    preset's file in the folder's ``settings/``), or ``test_tasks`` with no meta-training tasks. With
    ``columns`` (:attr:`Comparison.columns`), ``setting`` or ``test_tasks`` must name the tasks."""
    if name not in BUDGETS:
        raise ConfigError(f"--preset {name!r} is invalid: expected one of {sorted(BUDGETS)}")
    spec = BUDGETS[name]
    if test_tasks is not None and setting is not None:
        raise ConfigError("give --setting or --tasks, not both")
    if columns is not None and test_tasks is None and setting is None:
        raise ConfigError(
            "data read through --columns has no settings/ folder: name its tasks with --setting or --tasks"
        )
    if test_tasks is not None:
        groups = {"train": [], "test": list(test_tasks), "dev": []}
    else:
        groups = read_setting(setting or Path(data_dir) / "settings" / spec["setting"])
    return Comparison(
        methods=methods,
        data_dir=Path(data_dir),
        train_tasks=groups["train"],
        test_tasks=groups["test"],
        dev_tasks=groups.get("dev", []),
        seeds=list(spec["seeds"]),
        config=ABMLLConfig().override(spec["config"]),
        query_size=spec["query_size"],
        model=model,
        extra={"preset": name, **({"columns": columns} if columns is not None else {})},
        columns=columns,
    )


#: ``progress(what, record)``: a comparison cell starting or finished (``{"cell", "done", "total"}``, counting
#: the cells this sitting runs; a finished one also has ``wall_s``), a meta-step's ``log.jsonl`` record, or the
#: evaluation of a cell (``{"done", "total", "what"}``, in (task, seed) cells).
Progress = Callable[[str, dict[str, Any]], None]


def shared_meta_training(comparison: Comparison, method_name: str, config: ABMLLConfig, out: Path) -> Path | None:
    """The finished θ (``train/final``) of the same seed's cell of the method whose meta-training
    ``method_name`` shares (:attr:`~abmll.methods.Method.meta_trained_as`), when that checkpoint verifies and
    records exactly this config, model, data and tasks with every meta-step done (or stopped early by its
    meta-validation); otherwise None (with a warning when a checkpoint is there but does not qualify), and the
    method trains its own."""
    source = METHODS[method_name].meta_trained_as
    final = out.parent.parent / source / out.name / "train" / "final" if source else None
    if final is None or not final.is_dir():
        return None
    unqualified = _unqualified(comparison, config, final)
    if unqualified:
        logger.warning("%s: not shared (%s); %s meta-trains its own θ", final, unqualified, method_name)
        return None
    return final


def theta_from(comparison: Comparison, method_name: str, seed: int, config: ABMLLConfig) -> Path | None:
    """With :attr:`Comparison.theta_from`, the finished θ (``train/final``) of ``method_name``'s cell of that
    seed in that comparison (of the method whose meta-training it shares, for ``abmll-icl``), which must record
    this cell's ``config`` but for its test-time fields (:data:`~abmll.config.TEST_TIME_FIELDS`: K_test, its α,
    S, the predictive's mode), and its model, data and tasks, with every meta-step done (or stopped early);
    raises :class:`ConfigError` naming the folder when it is missing or does not qualify. None without
    ``theta_from`` or for a method that does not meta-train."""
    if comparison.theta_from is None or not METHODS[method_name].meta_learns or config.meta.meta_steps == 0:
        return None
    source = METHODS[method_name].meta_trained_as or method_name
    final = Path(comparison.theta_from) / source / f"seed-{seed}" / "train" / "final"
    if not final.is_dir():
        raise ConfigError(
            f"--theta-from: {final} holds no finished θ; run that comparison's {source} seed {seed} cell first"
        )
    unqualified = _unqualified(comparison, config, final, ignore=TEST_TIME_FIELDS)
    if unqualified:
        raise ConfigError(f"--theta-from: {final} was not meta-trained as this comparison trains {method_name} "
                          f"seed {seed} ({unqualified})")  # fmt: skip
    return final


def _unqualified(
    comparison: Comparison, config: ABMLLConfig, final: Path, ignore: tuple[str, ...] = ()
) -> str | None:
    """Why the θ checkpoint ``final`` was not meta-trained as this comparison trains a cell with ``config``
    (its checksum fails, or its config but for the dotted fields ``ignore``, model, data, tasks or meta-steps
    differ); None when it was."""
    try:
        ckpt = load_checkpoint(final, trainer=True)
    except CheckpointError as exc:
        return str(exc)
    sampler = ckpt["trainer_values"].get("sampler", {})
    # a run that meta-validation stopped early (meta.patience) is finished at fewer meta-steps than its budget
    stopped_early = bool((ckpt["info"].get("validation") or {}).get("stopped_early"))
    recorded = {
        "config": {k: v for k, v in flatten(ckpt["config"].to_dict()).items() if k not in ignore},
        "model": ckpt["info"].get("model"),
        "data": ckpt["info"].get("data"),
        "columns": ckpt["info"].get("columns"),
        "tasks": sampler.get("tasks"),
        "steps": config.meta.meta_steps if stopped_early else sampler.get("position"),
    }
    wanted = {
        "config": {k: v for k, v in flatten(config.to_dict()).items() if k not in ignore},
        "model": comparison.model or DEFAULT_MODEL,
        "data": portable_path(comparison.data_dir),
        "columns": comparison.columns,
        "tasks": list(comparison.train_tasks),
        "steps": config.meta.meta_steps,
    }
    differ = sorted(key for key in wanted if recorded[key] != wanted[key])
    return f"its {differ} differ" if differ else None


def cell_config(comparison: Comparison, method_name: str, seed: int) -> ABMLLConfig:
    """The config of a (method, seed) cell: the shared config, the method's own preset, its tuned values, the
    seed."""
    overrides = method_overrides(method_name, comparison.config)  # e.g. maml: second-order gradients
    tuned = comparison.tuned_for(method_name)  # abmll tune's values, on top
    return comparison.config.override({**overrides, **tuned, "seed": seed})


def run_cell(
    comparison: Comparison,
    method_name: str,
    seed: int,
    out: Path,
    progress: Progress | None,
    tracker: Tracker | None = None,
) -> Path:
    """Meta-train (when the method learns across tasks) and evaluate one (method, seed) cell; its
    ``results.json`` records the cell's wall-clock seconds (``wall_s``) in this sitting. ``tracker`` gets the
    meta-steps and the cell's metrics under ``{method}/seed-{seed}/`` (:mod:`abmll.tracking`)."""
    from abmll.build import build
    from abmll.checkpoint import load_prior_into

    start = time.perf_counter()
    scoped = tracker.scoped(f"{method_name}/seed-{seed}") if tracker is not None else None
    overrides, tuned = method_overrides(method_name, comparison.config), comparison.tuned_for(method_name)
    config = cell_config(comparison, method_name, seed)
    method = build(comparison.model, method_name, config, device=comparison.device)
    model = method.model
    model_name = comparison.model or DEFAULT_MODEL
    info = {"method": method_name, "model": model_name, "data": portable_path(comparison.data_dir)}
    if comparison.columns is not None:
        info["columns"] = comparison.columns
    if overrides:
        info["method_overrides"] = overrides
    if tuned:
        info["tuned"] = tuned
    given = theta_from(comparison, method_name, seed, config)  # --theta-from: another comparison's cell
    shared = given or (shared_meta_training(comparison, method_name, config, out) if method.meta_learns else None)
    if shared is not None:  # e.g. abmll-icl scores with the θ of the abmll cell of this seed
        try:
            load_prior_into(model, shared)
        except CheckpointError as exc:  # e.g. other adapted modules: train as if it were not there
            if given is not None:
                raise ConfigError(f"--theta-from: {given} does not fit {method_name}'s adapters ({exc})") from exc
            logger.warning("%s: not shared (%s); %s meta-trains its own θ", shared, exc, method_name)
            shared = None
        else:
            cell_of = shared.parent.parent
            info["meta_trained_by"] = portable_path(cell_of) if given else f"{cell_of.parent.name}/{out.name}"
    if shared is None and method.meta_learns and config.meta.meta_steps > 0:
        tasks, info["train_files"] = load_training_tasks(comparison.data, comparison.train_tasks)
        meta_train_run(
            method,
            tasks,
            out / "train",
            info,
            resume=True,
            progress=(lambda r: progress(f"meta-training {method_name} seed {seed}", r)) if progress else None,
            tracker=scoped.scoped("train") if scoped is not None else None,
            validation=validation_episodes(comparison, config),
        )
    episodes = load_episodes(
        comparison.data, comparison.test_tasks, comparison.k, [seed], comparison.query_size, comparison.seeds
    )
    predictions = evaluate(
        method,
        episodes,
        (lambda d, i, n: progress(f"evaluating {method_name} seed {seed}", {"done": i, "total": n, "what": d}))
        if progress
        else None,
    )
    wall_s = round(time.perf_counter() - start, 3)
    cell = {
        **info,
        "k": comparison.k,
        "seeds": [seed],
        "query_size": comparison.query_size,
        "query_sets": query_sets(episodes, comparison.query_size),
        "config": config.to_dict(),
        "wall_s": wall_s,
    }
    results = write_results(out, predictions, cell)
    if scoped is not None:  # at the meta-step its θ was trained to (0: no meta-training)
        metrics = {task: {k: r[k] for k in SCALARS} for task, r in results["tasks"].items()}
        metrics["mean"] = {k: results["mean"][k] for k in SCALARS if k in results["mean"]}
        step = config.meta.meta_steps if method.meta_learns else 0
        scoped.log({"eval": metrics, "wall_s": wall_s}, step=step)
    return out


def validation_episodes(comparison: Comparison, config: ABMLLConfig) -> dict | None:
    """The meta-validation episodes of a cell's meta-training, when ``meta.validate_every`` is set (one per 'dev'
    task, seed 100); a comparison without 'dev' tasks then raises :class:`ConfigError`."""
    if config.meta.validate_every is None:
        return None
    if not comparison.dev_tasks:
        raise ConfigError("meta.validate_every needs meta-validation tasks: a setting with 'dev' tasks")
    meta = config.meta
    return dev_episodes(comparison.data, comparison.dev_tasks, meta.support_size, [100], meta.validation_query_size)


def run_comparison(
    comparison: Comparison,
    out_dir: str | Path,
    resume: bool = False,
    progress: Progress | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any] | None:
    """Run every (method, seed) cell not yet finished (with ``resume``), then write the pooled report.
    ``tracker`` (:class:`abmll.tracking.Tracker`) gets every cell's meta-steps and metrics.

    Resumed comparisons into the same folder share its cells out: each runs the cells no other holds (a lock per
    cell) and skips those another runs; a cell that shares another's meta-training (``abmll-icl``) waits for that
    cell to finish. The one that finds every cell finished writes the report; the others return None (and log the
    cells they left to others). A comparison that is not resumed holds the folder alone."""
    with run_lock(out_dir, shared=resume) as out:  # without resume, a second comparison into it fails at once
        return _run_cells(comparison, out, resume, progress, tracker)


PREVIOUS_REPORT = ".previous-results.json"


def _run_cells(
    comparison: Comparison, out: Path, resume: bool, progress: Progress | None, tracker: Tracker | None = None
) -> dict[str, Any] | None:
    # methods that share another's meta-training (abmll-icl) run after it, whatever the order asked for
    order = sorted(comparison.methods, key=lambda m: METHODS[m].meta_trained_as in comparison.methods)
    cells = [(m, s) for m in order for s in comparison.seeds]
    todo = [(m, s) for m, s in cells if not (resume and (out / m / f"seed-{s}" / "results.json").is_file())]
    for method_name, seed in cells:  # a kept cell must have been run as this comparison would run it
        if (method_name, seed) not in todo:
            _check_kept_cell(comparison, method_name, seed, out / method_name / f"seed-{seed}")
        else:  # and a θ taken from another comparison must be there, as this one would train it
            theta_from(comparison, method_name, seed, cell_config(comparison, method_name, seed))
    if (out / "results.json").is_file():  # set aside (not deleted) until the new report is written
        try:
            (out / "results.json").replace(out / PREVIOUS_REPORT)
        except FileNotFoundError:  # another worker of this comparison set it aside first
            pass
    earlier = _earlier_timings(out) if resume else {}
    drawn = load_episodes(  # every seed's query set, drawn once: the data is checked before any cell runs
        comparison.data, comparison.test_tasks, comparison.k, comparison.seeds, comparison.query_size
    )
    for line in query_warnings(query_sets(drawn, comparison.query_size)):
        logger.warning("%s", line)
    if tracker is not None:
        tracker.start()
    for n, (method_name, seed) in enumerate(todo):
        cell = out / method_name / f"seed-{seed}"
        if not resume and cell.exists() and any(cell.iterdir()):
            raise ConfigError(f"{cell} already holds results; pass --resume to keep them or choose another --out")
        source = METHODS[method_name].meta_trained_as
        if (cell / "results.json").is_file() or (
            source in comparison.methods and not (out / source / f"seed-{seed}" / "results.json").is_file()
        ):  # finished by another worker, or waiting for the θ it shares (run by another worker)
            continue
        what, name = f"{method_name} seed {seed}", f"{method_name}/seed-{seed}"
        with ExitStack() as held:
            try:
                held.enter_context(run_lock(cell))
            except RunLockedError:  # another worker of this comparison holds it: that one runs the cell
                continue
            if (cell / "results.json").is_file():
                continue
            if progress is not None:
                progress(what, {"cell": name, "done": n, "total": len(todo)})
            start = time.perf_counter()
            run_cell(comparison, method_name, seed, cell, progress, tracker)
        if progress is not None:
            wall_s = round(time.perf_counter() - start, 3)
            progress(what, {"cell": name, "done": n + 1, "total": len(todo), "wall_s": wall_s})
    left = [f"{m}/seed-{s}" for m, s in cells if not (out / m / f"seed-{s}" / "results.json").is_file()]
    if left:
        logger.warning(
            "%s: %d cell(s) left to another abmll compare --resume into this folder (%s); the report is written by "
            "the run that finds every cell finished (run it again when those are done)", out, len(left),
            ", ".join(left),
        )  # fmt: skip
        return None
    report = write_report(comparison, out, _cell_timings(comparison, out, earlier))
    (out / PREVIOUS_REPORT).unlink(missing_ok=True)
    return report


def _check_kept_cell(comparison: Comparison, method_name: str, seed: int, cell: Path) -> None:
    """Raise :class:`ConfigError` naming each field when a finished cell that ``resume`` would keep was run
    with another config (a field the cell's abmll did not know yet is not compared), k, query-set cap, model
    or test tasks than this comparison gives it: the report would pool it under a config it did not use."""
    recorded = read_results(cell / "results.json")
    config = cell_config(comparison, method_name, seed)
    ran, wanted = flatten(recorded.get("config") or {}), flatten(config.to_dict())
    differ = {f"config {key}": (ran[key], wanted[key]) for key in wanted if key in ran and ran[key] != wanted[key]}
    protocol = {
        "k": comparison.k,
        "query_size": comparison.query_size,
        "model": comparison.model or DEFAULT_MODEL,
        "test tasks": sorted(comparison.test_tasks),
    }
    for key, value in protocol.items():
        before = sorted(recorded.get("tasks") or {}) if key == "test tasks" else recorded.get(key, value)
        if before != value:
            differ[key] = (before, value)
    if differ:
        was = ", ".join(f"{key}={old!r}" for key, (old, _) in differ.items())
        now = ", ".join(f"{key}={new!r}" for key, (_, new) in differ.items())
        raise ConfigError(
            f"{cell}: this finished cell was run with {was}, but this comparison has {now}; --resume keeps only "
            "cells run as this comparison runs them: remove that cell's folder to run it again, or choose another --out"
        )


def _earlier_timings(out: Path) -> dict[str, float]:
    """The cell times of the report a previous sitting wrote into ``out`` (for cells that predate ``wall_s``)."""
    try:
        timings = read_results(out / PREVIOUS_REPORT).get("timings_s", {})
        return {str(k): float(v) for k, v in timings.items()}
    except (AbmllError, ValueError, TypeError, AttributeError):
        return {}


def _cell_timings(comparison: Comparison, out: Path, earlier: dict[str, float]) -> dict[str, float]:
    """Wall-clock seconds of every finished cell in ``out`` (also of methods this comparison leaves out): its
    own ``wall_s``, else the time an earlier report recorded for it; in the order of the methods."""
    timings: dict[str, float] = {}
    for path in sorted(out.glob("*/seed-*/results.json"), key=lambda p: _cell_order(comparison, p)):
        name = f"{path.parent.parent.name}/{path.parent.name}"
        try:
            recorded = read_results(path).get("wall_s", earlier.get(name))
        except AbmllError:
            recorded = earlier.get(name)
        if isinstance(recorded, (int, float)):
            timings[name] = recorded
    return timings


def _cell_order(comparison: Comparison, path: Path) -> tuple[int, int, str]:
    method, seed = path.parent.parent.name, path.parent.name.removeprefix("seed-")
    methods, seeds = comparison.methods, [str(s) for s in comparison.seeds]
    return (
        methods.index(method) if method in methods else len(methods),
        seeds.index(seed) if seed in seeds else len(seeds),
        str(path),
    )
