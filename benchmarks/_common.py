"""What the benchmark scripts share: interleaved timing, the peak resident-set rise of a call (measured in a
fresh child process), a description of the machine, and the writer of a script's section in RESULTS.md.

The scripts run as ``.venv/bin/python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they
import this module as ``_common``.
"""

from __future__ import annotations

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


# --- timing ----------------------------------------------------------------------------------------------
def time_interleaved(steps: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, list[float]]:
    """``warmup`` untimed calls of every step, then ``reps`` timed calls of each, interleaved, the order of
    the steps alternating between reps; seconds per call, by step name."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(reps):
        for name in names if r % 2 == 0 else reversed(names):  # alternate the order too
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
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
