"""Run tracking through accelerate's trackers (``--report-to tensorboard|wandb|mlflow``; ``none``, the default,
keeps only the run's own files).

What is logged: the run's config, flattened (``meta.meta_steps``, …), as hyperparameters; every meta-step of a
meta-training, the numeric fields of its ``log.jsonl`` line under the same names at that meta-step; in a
comparison, the same under ``{method}/seed-{seed}/train/``, and each cell's metrics per task and their
macro-average (``{method}/seed-{seed}/eval/{task}/{metric}``, ``…/eval/mean/{metric}``) with its wall time
(``…/wall_s``) at the cell's last meta-step.

Where: the tracker folder (``OUT/tracking`` of the command line). TensorBoard writes its event files to
``FOLDER/tensorboard`` (``tensorboard --logdir OUT/tracking``); wandb keeps its local files in the folder (project
``abmll``, or ``$WANDB_PROJECT``; online or offline as wandb is set up, e.g. ``WANDB_MODE=offline``); MLflow uses
``$MLFLOW_TRACKING_URI`` when set, else the SQLite store ``FOLDER/mlflow.db`` (experiment ``abmll``, or
``$MLFLOW_EXPERIMENT_NAME``). Each sitting of a resumed run is a new wandb or MLflow run; TensorBoard adds an
event file to the same folder.

A backend whose package is not installed is refused when the :class:`Tracker` is made (before any work), with
the package to install; nothing is written before :meth:`Tracker.start`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from abmll.errors import ConfigError, TrackingError

#: ``--report-to`` values with a backend, and the package each one needs.
BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
REPORT_TO = ("none", *BACKENDS)
PROJECT = "abmll"


def check_report_to(report_to: str) -> None:
    """Raise :class:`ConfigError` for an unknown value or a backend whose package is not installed."""
    if report_to not in REPORT_TO:
        raise ConfigError(f"--report-to {report_to!r} is invalid: expected one of {', '.join(REPORT_TO)}")
    if report_to == "none":
        return
    package = BACKENDS[report_to]
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(
            f"--report-to {report_to} needs the Python package '{package}', which is not installed; "
            f"install it (pip install {package}) or choose another --report-to"
        )


def flatten(values: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings as one level, keys joined with ``sep``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            out[f"{prefix}{key}"] = value
    return out


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float | int]:
    """The numeric fields of a record (nested ones joined with ``/``; booleans as 0/1), without ``step``."""
    out: dict[str, float | int] = {}
    for key, value in flatten(values, sep="/").items():
        if key == "step" or isinstance(value, str) or value is None:
            continue
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = value
    return out


def _hyperparameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened, each value a bool, int, float or str (lists as JSON), as every backend takes them."""
    out = {}
    for key, value in flatten(params).items():
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value)
    return out


class _Backend:
    """The accelerate tracker of one run, started on first use, shared by every scoped view."""

    def __init__(self, report_to: str, folder: Path, run_name: str, params: Mapping[str, Any]) -> None:
        self.report_to, self.folder, self.run_name, self.params = report_to, folder, run_name, dict(params)
        self.tracker = None

    def start(self) -> None:
        if self.tracker is not None:
            return
        from accelerate import PartialState

        PartialState()  # accelerate's trackers log through its state (already made under a launcher)
        tracker = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tracker = self._create()
            tracker.start()
            if self.params:
                tracker.store_init_configuration(_hyperparameters(self.params))
        except Exception as exc:  # a backend's own failure (login, server, store): one line naming it
            if tracker is not None:
                with contextlib.suppress(Exception):  # a run that did start is closed
                    tracker.finish()
            raise TrackingError(
                f"--report-to {self.report_to}: the {self.report_to} run could not be started in {self.folder} "
                f"({type(exc).__name__}: {exc})"
            ) from None
        self.tracker = tracker

    def _create(self):
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        if self.report_to == "tensorboard":
            return TensorBoardTracker("tensorboard", str(self.folder))
        if self.report_to == "wandb":
            extra = {} if os.environ.get("WANDB_DIR") else {"dir": str(self.folder)}
            return WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=self.run_name, **extra)
        artifacts = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{(self.folder / 'mlflow.db').resolve()}")
            artifacts = str((self.folder / "mlartifacts").resolve())
        return MLflowTracker(experiment_name=PROJECT, logging_dir=artifacts, run_name=self.run_name)

    def finish(self) -> None:
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.finish()


class Tracker:
    """Where a run's records go besides its own files: ``report_to`` one of :data:`REPORT_TO`, the tracker's
    files under ``folder``, ``params`` stored as hyperparameters when it starts. Use as a context manager (the
    backend's run is finished on exit); :meth:`scoped` views log under a prefix into the same run."""

    def __init__(
        self,
        report_to: str,
        folder: str | Path,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        check_report_to(report_to)
        folder = Path(folder)
        self._backend = _Backend(report_to, folder, run_name or folder.parent.name or PROJECT, params or {})
        self.prefix = ""

    @property
    def report_to(self) -> str:
        return self._backend.report_to

    def start(self) -> None:
        """Start the backend's run (once; creates the folder). Raises :class:`TrackingError` when it fails."""
        if self.report_to != "none":
            self._backend.start()

    def log(self, values: Mapping[str, Any], step: int) -> None:
        """Log the numeric fields of ``values`` (:func:`scalars`) at ``step``, under this view's prefix."""
        if self.report_to == "none":
            return
        self._backend.start()
        found = scalars(values, self.prefix)
        if found:
            self._backend.tracker.log(found, step=step)

    def scoped(self, prefix: str) -> Tracker:
        """A view that logs into the same run with ``prefix/`` before every name."""
        view = object.__new__(Tracker)
        view._backend = self._backend
        view.prefix = f"{self.prefix}{prefix.strip('/')}/"
        return view

    def close(self) -> None:
        self._backend.finish()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
