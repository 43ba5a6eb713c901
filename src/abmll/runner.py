"""A meta-training run on disk: the resolved config, a JSONL log of every meta-step, periodic checkpoints
(θ, optimiser state, step) that a resumed run continues from exactly, and the final θ.

    OUT/config.json             the run's config, method, model, tasks and versions
    OUT/log.jsonl               one line per meta-step: losses, KL, β·KL / NLL, gradient norm
    OUT/checkpoints/step-NNNNNN checkpoints for resuming (the latest valid one is used)
    OUT/final                   the trained θ (a checkpoint folder), written when the run completes

Meta-batches are a pure function of (seed, step), so a resumed run draws the same episodes as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from abmll.checkpoint import check_fits, load_checkpoint, save_checkpoint, versions, write_json_atomic
from abmll.config import ABMLLConfig
from abmll.errors import CheckpointError
from abmll.methods.base import Method
from abmll.tasks.data import MetaBatchSampler, Task

logger = logging.getLogger("abmll.runner")
KEEP_CHECKPOINTS = 2


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The valid checkpoint at the latest step among ``OUT/checkpoints/step-*`` and ``OUT/final`` (saved with
    trainer state, so a finished run resumed with a larger ``meta_steps`` continues from it). Checkpoints that
    fail their checksums are skipped with a warning."""
    out = Path(out_dir)
    candidates = [out / "final"] if (out / "final").is_dir() else []
    if (out / "checkpoints").is_dir():
        candidates += sorted((out / "checkpoints").glob("step-*"), reverse=True)
    best, best_step = None, -1
    for path in candidates:
        try:
            step = int(load_checkpoint(path, trainer=True)["trainer_values"].get("step", 0))
        except CheckpointError as exc:
            logger.warning("skipping checkpoint %s: %s", path, exc)
            continue
        if step > best_step:
            best, best_step = path, step
    return best


def _save(method: Method, path: Path, info: dict[str, Any], trainer: bool) -> None:
    tensors, values = method.trainer_state() if trainer else ({}, None)
    save_checkpoint(path, method.state_dict(), method.config, info, tensors, values)


def meta_train_run(
    method: Method,
    tasks: list[Task],
    out_dir: str | Path,
    info: dict[str, Any],
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Meta-train ``method`` on ``tasks`` into ``out_dir``; returns the folder of the final θ."""
    config: ABMLLConfig = method.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            state = load_checkpoint(ckpt, trainer=True)
            check_fits(state["theta"], method.state_dict(), str(ckpt))
            method.load_state_dict(state["theta"])
            method.load_trainer_state(state["trainer_tensors"], state["trainer_values"])
            logger.info("resumed from %s at step %d", ckpt, method.step)
    elif (out / "final").exists() or (out / "checkpoints").exists():
        raise CheckpointError(
            f"{out} already holds a run; pass resume=True (--resume) or choose another folder"
        )
    # Drop log lines past the resumed step so the log matches the state.
    kept = []
    if log_path.exists():
        kept = [
            line
            for line in log_path.read_text().splitlines()
            if line and json.loads(line)["step"] <= method.step
        ]
    log_path.write_text("".join(line + "\n" for line in kept))
    write_json_atomic(
        out / "config.json",
        {**info, "config": config.to_dict(), "tasks": [t.name for t in tasks], "versions": versions()},
    )
    sampler = MetaBatchSampler(
        tasks, config.meta.support_size, config.meta.query_size, config.meta.meta_batch_size, seed=config.seed
    )

    def on_step(record: dict[str, Any]) -> None:
        with open(log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if progress is not None:
            progress(record)
        if record["step"] % config.meta.checkpoint_every == 0 and record["step"] < config.meta.meta_steps:
            _save(method, out / "checkpoints" / f"step-{record['step']:06d}", info, trainer=True)
            for old in sorted((out / "checkpoints").glob("step-*"))[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)

    method.meta_train(sampler, log=on_step)
    final = out / "final"
    _save(method, final, info, trainer=True)
    return final
