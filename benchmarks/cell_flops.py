"""Benchmark: the arithmetic of a whole ``full``-preset ``abmll`` cell, and the fastest any exact speed-up could
make it on this machine.

One run does three things side by side:

- the **plain** cell (the exact speed-ups off, as `full_cell.py`'s "plain": ``--set scoring.shared_prefix=false
  --set compute.merge_without_grad=false --set scoring.trunk_cache_mb=0 --set meta.group_by_length=false``) in a
  child process, measured by its CPU seconds (user + system);
- the same cell with the library's defaults, in this process under ``torch.utils.flop_counter.FlopCounterMode``
  (matrix products only: element-wise work and the CPU attention kernel count nothing), with the tokens each
  decoder pass of the scorer runs, real and padded;
- a float32 ``torch.mm`` of 2048 × 2048 (17.2 GFLOP) timed by this process's CPU clock (so another job sharing the
  machine slows neither it nor the cell's CPU seconds), the median of 5 calls before and 5 after.

The floor is the defaults' matrix-product FLOPs (without their padding: FLOPs × real / padded tokens) at the
reference's rate: the cell cannot take less CPU time than that without doing less arithmetic than these tokens
need. Plain CPU / floor is the most an exact speed-up of this computation could give. Run from the repository
root::

    .venv/bin/python benchmarks/cell_flops.py                 # print a Markdown section
    .venv/bin/python benchmarks/cell_flops.py --write         # and replace its section in RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import Record, emit, parse_args
from full_cell import start_cell, wait_cells
from torch.utils.flop_counter import FlopCounterMode

from abmll.compare import from_preset, run_comparison
from abmll.scoring import Scorer
from abmll.suite import suite_dir

SECTION = "cell_flops"
PLAIN = [
    "scoring.shared_prefix=false", "compute.merge_without_grad=false", "scoring.trunk_cache_mb=0",
    "meta.group_by_length=false",
]  # fmt: skip
TARGET = 4.0


def reference_rate(n: int = 2048, calls: int = 5) -> float:
    """FLOP per CPU second of an n × n float32 ``torch.mm`` (median of ``calls``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(calls):
        start = time.process_time()
        torch.mm(a, b)
        times.append(time.process_time() - start)
    return 2 * n**3 / statistics.median(times)


def counted_cell(preset: str, out: Path) -> dict[str, float]:
    """The defaults' cell under the FLOP counter: its matrix-product FLOPs and the tokens of the scorer's
    decoder passes (real, and padded to each pass's longest row)."""
    tokens = {"real": 0, "padded": 0}
    depth = [0]
    forward = Scorer._forward

    def counting(self, decoder, seqs, past, trunk=None):
        if depth[0] == 0:  # a trunk pass calls itself: count the outer call only
            tokens["real"] += sum(len(s) for s in seqs)
            tokens["padded"] += len(seqs) * max(len(s) for s in seqs)
        depth[0] += 1
        try:
            return forward(self, decoder, seqs, past, trunk)
        finally:
            depth[0] -= 1

    Scorer._forward = counting
    try:
        comparison = from_preset(preset, ["abmll"], suite_dir(), None)
        with FlopCounterMode(display=False) as counter:
            run_comparison(comparison, out)
    finally:
        Scorer._forward = forward
    return {"flops": float(counter.get_total_flops()), **tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full", help="the comparison preset of the cell")
    args = parse_args(parser)
    record = Record()
    before = reference_rate()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        plain = start_cell("abmll", Path(tmp) / "plain", PLAIN, args.threads, args.preset)
        counted = counted_cell(args.preset, Path(tmp) / "counted")
        seconds = wait_cells({"plain": plain}, start)["plain"]
    after = reference_rate()
    record.stop()
    rate = statistics.median([before, after])
    real_share = counted["real"] / counted["padded"]
    floor = counted["flops"] * real_share / rate
    ceiling = seconds["cpu"] / floor
    verdict = (
        f"**cannot be met by an exact speed-up**: even at the reference's rate, with no padding and nothing but "
        f"the matrix products, the cell would take {floor:.0f} s, {ceiling:.2f}× less than plain; {TARGET:.0f}× "
        f"needs {seconds['cpu'] / TARGET:.0f} s, which is less arithmetic than the method does on these tokens"
        if ceiling < TARGET
        else f"not excluded by the arithmetic: the floor allows up to {ceiling:.2f}×"
    )
    lines = [
        *record.header(f"The arithmetic of a whole `{args.preset}`-preset `abmll` cell, and its floor"),
        f"- cell: `abmll compare --preset {args.preset} --seeds 100 --methods abmll` (built-in suite: meta-training "
        "on the preset setting's 'train' tasks, then adaptation to and prediction on its 'test' tasks), embedded "
        "SmolLM2-135M, float32, one torch thread",
        f"- plain: `--set {' --set '.join(PLAIN)}`, in a child process, its CPU seconds; defaults: the same cell in "
        "this process under `FlopCounterMode` (matrix products only), its timing not used",
        "- reference: 2048 × 2048 float32 `torch.mm`, FLOP per CPU second (this process's clock), median of 5 calls "
        f"before ({before / 1e9:.1f} GFLOP/s) and 5 after ({after / 1e9:.1f} GFLOP/s)",
        "",
        "| | value |",
        "|---|---|",
        f"| plain cell, CPU | {seconds['cpu']:.0f} s (wall {seconds['wall']:.0f} s) |",
        f"| defaults: matrix-product FLOPs | {counted['flops'] / 1e12:.2f} TFLOP |",
        f"| defaults: scorer's decoder tokens, real / padded | {counted['real']:,} / {counted['padded']:,} "
        f"({real_share:.1%} real) |",
        f"| floor: FLOPs × real share at {rate / 1e9:.1f} GFLOP/s | {floor:.0f} s |",
        f"| most an exact speed-up could give: plain / floor | {ceiling:.2f}× |",
        "",
        f"- target (a `full`-preset `abmll` cell ≥ {TARGET:.0f}× faster than plain, identical results): {verdict}",
        "",
    ]
    emit(SECTION, lines, args.write)
    print(f"done at {record.elapsed():.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
