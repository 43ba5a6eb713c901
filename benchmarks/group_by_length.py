"""Benchmark: micro-batches grouped by length (``meta.group_by_length``) against micro-batches as the set comes,
when a query set is scored, on the built-in suite's test tasks.

Same model (SmolLM2-135M, ``load_model(None)``, float32, CPU), the ``full`` preset's config, each test task's
seed-100 episode: up to ``--queries`` query questions; the library's ``predict`` of ``abmll`` (the posterior
predictive, S weight samples, at the φ that ``adapt`` reaches on the task's 16-shot support set, adapted once
outside the timing) and of ``zero-shot``. One method object per method; the grouped and the ungrouped call differ by
``meta.group_by_length`` alone. Timings in CPU seconds of this process (one torch thread: the work done, which
another job on the machine does not inflate), interleaved (``--warmup`` calls of each, then ``--reps`` calls of
each, order alternating); medians. Also: the prompt tokens the micro-batches pad to, both ways (the support set's too:
the inner steps' micro-batches are grouped the same way), and the largest difference of an option probability
between the timed calls. Run from the repository root::

    .venv/bin/python benchmarks/group_by_length.py --threads 1            # print a Markdown section
    .venv/bin/python benchmarks/group_by_length.py --threads 1 --write    # and replace its section in RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import Record, add_timing_options, emit, parse_args, time_interleaved

from abmll.compare import BUDGETS
from abmll.config import ABMLLConfig
from abmll.evaluation import load_episodes
from abmll.inner import chunks, length_order
from abmll.methods import create_method
from abmll.models import load_model
from abmll.scoring import Scorer
from abmll.suite import suite_dir
from abmll.tasks.readers import read_setting

SECTION = "group_by_length"


def padded(tok, examples, size: int, grouped: bool) -> int:
    """Prompt tokens the micro-batches of ``examples`` pad to (each micro-batch: its longest prompt × its size)."""
    order = length_order(examples) if grouped else list(range(len(examples)))
    lengths = [len(tok(examples[i].input)["input_ids"]) for i in order]
    return sum(max(c) * len(c) for c in chunks(lengths, size))


def predict(method, adapted, query, out: dict, key: tuple[str, bool]) -> None:
    """``method.predict`` grouped by length or not (``key``: (method, grouped)), its output kept in ``out``."""
    method.config.meta.group_by_length = key[1]
    out[key] = method.predict(adapted, query, 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=None, help="test tasks (default: the built-in setting's)")
    parser.add_argument("--queries", type=int, default=100, help="query questions per task (the full preset's cap)")
    add_timing_options(parser, warmup=0, reps=2)
    args = parse_args(parser)
    record = Record()
    tasks = args.tasks or read_setting(suite_dir() / "settings" / "builtin.json")["test"]
    model, tok = load_model(None)
    config = ABMLLConfig().override(BUDGETS["full"]["config"])
    methods = {name: create_method(name, model, Scorer(tok, config.scoring), config) for name in ("zero-shot", "abmll")}
    episodes = load_episodes(suite_dir(), tasks, 16, [100], args.queries)
    size = config.meta.micro_batch_size
    rows, largest = [], 0.0
    for task in tasks:
        episode = episodes[task][0]
        support, query = list(episode.support), list(episode.query)

        adapted = {name: m.adapt(support, 100) for name, m in methods.items()}
        out: dict = {}
        steps = {
            f"{name} {way}": (
                lambda m=m, a=adapted[name], q=query, o=out, key=(name, way == "grouped"): predict(m, a, q, o, key)
            )
            for name, m in methods.items()
            for way in ("as given", "grouped")
        }
        times = time_interleaved(steps, args.warmup, args.reps, clock=time.process_time)
        for name in methods:
            largest = max(largest, float((out[name, False] - out[name, True]).abs().max()))
        med = {name: statistics.median(t) for name, t in times.items()}
        tokens = {
            part: (padded(tok, examples, size, False), padded(tok, examples, size, True),
                   sum(len(tok(e.input)["input_ids"]) for e in examples))
            for part, examples in (("support", support), ("query", query))
        }  # fmt: skip
        rows.append((task, len(query), tokens, med))
        print(f"{task}: {med}", file=sys.stderr)
    record.stop()
    lines = [
        *record.header("Micro-batches grouped by length vs as given, scoring a query set"),
        f"- model: SmolLM2-135M (`load_model(None)`, float32, CPU); the `full` preset's config (micro-batches of "
        f"{size}, K_test = {config.inner.test_inner_steps}, S = {config.predict.samples}); each test task's "
        f"16-shot support set and up to {args.queries} query questions of its seed-100 episode",
        "- call: `predict(φ, query)` of `abmll` (φ adapted once to the support set, outside the timing) and of "
        "`zero-shot`; grouped and as given differ by `meta.group_by_length` alone",
        f"- timing: CPU seconds of the benchmark's process (one torch thread), {args.warmup} warm-up(s) of each, "
        f"then {args.reps} timed calls of each, interleaved (order alternating); medians",
        f"- largest difference of an option probability, grouped against as given: {largest:.2e}",
        "",
        "| task | queries | prompt tokens: useful / padded as given / padded grouped (support + query) | "
        "abmll as given | abmll grouped | ratio | zero-shot as given | zero-shot grouped | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total = {name: 0.0 for name in rows[0][3]}
    for task, n, tokens, med in rows:
        plain = sum(t[0] for t in tokens.values())
        grouped = sum(t[1] for t in tokens.values())
        useful = sum(t[2] for t in tokens.values())
        for name, seconds in med.items():
            total[name] += seconds
        lines.append(
            f"| {task} | {n} | {useful} / {plain} / {grouped} | {med['abmll as given']:.1f} s | "
            f"{med['abmll grouped']:.1f} s | {med['abmll as given'] / med['abmll grouped']:.2f}× | "
            f"{med['zero-shot as given']:.1f} s | {med['zero-shot grouped']:.1f} s | "
            f"{med['zero-shot as given'] / med['zero-shot grouped']:.2f}× |"
        )
    lines.append(
        f"| all | | | {total['abmll as given']:.1f} s | {total['abmll grouped']:.1f} s | "
        f"{total['abmll as given'] / total['abmll grouped']:.2f}× | {total['zero-shot as given']:.1f} s | "
        f"{total['zero-shot grouped']:.1f} s | {total['zero-shot as given'] / total['zero-shot grouped']:.2f}× |"
    )
    lines.append("")
    emit(SECTION, lines, args.write)
    print(f"done at {record.elapsed():.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
