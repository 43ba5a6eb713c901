"""Benchmark: the achieved FLOP/s of a full ABMLL meta-step against a float32 matrix product measured in the same
run.

The FLOPs of one meta-step are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a call that is not
timed: matrix products (element-wise work is free in this count; the CPU attention kernel is not in its table,
under 1 % of the FLOPs at these sequence lengths). The timed
calls (``--reps``, after a warm-up) alternate with a reference: a 2048 × 2048 float32 matrix product
(``--ref-size``), timed three times before each meta-step (median), so that both see the same load. Achieved
FLOP/s = counted FLOPs / median meta-step time; the ratio to the reference is the share of the machine's
matrix-product speed that a meta-step reaches. Four episodes on SmolLM2-135M (``load_model(None)``, float32,
Bayesian LoRA rank 8 on q_proj, v_proj, the library's default first-order ABMLL with ``inner.inner_steps =
--k``): ``short`` (``meta_step_cost.py``'s 4 support + 4 query questions, 12–20 tokens per sequence) and
``passage`` (``scoring_head.py``'s four-option questions after a passage, 34–59 tokens; ``--passage`` of
each), and ``suite``: a meta-training episode of the built-in suite at the library's defaults (its first
episode of ``--suite-task``, 16 support and 16 query questions, micro-batches of 8), with adapters on every block
and, as ``suite-top4``, on the top 4 (``lora.layers = 4``, the frozen-trunk cache warm from the previous call, as
in a study's later steps on the same task). One profiled meta-step per episode splits its time between matrix
products and everything else. Run from the repository root::

    .venv/bin/python benchmarks/meta_step_flops.py --threads 1            # print a Markdown section
    .venv/bin/python benchmarks/meta_step_flops.py --threads 1 --write    # and replace its section in RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _common import Record, emit, parse_args
from meta_step_cost import episode as short_episode
from meta_step_cost import make_step
from scoring_head import examples
from torch.utils.flop_counter import FlopCounterMode

from abmll.config import ABMLLConfig
from abmll.methods import create_method
from abmll.models import load_model
from abmll.scoring import Scorer
from abmll.suite import build_suite
from abmll.tasks.data import Episode, MetaBatchSampler
from abmll.tasks.readers import load_training_tasks

SECTION = "meta_step_flops"
TARGET = 0.5  # a meta-step should reach at least this share of the float32 matrix-product speed
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def passage_episode(n: int) -> Episode:
    exs = examples(2 * n)
    return Episode(task="passage", support=exs[:n], query=exs[n:])


def suite_episode(task: str) -> Episode:
    """The first meta-training episode of ``task`` at the library's default k and query size."""
    meta = ABMLLConfig().meta
    tasks, _ = load_training_tasks(build_suite(), [task])
    return MetaBatchSampler(tasks, k=meta.support_size, query_size=meta.query_size, meta_batch_size=1).meta_batch(0)[0]


def profile_split(step) -> tuple[float, float, float]:
    """(total, matrix products, attention) self CPU seconds of one profiled call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in rows) / 1e6
    mm = sum(e.self_cpu_time_total for e in rows if e.key in MATMUL_OPS) / 1e6
    attention = sum(e.self_cpu_time_total for e in rows if "scaled_dot_product" in e.key) / 1e6
    return total, mm, attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5, help="inner steps K (the library default is 5)")
    parser.add_argument("--passage", type=int, default=2, help="support (and query) questions of the passage episode")
    parser.add_argument("--reps", type=int, default=2, help="timed meta-steps per episode, each after a reference")
    parser.add_argument("--ref-size", type=int, default=2048, help="n of the n × n float32 reference product")
    parser.add_argument("--suite-task", default="arc_easy", help="the built-in suite's training task of `suite`")
    parser.add_argument(
        "--episodes", default="short,passage,suite,suite-top4", help="comma-separated episode names"
    )
    args = parse_args(parser)
    record = Record()

    n = args.ref_size
    a, b = torch.randn(n, n), torch.randn(n, n)
    ref_flops = 2 * n**3

    def reference() -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    episodes = {
        "short": lambda: short_episode(), "passage": lambda: passage_episode(args.passage),
        "suite": lambda: suite_episode(args.suite_task), "suite-top4": lambda: suite_episode(args.suite_task),
    }  # fmt: skip
    chosen = args.episodes.split(",")
    unknown = sorted(set(chosen) - set(episodes))
    if unknown:
        parser.error(f"unknown episode(s) {unknown}; choose from {sorted(episodes)}")
    results = {}
    for name in chosen:
        ep = episodes[name]()
        overrides = {"inner.inner_steps": args.k, **({"lora.layers": 4} if name == "suite-top4" else {})}
        model, tok = load_model(None)
        config = ABMLLConfig().override(overrides)
        method = create_method("abmll", model, Scorer(tok, config.scoring), config)
        theta0 = method.state_dict()
        step = make_step(method, ep, theta0)
        step()  # warm-up
        reference()
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        by_op = {str(op): c for op, c in counter.get_flop_counts().get("Global", {}).items()}
        step_times, ref_times = [], []
        for _ in range(args.reps):
            ref_times.append(reference())
            start = time.perf_counter()
            step()
            step_times.append(time.perf_counter() - start)
        split = profile_split(step)
        enc = method.scorer.encode(list(ep.support))
        lengths = enc.attention_mask.sum(-1)
        layers = f"top {config.lora.layers} blocks" if config.lora.layers else "every block"
        results[name] = dict(
            flops=flops, by_op=by_op, step=step_times, ref=ref_times, split=split,
            shape=f"{enc.input_ids.shape[0]} sequences of {int(lengths.min())}–{int(lengths.max())} tokens; {layers}",
        )
        del method, model
        print(f"{name}: {statistics.median(step_times):.2f} s at {record.elapsed():.0f} s",
              file=sys.stderr, flush=True)
    record.stop()

    lines = [
        *record.header("Achieved FLOP/s of an ABMLL meta-step vs a float32 matrix product"),
        f"- meta-step: SmolLM2-135M (`load_model(None)`, float32), first-order ABMLL, K = {args.k} inner steps, one "
        "weight sample per step, 1 task, Bayesian LoRA rank 8 on q_proj, v_proj; θ restored before every call",
        "- episodes: `short` and `passage` are small hand-made ones (4 and "
        f"{args.passage} support questions); `suite` is the first meta-training episode of the built-in suite's "
        f"`{args.suite_task}` at the library's defaults (16 support and 16 query questions, micro-batches of 8), "
        "`suite-top4` the same with `lora.layers = 4` (the frozen-trunk cache warm from the previous call)",
        f"- FLOPs: `torch.utils.flop_counter.FlopCounterMode` on one untimed meta-step (matrix products only: "
        "element-wise work and the CPU attention kernel are not counted); reference: "
        f"{n} × {n} float32 `torch.mm` ({ref_flops / 1e9:.1f} GFLOP), the median of 3 "
        f"calls right before each of the {args.reps} timed meta-steps",
        "",
        "| episode | support batch | GFLOP per meta-step | meta-step time | achieved | reference | ratio | "
        "matrix products' share of the time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name, r in results.items():
        t, tr = statistics.median(r["step"]), statistics.median(r["ref"])
        achieved, ref_rate = r["flops"] / t, ref_flops / tr
        ratio = achieved / ref_rate
        total, mm, attention = r["split"]
        lines.append(
            f"| {name} | {r['shape']} | {r['flops'] / 1e9:.1f} | {t:.2f} s | {achieved / 1e9:.1f} GFLOP/s | "
            f"{ref_rate / 1e9:.1f} GFLOP/s | {ratio:.1%} | {mm / total:.0%} (+ attention {attention / total:.0%}) |"
        )
        verdicts.append((name, ratio, mm / total, r))
    lines.append("")
    for name, ratio, mm_share, r in verdicts:
        if ratio >= TARGET:
            verdict = "met"
        else:
            verdict = f"not met, short by {(TARGET - ratio) * 100:.1f} points ({ratio:.1%} against {TARGET:.0%})"
        top = sorted(r["by_op"].items(), key=lambda kv: -kv[1])[:4]
        ops = ", ".join(f"{op.split('.')[-1]} {c / r['flops']:.0%}" for op, c in top)
        total, mm, _ = r["split"]
        mm_rate = r["flops"] / mm / (ref_flops / statistics.median(r["ref"])) if mm > 0 else float("nan")
        lines.append(
            f"- `{name}`: target ≥ {TARGET:.0%} of the reference: **{verdict}**; FLOPs by op: {ops}; in the "
            f"profiled call the matrix products took {mm_share:.0%} of the time and ran at {mm_rate:.0%} of the "
            "reference: the rest of the time (element-wise work, the dense ε draws, σ, copies, the Python of the "
            "loop) counts no FLOPs"
        )
    lines += [
        "",
        "Ranges (s): "
        + "; ".join(
            f"{name}: meta-step {min(r['step']):.2f}–{max(r['step']):.2f}, reference {min(r['ref']):.3f}–"
            f"{max(r['ref']):.3f}"
            for name, r in results.items()
        )
        + ".",
        "",
    ]
    emit(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
