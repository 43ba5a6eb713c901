"""Progress of the long commands (``train``, ``evaluate``, ``compare``, ``demo``; also the steps of an export).

On a terminal, rich progress bars. Without one (standard error not a TTY: nohup, a scheduler, CI, captured
output) one plain line per finished item — a meta-step, a (task, seed) cell of an evaluation, a comparison
cell — with the count, the elapsed time and the estimated remaining time::

    meta-training abmll: meta-step 3/10 (30 %), outer NLL 1.234, β·KL/NLL 0.012; elapsed 0:00:12, remaining ~0:00:28

The same lines, each prefixed with the date and time, are appended to the run's log file (``OUT/progress.log``),
terminal or not; the file is created at the first line, so a run refused before any work leaves none. The
estimate is the mean time per item finished in this phase times the items left.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: The run log's file name inside an output folder.
PROGRESS_LOG = "progress.log"


def clock(seconds: float) -> str:
    """``H:MM:SS``."""
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


@dataclass
class _Job:
    description: str
    total: int | None
    unit: str
    started: float
    done: int = 0
    #: Items already done when this phase began (set by its first update); None until then.
    base: int | None = None


class Reporter:
    """One progress reporter for a command: jobs (bars) that are added, reset for a new phase and updated with
    the number of items finished. ``plain`` (default: standard error is not a terminal) prints one line per
    finished item instead of bars; ``enabled=False`` reports nothing (e.g. on ranks other than 0)."""

    def __init__(
        self, console: Console, log_file: str | Path | None = None, *, enabled: bool = True, plain: bool | None = None
    ) -> None:
        self.console = console
        self.enabled = enabled
        self.plain = (not console.is_terminal) if plain is None else plain
        self.log_file = Path(log_file) if log_file is not None and enabled else None
        self._log: IO[str] | None = None
        self._jobs: dict[TaskID, _Job] = {}
        self._bars = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=self.plain or not enabled,
        )

    def __enter__(self) -> Reporter:
        self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bars.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def add(self, description: str, total: int | None = None, unit: str = "") -> TaskID:
        """A new job (a bar on a terminal); ``unit`` names its items in the plain lines (``meta-step``)."""
        job = self._bars.add_task(description, total=total)
        self._jobs[job] = _Job(description, total, unit, time.monotonic())
        return job

    def reset(self, job: TaskID, description: str, total: int | None = None, unit: str = "") -> None:
        """Start a new phase of ``job`` (its timing and estimate start over)."""
        self._bars.reset(job, total=total, completed=0, description=description)
        self._jobs[job] = _Job(description, total, unit, time.monotonic())

    def update(
        self,
        job: TaskID,
        done: int,
        *,
        total: int | None = None,
        description: str | None = None,
        unit: str | None = None,
        note: str = "",
    ) -> None:
        """``done`` items of the job's phase are finished; a plain line is written when that number grew. The
        first update of a phase with ``done > 0`` counts one item as finished since the phase began."""
        state = self._jobs[job]
        if total is not None:
            state.total = total
        if description is not None:
            state.description = description
        if unit is not None:
            state.unit = unit
        shown = f"{state.description}: {note}" if note else state.description
        self._bars.update(job, completed=done, total=state.total, description=shown)
        if state.base is None:
            state.base = done - 1 if done > 0 else 0
            state.done = state.base
        if done > state.done:
            state.done = done
            self._line(state, note)

    def line(self, text: str) -> None:
        """Write ``text`` to standard error (plain mode) and the run log."""
        if not self.enabled:
            return
        if self.plain:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        if self.log_file is not None:
            if self._log is None:
                self._log = open(self.log_file, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
            stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            self._log.write(f"{stamp} {text}\n")
            self._log.flush()

    def _line(self, state: _Job, note: str) -> None:
        elapsed = time.monotonic() - state.started
        unit = f"{state.unit} " if state.unit else ""
        count = f"{unit}{state.done}"
        if state.total:
            count += f"/{state.total} ({100 * state.done // state.total} %)"
            per_item = elapsed / max(1, state.done - (state.base or 0))
            remaining = f"remaining ~{clock(per_item * max(0, state.total - state.done))}"
        else:
            remaining = "remaining unknown"
        text = f"{state.description}: {count}" + (f", {note}" if note else "")
        self.line(f"{text}; elapsed {clock(elapsed)}, {remaining}")
