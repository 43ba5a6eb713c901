"""What the benchmark scripts share: their common options, interleaved timing, the peak resident-set rise of a
call (measured in a fresh child process), a description of the machine, the record of a run (its header lines)
and the writer of a script's section in RESULTS.md.

The scripts run as ``.venv/bin/python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they
import this module as ``_common``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = (
    "# Benchmark results\n\n"
    "Measured results of the scripts in `benchmarks/`. Each section is written by its script with `--write`\n"
    "(which replaces that section only) and records the date, the machine and the exact command.\n"
)


# --- options ---------------------------------------------------------------------------------------------
def add_timing_options(parser: argparse.ArgumentParser, warmup: int, reps: int) -> None:
    """Add ``--warmup`` and ``--reps``, the options of :func:`time_interleaved`, with these defaults."""
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls of each variant first")
    parser.add_argument("--reps", type=int, default=reps, help="timed calls of each variant, interleaved")


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add ``--threads`` and ``--write``, parse the command line and set torch's thread count."""
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--write", action="store_true", help=f"replace this section of {RESULTS}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


# --- timing ----------------------------------------------------------------------------------------------
def time_interleaved(
    steps: dict[str, Callable[[], object]], warmup: int, reps: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """``warmup`` untimed calls of every step, then ``reps`` timed calls of each, interleaved, the order of
    the steps alternating between reps; seconds per call by ``clock`` (wall-clock by default; ``time.process_time``
    counts this process's CPU seconds, which other jobs on the machine do not inflate), by step name."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(reps):
        for name in names if r % 2 == 0 else reversed(names):  # alternate the order too
            start = clock()
            steps[name]()
            times[name].append(clock() - start)
    return times


# --- peak memory -----------------------------------------------------------------------------------------
def status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, …)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def page_in(model: torch.nn.Module) -> None:
    """Touch every parameter, so that (memory-mapped) weights are resident before a measurement."""
    with torch.no_grad():
        sum(float(p.float().sum()) for p in model.parameters())


def peak_rise(call: Callable[[], object]) -> dict[str, float | str]:
    """Run ``call`` once and return ``{"peak_rise_mib": …}``: the rise of the resident set's high-water mark
    (``VmHWM``, reset to the current RSS through ``/proc/self/clear_refs``) above the RSS just before the
    call; ``{"error": …}`` when the high-water mark cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError as exc:
        return {"error": f"cannot reset the peak RSS: {exc}"}
    before = status_kb("VmRSS")
    call()
    return {"peak_rise_mib": (status_kb("VmHWM") - before) / 1024}


def report_child(result: dict) -> None:
    """Print a child's result as the JSON line that :func:`run_child` reads."""
    print(json.dumps(result), flush=True)


def run_child(args: Sequence[str], label: str, key: str = "peak_rise_mib") -> float | None:
    """Run ``python <args>`` in a fresh process and return ``key`` of the JSON on its last stdout line
    (None, with the child's stderr reported, when it failed or reported an error)."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"memory child {label} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    if result.get(key) is None:
        print(f"memory child {label}: {result.get('error', result)}", file=sys.stderr)
    return result.get(key)


# --- the record ------------------------------------------------------------------------------------------
def machine() -> str:
    """CPUs, Python, torch and torch's thread count, in one line."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    )


def command_line() -> str:
    """The command that started this process, as typed from the repository root."""
    return shlex.join([os.path.relpath(sys.executable)] + sys.argv)


def utc_date() -> str:
    return subprocess.run(["date", "-u"], capture_output=True, text=True, check=False).stdout.strip()


class Record:
    """What a section records about its run: the command, the date, the start time and the load average at the
    start (taken on creation) and at the end (taken by :meth:`stop`)."""

    def __init__(self) -> None:
        self.command, self.date, self.t0 = command_line(), utc_date(), time.perf_counter()
        self.load_start = os.getloadavg()
        self.load_end: tuple[float, float, float] | None = None

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.t0

    def stop(self) -> None:
        """Take the load average at the end."""
        self.load_end = os.getloadavg()

    def header(self, title: str, *after_machine: str) -> list[str]:
        """The section's first lines: its ``## title``, then date, machine (``after_machine`` lines follow it),
        command and load average at start and end."""
        if self.load_end is None:
            self.stop()
        return [
            f"## {title}",
            "",
            f"- date: {self.date}",
            f"- machine: {machine()}",
            *after_machine,
            f"- command: `{self.command}`",
            f"- load average (1, 5, 15 min) at start: {', '.join(f'{x:.2f}' for x in self.load_start)}; at end: "
            f"{', '.join(f'{x:.2f}' for x in self.load_end)} (the 2-core machine was running another long job: "
            "absolute seconds are not meaningful under this load, the ratios of interleaved calls are)",
        ]


def emit(section: str, lines: Sequence[str], write: bool) -> None:
    """Print a section's ``lines`` as Markdown and, when ``write``, replace its section of RESULTS.md."""
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        write_section(section, text)
        print(f"wrote the '{section}' section of {RESULTS}")


def write_section(section: str, text: str, results: Path = RESULTS) -> None:
    """Replace the ``section`` block of ``results`` (between ``<!-- section:start -->`` and
    ``<!-- section:end -->``) with ``text``, or append it when the file has no such block."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    current = results.read_text() if results.is_file() else HEADER
    if start in current and end in current:
        head, rest = current.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        current = head + block + ("\n" + tail if tail else "")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    results.write_text(current)
