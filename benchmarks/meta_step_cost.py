"""Benchmark: the cost of one meta-step against the number of inner steps K, for ``abmll`` (first order,
weight samples on) and ``maml`` (second order through the K inner SGD steps, deterministic).

Same model (SmolLM2-135M, ``load_model(None)``, float32, CPU), same episode (one task: 4 support and 4 query
short multiple-choice questions with 2–3 options), methods built by ``create_method`` from the comparison
presets (``method_config``: ``abmll`` keeps the library's first order, ``maml`` gets ``inner.order =
second_order``), with ``inner.inner_steps = K``. Timings: ``--warmup`` untimed meta-steps of both methods
at the smallest K (the episode's shapes are the same at every K), then for each K ``--reps`` timed meta-steps
of each, interleaved (order alternating); θ and the step counter are restored before every call, so every
call does the same work; medians. ``--threads N`` pins torch's thread count (default 2; on the 2-core
benchmark machine 1 thread was 2–6× faster and far steadier than 2, see ``scoring_head.py``). Peak memory: in
a fresh subprocess per (method, K), the rise of the resident set's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) during the first meta-step above the resident set just before it (model loaded,
adapter injected, weights paged in). One meta-step costs about K + 1 forward-backward passes for ABMLL and
more for second-order MAML (about 20 s and 55 s at K = 8 with 1 thread), so the defaults take ~15 minutes.
Run from the repository root::

    .venv/bin/python benchmarks/meta_step_cost.py            # print a Markdown section
    .venv/bin/python benchmarks/meta_step_cost.py --write    # and replace its section in benchmarks/RESULTS.md
    .venv/bin/python benchmarks/meta_step_cost.py --threads 1 --write   # what produced the recorded numbers
    .venv/bin/python benchmarks/meta_step_cost.py --ks 1,2,4 --reps 2 --no-memory   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from _common import (
    RESULTS,
    command_line,
    machine,
    page_in,
    peak_rise,
    report_child,
    run_child,
    time_interleaved,
    utc_date,
    write_section,
)

from abmll.config import ABMLLConfig
from abmll.methods import create_method, method_config
from abmll.models import load_model
from abmll.scoring import Scorer
from abmll.tasks.data import Episode, Example

SECTION = "meta_step_cost"
METHODS = ("abmll", "maml")
FLAT_TOLERANCE = 0.10  # ABMLL's peak may vary by at most this fraction across K
TARGET_K = 5  # the K at which ABMLL's peak should be at most half of MAML's

QUESTIONS = [
    ("Tom has three apples and eats one. How many apples are left?", ["two", "three", "four"], 0),
    ("The sky on a clear day is", ["green", "blue"], 1),
    ("Ice that is left in the sun will", ["freeze", "grow", "melt"], 2),
    ("A cat is a kind of", ["animal", "plant"], 0),
    ("Water boils when it is very", ["cold", "hot", "dark"], 1),
    ("Birds fly with their", ["wings", "wheels"], 0),
    ("The opposite of up is", ["left", "down", "over"], 1),
    ("We see the stars at", ["noon", "breakfast", "night"], 2),
]


def episode() -> Episode:
    """One task: the first four questions as the support set, the last four as the query set."""
    exs = [
        Example(f"Question: {q}\nAnswer:", tuple(opts), gold, id=f"bench:{i}")
        for i, (q, opts, gold) in enumerate(QUESTIONS)
    ]
    return Episode(task="bench", support=exs[:4], query=exs[4:])


def config_for(name: str, k: int) -> ABMLLConfig:
    config = method_config(name, ABMLLConfig().override({"inner.inner_steps": k}))
    expected = "first_order" if name == "abmll" else "second_order"
    assert config.inner.order == expected, f"{name}: inner.order = {config.inner.order}, expected {expected}"
    return config


def make_step(method, ep: Episode, theta0: dict[str, torch.Tensor], record: dict | None = None):
    """One meta-step from ``theta0``; its statistics are kept in ``record``."""

    def step():
        method.load_state_dict(theta0)  # the same θ and step (hence the same ε) every call
        method.step = 0
        stats = method.meta_step([ep])
        if record is not None:
            record.update(stats)

    return step


def memory_child(name: str, k: int) -> None:
    """In a fresh process: the peak resident-set rise of one meta-step (MiB), as JSON."""
    model, tok = load_model(None)
    config = config_for(name, k)
    method = create_method(name, model, Scorer(tok, config.scoring), config)
    ep = episode()
    page_in(model)  # the (memory-mapped) weights, so that the rise below is the meta-step's own
    report_child(peak_rise(lambda: method.meta_step([ep])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="1,2,4,5,8", help="comma-separated inner-step counts K")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed meta-steps of each method first (at the smallest K)"
    )
    parser.add_argument("--reps", type=int, default=3, help="timed meta-steps of each method per K, interleaved")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--write", action="store_true", help=f"replace this section of {RESULTS}")
    parser.add_argument("--memory-child", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})

    command, date = command_line(), utc_date()
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    model, tok = load_model(None)
    ep = episode()
    methods = {
        (name, k): create_method(name, model, Scorer(tok, config_for(name, k).scoring), config_for(name, k))
        for k in ks
        for name in METHODS
    }  # the first injects the adapter; all share its layers and θ
    theta0 = methods[(METHODS[0], ks[0])].state_dict()
    model.train(False)

    timed: dict[int, dict[str, list[float]]] = {}
    records: dict[tuple[str, int], dict[str, float]] = {}
    for name in METHODS:  # warm-ups: the episode's shapes are the same at every K
        for _ in range(args.warmup):
            make_step(methods[(name, ks[0])], ep, theta0)()
    for k in ks:
        for name in METHODS:
            records[(name, k)] = {}
        steps = {name: make_step(methods[(name, k)], ep, theta0, records[(name, k)]) for name in METHODS}
        timed[k] = time_interleaved(steps, 0, args.reps)
        print(
            f"K={k}: "
            + ", ".join(f"{n} {statistics.median(t):.2f} s" for n, t in timed[k].items())
            + f" (at {time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    enc = methods[(METHODS[0], ks[0])].scorer.encode(ep.support)
    lengths = enc.attention_mask.sum(-1)
    del methods, model

    memory: dict[tuple[str, int], float | None] = {}
    if not args.no_memory:
        for k in ks:
            for name in METHODS:
                child = [__file__, "--memory-child", name, str(k), "--threads", str(args.threads)]
                memory[(name, k)] = run_child(child, f"{name}/K={k}")
                print(f"memory {name} K={k}: {memory[(name, k)]} MiB", file=sys.stderr, flush=True)

    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f} MiB"

    lines = [
        "## Meta-step cost against K: ABMLL (first order) vs MAML (second order)",
        "",
        f"- date: {date}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        "- model: SmolLM2-135M (`load_model(None)`, float32, CPU); scorer `option`; adapter: Bayesian LoRA on "
        "q_proj, v_proj (rank 8), injected by `create_method`",
        f"- episode: one task, {len(ep.support)} support + {len(ep.query)} query questions with 2–3 options "
        f"(support: {enc.input_ids.shape[0]} sequences of {int(lengths.min())}–{int(lengths.max())} tokens); "
        "meta-batch of 1 task, micro-batch 8",
        "- methods: `abmll` = `method_config('abmll', …)`: first order (straight-through), 1 weight sample per "
        "inner and outer step, β > 0; `maml` = `method_config('maml', …)`: `inner.order = second_order` (graph "
        "through the K inner steps, math attention), ΔW = μ; both with `inner.inner_steps = K`",
        f"- load average (1 min) at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f}; "
        f"total run {time.perf_counter() - t0:.0f} s including the memory subprocesses",
        f"- timing: {args.warmup} warm-up meta-step(s) of each method at K = {ks[0]}, then per K {args.reps} timed "
        "meta-steps of each, interleaved (order alternating), θ restored before every call; medians, seconds",
        "",
        "| K | ABMLL time | MAML time | time ratio (MAML / ABMLL) | ABMLL peak RSS rise | MAML peak RSS rise "
        "| peak ratio (MAML / ABMLL) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        ta, tm = statistics.median(timed[k]["abmll"]), statistics.median(timed[k]["maml"])
        ma, mm = memory.get(("abmll", k)), memory.get(("maml", k))
        peak_ratio = f"{mm / ma:.2f}×" if ma and mm is not None else "n/a"
        lines.append(f"| {k} | {ta:.2f} s | {tm:.2f} s | {tm / ta:.2f}× | {mib(ma)} | {mib(mm)} | {peak_ratio} |")
    lines += [
        "",
        "Ranges (min–max, s): "
        + "; ".join(
            f"K={k}: ABMLL {min(timed[k]['abmll']):.2f}–{max(timed[k]['abmll']):.2f}, "
            f"MAML {min(timed[k]['maml']):.2f}–{max(timed[k]['maml']):.2f}"
            for k in ks
        )
        + ".",
        "",
        "Outer NLL of the meta-step (support NLL first → last inner step): "
        + "; ".join(
            f"K={k}: ABMLL {records[('abmll', k)]['outer_nll']:.3f} ({records[('abmll', k)]['support_nll_first']:.3f}"
            f" → {records[('abmll', k)]['support_nll_last']:.3f}), MAML {records[('maml', k)]['outer_nll']:.3f} "
            f"({records[('maml', k)]['support_nll_first']:.3f} → {records[('maml', k)]['support_nll_last']:.3f})"
            for k in ks
        )
        + ".",
        "",
    ]
    abmll_peaks = [memory.get(("abmll", k)) for k in ks]
    if memory and all(p is not None and p > 0 for p in abmll_peaks):
        spread = max(abmll_peaks) / min(abmll_peaks) - 1
        flat = "met" if spread <= FLAT_TOLERANCE else "not met"
        lines.append(
            f"- ABMLL's peak flat across K = {', '.join(map(str, ks))} (max / min − 1 ≤ {FLAT_TOLERANCE:.0%}): "
            f"{flat} ({min(abmll_peaks):.0f}–{max(abmll_peaks):.0f} MiB, spread {spread:.1%})"
        )
        k_half = TARGET_K if TARGET_K in ks else max((k for k in ks if k <= TARGET_K), default=None)
        ma, mm = memory.get(("abmll", k_half)), memory.get(("maml", k_half))
        if k_half is not None and ma is not None and mm is not None:
            half = "met" if ma <= mm / 2 else "not met"
            where = f"K = {k_half}" + ("" if k_half == TARGET_K else f" (the target is stated for K = {TARGET_K})")
            lines.append(
                f"- ABMLL's peak at most half of MAML's at {where}: {half} ({ma:.0f} vs {mm:.0f} MiB, "
                f"ABMLL / MAML = {ma / mm:.2f})"
            )
        lines.append("")
    lines.append(
        "Peak RSS rise: the first meta-step of one method at one K in a fresh process (model loaded, adapter "
        "injected, weights paged in): the high-water mark of the resident set above the resident set just "
        "before the call (`/proc/self/status` VmHWM after `clear_refs`); it includes one-time allocations common "
        "to both methods (e.g. AdamW's state, allocator growth)."
        if memory
        else "Peak memory: not measured (`--no-memory`)."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(SECTION, text)
        print(f"wrote the '{SECTION}' section of {RESULTS}")


if __name__ == "__main__":
    main()
