"""A meta-training run on disk: the resolved config, a JSONL log of every meta-step, periodic checkpoints
(θ, optimiser state, RNG states, sampler position, step) that a resumed run continues from exactly, and the
final θ.

    OUT/.lock                   held (fcntl.flock) while a run writes here: a second run fails at once
    OUT/config.json             the run's config (as of its latest start), method, model, tasks and versions
    OUT/config_history.jsonl    every config the run has used, each with the meta-step it took over after
    OUT/log.jsonl               one line per meta-step: losses, KL, β·KL / NLL, gradient norm; and a line
                                {"step", "event": "config_change", "changes"} where a resume changed the config
    OUT/checkpoints/step-NNNNNN checkpoints for resuming (the latest valid one is used)
    OUT/final                   the trained θ (a checkpoint folder), written when the run completes

Meta-batches are a pure function of (seed, step), so a resumed run draws the same episodes as an
uninterrupted one. A resumed run must have the config of the checkpoint it continues (up to the run's length
and checkpoint interval, :data:`RESUMABLE_FIELDS`); a different one is refused with :class:`ConfigError`
naming the fields, unless ``allow_config_change`` accepts it, and then the change is recorded with its step.
Reliability:

- every checkpoint is written to a temporary folder, fsynced and renamed into place; one that fails its
  checksums is skipped with a warning and the previous one is used;
- a NaN or infinite loss or gradient stops the run with :class:`NonFiniteError` before θ changes (the last
  checkpoint is kept), or skips the meta-step with ``meta.nonfinite = "skip"`` (counted in the log);
- the first SIGINT or SIGTERM stops the run after the current meta-step, writes a checkpoint and raises
  :class:`RunInterrupted` (exit status 130 or 143 from the CLI); a second one interrupts at once.

One module of about 440 lines on purpose: the run folder's guarantees (one writer under a lock, the log on
disk before the checkpoint that covers it, atomic checkpoints, exact resume, signals) are one protocol, and
splitting it would spread each guarantee over several files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from abmll.checkpoint import (
    check_fits,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    versions,
    write_json_atomic,
    write_text_atomic,
)
from abmll.config import ABMLLConfig
from abmll.distributed import barrier, is_main_process, max_over_processes
from abmll.errors import CheckpointError, ConfigError, RunInterrupted, RunLockedError
from abmll.methods.base import Method, StepLog
from abmll.tasks.data import Episode, MetaBatchSampler, Task
from abmll.tracking import Tracker
from abmll.validation import EarlyStopping, mean_query_nll, mean_sigma

try:
    import fcntl
except ImportError:  # pragma: no cover - no advisory locks on Windows
    fcntl = None

logger = logging.getLogger("abmll.runner")
KEEP_CHECKPOINTS = 2
LOCK_FILE = ".lock"
#: Names of the temporary files and folders a killed run may leave behind (removed when a run starts).
_PARTIAL_PREFIXES = (".step-", ".trash-", ".final.", ".log.jsonl.", ".config.json.", ".config_history.jsonl.")
#: Config fields a resumed run may change without ``allow_config_change``: they set how long the run goes on
#: and how often it checkpoints, never what a meta-step computes.
RESUMABLE_FIELDS = ("meta.meta_steps", "meta.checkpoint_every", "meta.validate_every", "meta.patience")
#: The θ of the best meta-validation so far, under a run with ``meta.patience`` (:mod:`abmll.validation`).
BEST = "best"
CONFIG_HISTORY = "config_history.jsonl"
_held_locks: dict[str, int] = {}


# --- the output folder's lock ------------------------------------------------------------------------
@contextmanager
def run_lock(out_dir: str | Path, shared: bool = False) -> Iterator[Path]:
    """Create ``out_dir`` and hold an exclusive ``fcntl.flock`` on ``OUT/.lock`` for the duration; raise
    :class:`RunLockedError` at once when another process holds it. ``shared``: a shared lock instead, which
    other shared holders may hold too (workers of one resumed comparison) but an exclusive one may not.
    Re-entrant within one process; the operating system releases it when the process ends, however it ends."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output folder {out} cannot be created ({exc.strerror or exc})") from None
    key = os.path.realpath(out)
    if fcntl is None or key in _held_locks:
        _held_locks[key] = _held_locks.get(key, 0) + 1
        try:
            yield out
        finally:
            _held_locks[key] -= 1
            if not _held_locks[key]:
                del _held_locks[key]
        return
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"output folder {out}: cannot open its lock file ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            raise RunLockedError(
                f"output folder {out} is in use by another abmll run (it holds {out / LOCK_FILE}); wait for "
                "that run to end or choose another output folder"
            ) from None
        _held_locks[key] = 1
        try:
            yield out
        finally:
            del _held_locks[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- signals -----------------------------------------------------------------------------------------
@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Catch SIGINT and SIGTERM: the first one is recorded in the yielded list (the run stops after the
    current meta-step), a second one raises KeyboardInterrupt at once. Only in the main thread (elsewhere
    Python cannot install handlers, and the list stays empty)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


# --- checkpoints -------------------------------------------------------------------------------------
def _candidates(out: Path) -> list[Path]:
    found = [out / "final"] if (out / "final").is_dir() else []
    if (out / "checkpoints").is_dir():
        found += sorted((out / "checkpoints").glob("step-*"), reverse=True)
    return found


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The valid checkpoint at the latest step among ``OUT/checkpoints/step-*`` and ``OUT/final`` (saved with
    trainer state, so a finished run resumed with a larger ``meta_steps`` continues from it). Checkpoints that
    fail their checksums are skipped with a warning."""
    best, best_step = None, -1
    for path in _candidates(Path(out_dir)):
        try:
            step = load_checkpoint(path, trainer=True)["trainer_values"].get("step", 0)
            if isinstance(step, bool) or not isinstance(step, int):
                raise CheckpointError(f"{path}: trainer state has step {step!r}, expected an integer")
        except CheckpointError as exc:
            logger.warning("skipping checkpoint %s: %s; using the previous one", path, exc)
            continue
        if step > best_step:
            best, best_step = path, step
    return best


def _remove_partial(out: Path) -> None:
    """Remove the temporary files and folders that a killed run left behind (the lock is held)."""
    for folder in (out, out / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(_PARTIAL_PREFIXES):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _prune(folder: Path) -> None:
    """Keep the newest ``KEEP_CHECKPOINTS`` checkpoints; an old one is renamed away before it is deleted, so
    a kill never leaves half of one under a ``step-*`` name."""
    for old in sorted(folder.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        trash = folder / f".trash-{old.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of meta-steps ≤ ``step`` (those the restored state has taken) and the events before
    ``step`` (an event at ``step`` belongs to the start that is being replaced); a line cut short by a kill is
    dropped with a warning."""
    kept: list[str] = []
    if path.exists():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                line_step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                logger.warning("%s: dropping unreadable line %d (cut short by an interrupted run?)", path, n)
                continue
            if line_step < step or (line_step == step and "event" not in record):
                kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: ABMLLConfig, new: ABMLLConfig) -> dict[str, dict[str, Any]]:
    """``{field: {"from", "to"}}`` for every dotted config field whose value differs between two configs."""
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    return {k: {"from": a.get(k), "to": b.get(k)} for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _record_config(out: Path, step: int, config: ABMLLConfig, changes: dict[str, Any] | None) -> None:
    """Keep the history entries before ``step`` and append this start's config unless it is the one in force
    (up to :data:`RESUMABLE_FIELDS`); a change is also written to ``log.jsonl`` (after :func:`_truncate_log`)."""
    path = out / CONFIG_HISTORY
    entries: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                if int(entry["step"]) < step:
                    entries.append(entry)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
    def computing(values: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in _flat(values).items() if k not in RESUMABLE_FIELDS}

    if not entries or computing(entries[-1].get("config") or {}) != computing(config.to_dict()):
        entries.append({"step": step, "config": config.to_dict(), **({"changes": changes} if changes else {})})
    write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in entries))
    if changes:
        with open(out / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "event": "config_change", "changes": changes}) + "\n")


def _sampler_info(config: ABMLLConfig, tasks: list[Task]) -> dict[str, Any]:
    meta = config.meta
    return {
        "seed": config.seed,
        "tasks": [t.name for t in tasks],
        "support_size": meta.support_size,
        "query_size": meta.query_size,
        "meta_batch_size": meta.meta_batch_size,
    }


def _save(method: Method, path: Path, info: dict[str, Any], sampler: dict[str, Any]) -> None:
    tensors, values = method.trainer_state()
    rng_tensors, rng_values = rng_state()
    values = {
        **values,
        "skipped_steps": method.skipped_steps,
        "sampler": {**sampler, "position": method.step},
        "rng": rng_values,
    }
    save_checkpoint(path, method.state_dict(), method.config, info, {**tensors, **rng_tensors}, values)


def _restore(method: Method, ckpt: Path, sampler: dict[str, Any], allow_config_change: bool) -> dict[str, Any]:
    """Load ``ckpt`` into ``method``; returns the config fields this run changes (empty when none)."""
    state = load_checkpoint(ckpt, trainer=True)
    check_fits(state["theta"], method.state_dict(), str(ckpt))
    tensors, values = state["trainer_tensors"], state["trainer_values"]
    saved = values.get("sampler")
    if isinstance(saved, dict):
        differ = [key for key in sampler if saved.get(key) != sampler[key]]
        if differ:
            was = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
            now = ", ".join(f"{k}={sampler[k]!r}" for k in differ)
            raise CheckpointError(
                f"{ckpt}: was trained with {was}, but this run has {now}; resume with the same tasks, seed and "
                "episode sizes, or choose another output folder"
            )
    changes = config_changes(state["config"], method.config)
    changed = {k: v for k, v in changes.items() if k not in RESUMABLE_FIELDS}
    if changed and not allow_config_change:
        was = ", ".join(f"{k}={v['from']!r}" for k, v in changed.items())
        now = ", ".join(f"{k}={v['to']!r}" for k, v in changed.items())
        raise ConfigError(
            f"{ckpt}: the run was trained with {was}, but this run has {now}; resume with the run's config, or "
            "accept the change explicitly (abmll train --allow-config-change, allow_config_change=True): it is "
            f"then recorded with its step in log.jsonl and {CONFIG_HISTORY}"
        )
    try:
        method.load_state_dict(state["theta"])
        method.load_trainer_state(tensors, values)
        method.skipped_steps = int(values.get("skipped_steps", 0))
        if "rng" in values and "rng.torch" in tensors:
            set_rng_state(tensors, values["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt}: trainer state could not be restored ({type(exc).__name__}: {exc})") from None
    return changed


# --- the run -----------------------------------------------------------------------------------------
def meta_train_run(
    method: Method,
    tasks: list[Task],
    out_dir: str | Path,
    info: dict[str, Any],
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    allow_config_change: bool = False,
    tracker: Tracker | None = None,
    validation: dict[str, list[Episode]] | None = None,
) -> Path:
    """Meta-train ``method`` on ``tasks`` into ``out_dir``; returns the folder of the final θ. ``tracker``
    (:class:`abmll.tracking.Tracker`) gets every meta-step's ``log.jsonl`` record too, at its step.

    With ``validation`` (the meta-validation episodes, :func:`abmll.validation.dev_episodes`) and
    ``meta.validate_every``, the run validates and, with ``meta.patience``, stops early and keeps the best θ
    (:mod:`abmll.validation`).

    With ``resume``, a config that differs from the checkpoint's (beyond :data:`RESUMABLE_FIELDS`) raises
    :class:`ConfigError` naming the fields, unless ``allow_config_change``: then the run continues with it and
    the change is recorded with its step in ``log.jsonl`` and ``config_history.jsonl``.

    Raises :class:`RunLockedError` when another run writes into ``out_dir``, :class:`NonFiniteError` on a
    NaN/Inf loss or gradient (``meta.nonfinite = "stop"``) and :class:`RunInterrupted` after SIGINT/SIGTERM;
    in all three cases the checkpoints already written are left intact and no ``final`` is written.

    Run on several ranks (:mod:`abmll.distributed`), every rank calls this with the same arguments; only
    rank 0 takes the lock and writes files (after each meta-step, which every rank has finished by then), and
    ``progress`` and ``tracker`` are used on rank 0 only. Every rank returns once ``final`` is written."""
    main = is_main_process()
    with run_lock(out_dir) if main else nullcontext(Path(out_dir)) as out, stop_requests() as stop:
        final = _run(
            method, tasks, out, info, resume, progress if main else None, stop, main, allow_config_change,
            tracker if main else None, validation,
        )  # fmt: skip
    barrier()
    return final


def _run(
    method: Method,
    tasks: list[Task],
    out: Path,
    info: dict[str, Any],
    resume: bool,
    progress: Callable[[dict[str, Any]], None] | None,
    stop: list[int],
    main: bool = True,
    allow_config_change: bool = False,
    tracker: Tracker | None = None,
    validation: dict[str, list[Episode]] | None = None,
) -> Path:
    config: ABMLLConfig = method.config
    total = config.meta.meta_steps
    if main:
        _remove_partial(out)
    sampler_info = _sampler_info(config, tasks)
    changes: dict[str, Any] = {}
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            changes = _restore(method, ckpt, sampler_info, allow_config_change)
            logger.info("resumed from %s at step %d", ckpt, method.step)
        elif _candidates(out):
            raise CheckpointError(
                f"{out}: no valid checkpoint to resume from (every one failed its checks); remove "
                f"{out / 'checkpoints'} and {out / 'final'} to start over"
            )
    elif (out / "final").exists() or (out / "checkpoints").exists():
        raise CheckpointError(f"{out} already holds a run; pass resume=True (--resume) or choose another folder")
    log_path = out / "log.jsonl"
    if main:  # other ranks write nothing (abmll.distributed)
        if tracker is not None:
            tracker.start()  # a backend that cannot start fails here, before any meta-step
        _truncate_log(log_path, method.step)  # the log matches the restored state
        _record_config(out, method.step, config, changes)
        if changes:
            logger.warning("config changed at meta-step %d: %s", method.step, changes)
        write_json_atomic(
            out / "config.json",
            {**info, "config": config.to_dict(), "tasks": [t.name for t in tasks], "versions": versions()},
        )
    sampler = MetaBatchSampler(
        tasks, config.meta.support_size, config.meta.query_size, config.meta.meta_batch_size, seed=config.seed
    )
    checkpoints = out / "checkpoints"
    saved_at = [method.step]
    every = config.meta.validate_every if validation else None
    stopping = EarlyStopping.from_log(log_path, config.meta.patience) if every else None

    def validate(step_log: StepLog) -> None:
        """Meta-validation after this step (every rank: under FSDP each forward pass needs all of them)."""
        nll = mean_query_nll(method, validation)
        improved = stopping.update(method.step, nll)
        step_log.validation = {
            "dev_nll": nll if math.isfinite(nll) else None,
            "best_step": stopping.best_step,
            "best_dev_nll": stopping.best_nll if math.isfinite(stopping.best_nll) else None,
            "sigma_theta": mean_sigma(method),
        }
        if improved and main and config.meta.patience is not None:
            _save(method, out / BEST, info, sampler_info)

    def save_step() -> Path:
        path = checkpoints / f"step-{method.step:06d}"
        if main:
            _save(method, path, info, sampler_info)
            _prune(checkpoints)
        saved_at[0] = method.step
        return path

    def on_step(step_log: StepLog) -> None:
        due = method.step % config.meta.checkpoint_every == 0 and method.step < total
        if every and (method.step % every == 0 or method.step == total):
            validate(step_log)
        record = step_log.to_dict()
        if not main:
            return
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            if due:  # the log is on disk before the checkpoint that covers it
                fh.flush()
                os.fsync(fh.fileno())
        if tracker is not None:
            tracker.log(record, step=method.step)
        if progress is not None:
            progress(record)
        if due:
            save_step()

    def should_stop(step: int) -> bool:
        # On several ranks a signal that reached any of them stops all of them after the same meta-step.
        signum = max_over_processes(stop[0] if stop else 0)
        if signum and not stop:
            stop.append(signum)
        early = stopping is not None and bool(max_over_processes(int(stopping.stop)))  # rank 0 holds the log
        return bool(signum) or early

    method.meta_train(sampler, log=on_step, should_stop=should_stop)
    if stop and method.step < total:
        path = checkpoints / f"step-{method.step:06d}"
        if saved_at[0] != method.step or not path.is_dir():
            path = save_step()
        name = signal.Signals(stop[0]).name
        raise RunInterrupted(
            f"{name} received: stopped after meta-step {method.step} of {total} and saved the checkpoint {path}; "
            "continue with --resume (resume=True)",
            exit_code=128 + stop[0],
        )
    final = out / "final"
    if main:
        if stopping is not None and config.meta.patience is not None and stopping.best_step not in (None, method.step):
            method.load_state_dict(load_checkpoint(out / BEST)["theta"])  # the final θ is the best validation's
        if stopping is not None and stopping.best_step is not None:
            info = {**info, "validation": {
                "best_step": stopping.best_step, "best_dev_nll": stopping.best_nll, "last_step": method.step,
                "stopped_early": stopping.stop, "final": "best" if config.meta.patience is not None else "last",
            }}  # fmt: skip
        _save(method, final, info, sampler_info)
    return final
