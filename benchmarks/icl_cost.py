"""Benchmark: the cost per query of in-context learning with k demonstrations against zero-shot, on built-in tasks.

Same model (SmolLM2-135M, ``load_model(None)``, float32, CPU), same query questions (``--queries`` of each
task's test episode, seed 100), the library's methods end to end: ``icl`` (``adapt`` keeps the k-shot support set
as demonstrations, ``predict`` scores every query after them, the demonstrations encoded once per task and kept
across micro-batches, ``scoring.max_length`` the default 8192) against ``zero-shot`` (``predict`` on the query
alone). Both score the queries in micro-batches of ``meta.micro_batch_size``. Timings interleaved (warm-ups of
each, then ``--reps`` calls of each, order alternating); medians; per query = the call's time / queries. Run
from the repository root::

    .venv/bin/python benchmarks/icl_cost.py --threads 1            # print a Markdown section
    .venv/bin/python benchmarks/icl_cost.py --threads 1 --write    # and replace its section in RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _common import Record, add_timing_options, emit, parse_args, time_interleaved

from abmll.config import ABMLLConfig
from abmll.evaluation import load_episodes
from abmll.methods import create_method
from abmll.methods.icl import SEPARATOR, demonstration
from abmll.models import load_model
from abmll.scoring import Scorer
from abmll.suite import suite_dir

SECTION = "icl_cost"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "rte"], help="built-in test tasks")
    parser.add_argument("--k", type=int, default=16, help="demonstrations (the support set's size)")
    parser.add_argument("--queries", type=int, default=100, help="query questions per task (the full preset's cap)")
    add_timing_options(parser, warmup=1, reps=3)
    args = parse_args(parser)
    record = Record()
    model, tok = load_model(None)
    config = ABMLLConfig()
    methods = {name: create_method(name, model, Scorer(tok, config.scoring), config) for name in ("zero-shot", "icl")}
    episodes = load_episodes(suite_dir(), args.tasks, args.k, [100], args.queries)
    rows = []
    for task in args.tasks:
        episode = episodes[task][0]
        query = list(episode.query)[: args.queries]
        icl = methods["icl"]
        icl.task = task
        demos = SEPARATOR.join(demonstration(s, icl.scorer) for s in episode.support)
        n_demos = len(tok(demos)["input_ids"])
        n_query = statistics.mean(len(tok(q.input)["input_ids"]) for q in query)
        steps = {
            name: (lambda m=m, s=list(episode.support), q=query: m.predict(m.adapt(s, 100), q, 100))
            for name, m in methods.items()
        }
        times = time_interleaved(steps, args.warmup, args.reps)
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append((task, n_demos, n_query, len(query), med, times))
        print(f"{task}: {med}", file=sys.stderr)
    record.stop()
    lines = [
        *record.header(f"In-context learning with {args.k} demonstrations vs zero-shot, per query"),
        f"- model: SmolLM2-135M (`load_model(None)`, float32, CPU); `icl` and `zero-shot` with the library defaults "
        f"(micro-batches of {config.meta.micro_batch_size}, `scoring.max_length` {config.scoring.max_length}); "
        f"{args.k}-shot support set and {args.queries} query questions of each task's seed-100 test episode",
        f"- timing: {args.warmup} warm-up(s) of each, then {args.reps} timed calls of each (adapt + predict), "
        "interleaved (order alternating); medians",
        "",
        "| task | demonstration tokens | mean query tokens | queries | zero-shot per query | ICL per query | "
        "ICL / zero-shot |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, n_demos, n_query, n, med, _ in rows:
        zs, icl = med["zero-shot"] / n, med["icl"] / n
        lines.append(f"| {task} | {n_demos} | {n_query:.0f} | {n} | {zs * 1000:.0f} ms | {icl * 1000:.0f} ms | "
                     f"{icl / zs:.2f}× |")  # fmt: skip
    lines += [
        "",
        "- target (≤ 2× zero-shot per query): "
        + "; ".join(
            f"{task} {'met' if med['icl'] <= 2 * med['zero-shot'] else 'not met'} "
            f"({med['icl'] / med['zero-shot']:.2f}×)"
            for task, _, _, _, med, _ in rows
        ),
        "",
    ]
    emit(SECTION, lines, args.write)
    print(f"done at {record.elapsed():.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
