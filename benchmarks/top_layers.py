"""Benchmark: an ABMLL meta-step with adapters on the top N decoder blocks only (``lora.layers``) against every block.

Same model weights (SmolLM2-135M, ``load_model(None)``, float32, CPU, loaded once per variant), same episode (a
support and a query set of ``--examples`` four-option questions each, from ``scoring_head.py``), the library's
:meth:`MetaLearner.meta_step` with its defaults (first order, K = 5 inner steps, one weight sample); ``lora.layers``
= every block (null) against ``--top`` (default 4 of 30), the top blocks without and with the frozen-trunk cache
(``scoring.trunk_cache_mb``). Adapting only the top blocks saves the backward pass through the frozen blocks below
the lowest adapted one (autograd stops there); the trunk cache also saves their forward pass in every call after
the first over the same batch. Two cache variants: "cold", emptied before every meta-step (every example is new to
the step, as with fresh episodes: the trunk runs in the first pass over the support set and over the query set
only), and "warm", the same episode again (the trunk never runs: as for batches seen in an earlier step). Timings
interleaved (warm-ups of each, then ``--reps`` calls of each, order alternating); medians. Run from the repository
root::

    .venv/bin/python benchmarks/top_layers.py --threads 1            # print a Markdown section
    .venv/bin/python benchmarks/top_layers.py --threads 1 --write    # and replace its section in RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _common import Record, add_timing_options, emit, parse_args, time_interleaved
from scoring_head import examples

from abmll.config import ABMLLConfig
from abmll.methods import create_method
from abmll.models import load_model
from abmll.scoring import Scorer
from abmll.tasks.data import Episode

SECTION = "top_layers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=4, help="N: the top decoder blocks adapted")
    parser.add_argument("--examples", type=int, default=2, help="questions in each of the support and query sets")
    add_timing_options(parser, warmup=1, reps=3)
    args = parse_args(parser)
    record = Record()

    data = examples(2 * args.examples)
    episode = Episode("bench", data[: args.examples], data[args.examples :])
    variants = {
        "every block": {"lora.layers": None},
        f"top {args.top}": {"lora.layers": args.top, "scoring.trunk_cache_mb": 0},
        f"top {args.top}, trunk cache cold": {"lora.layers": args.top},
        f"top {args.top}, trunk cache warm": {"lora.layers": args.top},
    }
    methods = {}
    for label, overrides in variants.items():
        model, tok = load_model(None)
        config = ABMLLConfig().override({**overrides, "meta.meta_batch_size": 1})
        methods[label] = create_method("abmll", model, Scorer(tok, config.scoring), config)
    blocks = len(methods["every block"].model.model.layers)

    def step(method, cold: bool):
        if cold:
            method.scorer.trunk.clear()
        return method.meta_step([episode])

    steps = {name: (lambda m=m, c=name.endswith("cold"): step(m, c)) for name, m in methods.items()}
    times = time_interleaved(steps, args.warmup, args.reps)
    record.stop()
    med = {name: statistics.median(t) for name, t in times.items()}
    top = f"top {args.top}"
    config = methods["every block"].config
    lines = [
        *record.header(f"Meta-step with adapters on the top {args.top} blocks vs every block"),
        f"- model: SmolLM2-135M (`load_model(None)`, float32, CPU), {blocks} decoder blocks; Bayesian LoRA on "
        f"q_proj, v_proj (rank {config.lora.rank}); ABMLL's meta-step, {config.inner.order}, K = "
        f"{config.inner.inner_steps}, one weight sample; one task of {args.examples} support and {args.examples} "
        "query questions (4 options each)",
        f"- adapted layers: {len(methods['every block'].layers)} (every block) and {len(methods[top].layers)} "
        f"(`lora.layers = {args.top}`)",
        f"- timing: {args.warmup} warm-up(s) of each, then {args.reps} timed calls of each, interleaved (order "
        "alternating); medians, seconds",
        "",
        "| adapters | median | min–max | every block / this |",
        "|---|---|---|---|",
    ]
    for name, t in times.items():
        ratio = med["every block"] / med[name]
        lines.append(f"| {name} | {med[name]:.2f} s | {min(t):.2f}–{max(t):.2f} s | {ratio:.2f}× |")
    lines += [
        "",
        f"- top {args.top} without the cache: every inner and outer pass runs all {blocks} blocks forward, the "
        f"backward pass stops at the lowest adapted block; with the cache, the {blocks - args.top} blocks below run "
        "in the first pass over the support set and over the query set of the step (cold: the cache emptied before "
        "each step) or not at all (warm: the episode seen before); the cache gives the uncached scores within float "
        "rounding (tests/test_trunk_cache.py)",
        "",
    ]
    emit(SECTION, lines, args.write)
    print(f"done at {record.elapsed():.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
