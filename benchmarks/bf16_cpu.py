"""Benchmark: bfloat16 against float32 on this CPU, for matrix products, a scoring forward pass and a whole ABMLL
meta-step; where the time goes (``torch.profiler``), the alternatives, and what bfloat16 does to the option
log-probabilities.

All on SmolLM2-135M (``load_model(None)``), one copy of the model per variant, timings interleaved (warm-ups of
each, then ``--reps`` calls of each, order alternating; medians):

1. matrix products: ``n × n`` (``--size``) float32 / bfloat16 / float16 ``torch.mm``, and the model's own MLP
   shape (the forward batch's tokens × 576 → 1536, ``F.linear``);
2. no-grad scoring forward (the ``option`` scorer on ``--batch`` four-option questions from ``scoring_head.py``):
   float32; ``torch.autocast("cpu", bfloat16)`` over float32 weights; bfloat16 weights (``dtype=bfloat16`` on
   load, i.e. ``model.to(bfloat16)``) with SDPA's default CPU kernel, with the math SDPA backend, and with
   eager attention; float16 weights;
3. a first-order ABMLL meta-step (``meta_step_cost.py``'s episode, K = ``--k``): float32; bfloat16 base weights
   with θ, φ, σ, ε and the KL in float32 (:func:`abmll.models.cast_base_model`, what ``compute.dtype =
   bfloat16`` does), with SDPA's default CPU kernel, the math SDPA backend and eager attention; float16 base
   weights (``compute.dtype = float16``); autocast over float32 weights;
4. the forward of 2. with ``--threads2`` threads (float32 and bfloat16 weights);
5. one profiled call of the float32, autocast and bfloat16-weights forwards and meta-steps: self CPU time by
   kind of operator (matrix products, casts and copies, attention, norms, other element-wise, the rest);
6. accuracy: the option log-probabilities of the batch and of the episode's questions under each low-precision
   variant against float32.

Run from the repository root::

    .venv/bin/python benchmarks/bf16_cpu.py --threads 1            # print a Markdown section
    .venv/bin/python benchmarks/bf16_cpu.py --threads 1 --write    # and replace its section in RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from _common import Record, add_timing_options, emit, parse_args, time_interleaved
from meta_step_cost import episode, make_step
from scoring_head import examples
from torch.nn.attention import SDPBackend, sdpa_kernel

from abmll.config import ABMLLConfig, ScoringConfig
from abmll.methods import create_method
from abmll.models import cast_base_model, load_model
from abmll.scoring import Scorer

SECTION = "bf16_cpu"
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}
CASTS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous"}
NORMS = {"aten::pow", "aten::mean", "aten::rsqrt"}
ELEMENTWISE = {
    "aten::mul", "aten::add", "aten::add_", "aten::sub", "aten::div", "aten::neg", "aten::silu", "aten::cat",
    "aten::softplus", "aten::normal_", "aten::exp", "aten::log", "aten::where", "aten::fill_", "aten::zero_",
    "aten::mul_", "aten::silu_backward", "aten::softplus_backward", "aten::sum", "aten::index_add_",
}


def kind(op: str) -> str:
    if op in MATMUL:
        return "matrix products"
    if op in CASTS:
        return "casts and copies"
    if "scaled_dot_product" in op or op in ("aten::_softmax", "aten::_softmax_backward_data"):
        return "attention"
    if op in NORMS:
        return "norms (pow, mean, rsqrt)"
    if op in ELEMENTWISE:
        return "other element-wise"
    return "the rest"


def profile_kinds(step) -> tuple[dict[str, float], float, list[tuple[str, float]]]:
    """Self CPU seconds by kind of operator, the total, and the top five operators, of one profiled call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = prof.key_averages()
    kinds: dict[str, float] = defaultdict(float)
    for e in rows:
        kinds[kind(e.key)] += e.self_cpu_time_total / 1e6
    total = sum(kinds.values())
    top = sorted(((e.key, e.self_cpu_time_total / 1e6) for e in rows), key=lambda kv: -kv[1])[:5]
    return dict(kinds), total, top


def isa_line() -> str:
    """The CPU's bfloat16 / float16 / AMX flags and the kernel oneDNN picks for a bfloat16 product."""
    flags = set()
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = [f for f in ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8") if f in flags]
    missing = [f for f in ("amx_bf16", "amx_tile") if f not in flags]
    code = "import torch; a = torch.randn(256, 256).bfloat16(); a @ a"
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False).stdout
    kernel = next((ln.split(",")[6] for ln in out.splitlines() if ",exec,cpu,matmul," in ln), "unknown")
    return (
        f"CPU flags: {', '.join(wanted) or 'none of avx512_bf16/avx512_fp16/amx'}"
        + (f" (no {', '.join(missing)})" if missing else "")
        + f"; oneDNN's kernel for a bfloat16 product: `{kernel}`"
    )


def logprob_check(reference, variants: dict, scorer, batches) -> list[str]:
    """Table rows: each variant's option log-probabilities against ``reference``'s (float32)."""
    lines = []
    with torch.no_grad():
        refs = [scorer(reference, b) for b in batches]
        for name, (get_model, ctx) in variants.items():
            with ctx():
                outs = [scorer(get_model(), b) for b in batches]
            diff = torch.cat([(o - r)[torch.isfinite(r)].abs() for o, r in zip(outs, refs, strict=True)])
            same = sum(int((o.argmax(-1) == r.argmax(-1)).sum()) for o, r in zip(outs, refs, strict=True))
            n = sum(r.shape[0] for r in refs)
            dp = max(
                (torch.softmax(o, -1) - torch.softmax(r, -1)).abs().max().item()
                for o, r in zip(outs, refs, strict=True)
            )
            lines.append(
                f"| {name} | {diff.max().item():.3f} | {diff.mean().item():.3f} | {dp:.3f} | {same}/{n} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="questions of the forward batch (4 options each)")
    parser.add_argument("--k", type=int, default=1, help="inner steps K of the meta-step")
    parser.add_argument("--size", type=int, default=2048, help="n of the n × n matrix products")
    add_timing_options(parser, warmup=1, reps=3)
    parser.add_argument("--threads2", type=int, default=2, help="the other thread count of part 4")
    args = parse_args(parser)
    record = Record()
    bf16 = torch.bfloat16

    def log(what: str) -> None:
        print(f"{what} at {record.elapsed():.0f} s", file=sys.stderr, flush=True)

    # 1. matrix products
    n = args.size
    a = torch.randn(n, n)
    mats = {"float32": (a, a.t().contiguous()), "bfloat16": (a.to(bf16), a.t().contiguous().to(bf16)),
            "float16": (a.half(), a.t().contiguous().half())}
    mm_times = time_interleaved({k: (lambda x=x: torch.mm(*x)) for k, x in mats.items()}, 2, 5)
    batch = examples(args.batch)
    m32, tok = load_model(None)
    scorer = Scorer(tok, ScoringConfig())
    tokens = int(scorer.encode(batch).attention_mask.numel())
    x, w = torch.randn(tokens, 576), torch.randn(1536, 576)
    xb, wb = x.to(bf16), w.to(bf16)
    lin_times = time_interleaved({"float32": lambda: F.linear(x, w), "bfloat16": lambda: F.linear(xb, wb)}, 3, 10)
    log("matrix products")

    # 2. forward variants
    m16, _ = load_model(None, dtype=bf16)
    m16_eager, _ = load_model(None, dtype=bf16, attn_implementation="eager")
    m_half, _ = load_model(None, dtype=torch.float16)
    nullctx = contextlib.nullcontext

    def autocast():
        return torch.autocast("cpu", dtype=bf16)

    def math_sdpa():
        return sdpa_kernel(SDPBackend.MATH)

    forward_variants = {
        "float32": (lambda: m32, nullctx),
        "autocast bf16 (fp32 weights)": (lambda: m32, autocast),
        "bf16 weights": (lambda: m16, nullctx),
        "bf16 weights, math SDPA": (lambda: m16, math_sdpa),
        "bf16 weights, eager attention": (lambda: m16_eager, nullctx),
        "fp16 weights": (lambda: m_half, nullctx),
    }

    def forward(get_model, ctx):
        def step():
            with torch.no_grad(), ctx():
                return scorer(get_model(), batch)

        return step

    fwd_times = time_interleaved({k: forward(*v) for k, v in forward_variants.items()}, args.warmup, args.reps)
    log("forward")

    # 3. meta-steps
    ep = episode()
    config = ABMLLConfig().override({"inner.inner_steps": args.k})
    meta_models = {
        "float32": (torch.float32, None),
        "bf16 base (compute.dtype)": (bf16, None),
        "bf16 base, eager attention": (bf16, "eager"),
        "fp16 base (compute.dtype)": (torch.float16, None),
    }
    meta_steps = {}
    for name, (dtype, attention) in meta_models.items():
        model, _ = load_model(None, attn_implementation=attention)
        method = create_method("abmll", model, Scorer(tok, config.scoring), config)
        if dtype != torch.float32:
            cast_base_model(model, dtype)  # θ, φ, σ, ε and the KL stay float32
        meta_steps[name] = make_step(method, ep, method.state_dict())
    bf16_step, fp32_step = meta_steps["bf16 base (compute.dtype)"], meta_steps["float32"]

    def math_step():
        with math_sdpa():
            bf16_step()

    def autocast_step():
        with autocast():
            fp32_step()

    meta_steps["bf16 base, math SDPA"] = math_step
    meta_steps["autocast bf16 (fp32 weights)"] = autocast_step
    meta_times = time_interleaved(meta_steps, args.warmup, args.reps)
    log("meta-steps")

    # 4. threads
    torch.set_num_threads(args.threads2)
    thread_times = time_interleaved(
        {"float32": forward(lambda: m32, nullctx), "bf16 weights": forward(lambda: m16, nullctx)},
        args.warmup, args.reps,
    )
    torch.set_num_threads(args.threads)
    log("threads")

    # 5. profiles
    profiles = {
        f"forward, {k}": profile_kinds(forward(*forward_variants[k]))
        for k in ("float32", "autocast bf16 (fp32 weights)", "bf16 weights")
    }
    for k in ("float32", "bf16 base (compute.dtype)", "bf16 base, eager attention", "autocast bf16 (fp32 weights)"):
        profiles[f"meta-step, {k}"] = profile_kinds(meta_steps[k])
    log("profiles")

    # 6. accuracy
    question_batches = [batch, list(ep.support) + list(ep.query)]
    acc_variants = {k: forward_variants[k] for k in ("autocast bf16 (fp32 weights)", "bf16 weights", "fp16 weights")}
    acc_lines = logprob_check(m32, acc_variants, scorer, question_batches)
    record.stop()

    def table(times: dict[str, list[float]], base: str, title: str) -> list[str]:
        med = {k: statistics.median(v) for k, v in times.items()}
        out = [f"| {title} | median | min–max | ratio to {base} (> 1: slower) |", "|---|---|---|---|"]
        for k, v in times.items():
            out.append(f"| {k} | {med[k]:.3f} s | {min(v):.3f}–{max(v):.3f} s | {med[k] / med[base]:.2f}× |")
        return out

    enc = scorer.encode(batch)
    lengths = enc.attention_mask.sum(-1)
    med_fwd = {k: statistics.median(v) for k, v in fwd_times.items()}
    med_meta = {k: statistics.median(v) for k, v in meta_times.items()}
    fastest_fwd = min(med_fwd, key=med_fwd.get)
    fastest_meta = min(med_meta, key=med_meta.get)
    lines = [
        *record.header(
            "bfloat16 vs float32 on this CPU: matrix products, scoring forward, meta-step", f"- {isa_line()}"
        ),
        f"- model: SmolLM2-135M (`load_model(None)`), one copy per variant; forward batch: {len(batch)} questions × "
        f"4 options = {enc.input_ids.shape[0]} sequences of {int(lengths.min())}–{int(lengths.max())} tokens "
        f"(padded to {enc.input_ids.shape[1]}); meta-step: first-order ABMLL, K = {args.k}, "
        "`meta_step_cost.py`'s episode (4 support + 4 query questions), Bayesian LoRA rank 8 on q_proj, v_proj",
        f"- timing: {args.warmup} warm-up(s) of each, then {args.reps} timed calls of each, interleaved (order "
        "alternating); medians, seconds",
        "",
        f"**1. Matrix products** ({args.threads} torch thread(s); 2 warm-ups, then 5 interleaved reps)",
        "",
        "| product | float32 | bfloat16 | float16 | bf16 / fp32 | fp16 / fp32 |",
        "|---|---|---|---|---|---|",
    ]
    mm = {k: statistics.median(v) for k, v in mm_times.items()}
    lines.append(
        f"| {n} × {n} `torch.mm` | {mm['float32'] * 1e3:.1f} ms ({2 * n**3 / mm['float32'] / 1e9:.0f} GFLOP/s) | "
        f"{mm['bfloat16'] * 1e3:.1f} ms ({2 * n**3 / mm['bfloat16'] / 1e9:.0f} GFLOP/s) | "
        f"{mm['float16'] * 1e3:.1f} ms | {mm['bfloat16'] / mm['float32']:.2f}× | {mm['float16'] / mm['float32']:.2f}× |"
    )
    lin = {k: statistics.median(v) for k, v in lin_times.items()}
    lines += [
        f"| [{tokens} × 576] → 1536 `F.linear` (the MLP's shape) | {lin['float32'] * 1e3:.2f} ms | "
        f"{lin['bfloat16'] * 1e3:.2f} ms | – | {lin['bfloat16'] / lin['float32']:.2f}× | – |",
        "",
        "**2. No-grad scoring forward**",
        "",
        *table(fwd_times, "float32", "variant"),
        "",
        f"**3. ABMLL meta-step** (first order, K = {args.k})",
        "",
        *table(meta_times, "float32", "variant"),
        "",
        f"**4. Threads**: the forward of 2. with {args.threads2} threads (the other job uses both cores: this "
        "row mostly measures contention)",
        "",
        *table(thread_times, "float32", "variant"),
        "",
        "**5. Where the time goes** (one profiled call each; self CPU time by kind of operator, share of the call)",
        "",
        "| call | total | matrix products | casts and copies | attention | norms (pow, mean, rsqrt) | other "
        "element-wise | the rest | top operators |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (kinds, total, top) in profiles.items():
        shares = [kinds.get(k, 0.0) for k in ("matrix products", "casts and copies", "attention",
                                               "norms (pow, mean, rsqrt)", "other element-wise", "the rest")]
        tops = ", ".join(f"`{op.replace('aten::', '')}` {s:.2f} s" for op, s in top[:3])
        lines.append(
            f"| {name} | {total:.2f} s | " + " | ".join(f"{s:.2f} s ({s / total:.0%})" for s in shares) + f" | {tops} |"
        )
    lines += [
        "",
        "**6. Accuracy**: option log-probabilities (`scoring.length_norm = none`) against float32, over the forward "
        "batch and the episode's 8 questions",
        "",
        "| variant | max abs Δ log-prob | mean abs Δ | max abs Δ option probability | same top option |",
        "|---|---|---|---|---|",
        *acc_lines,
        "",
        f"- fastest forward: **{fastest_fwd}** ({med_fwd[fastest_fwd] / med_fwd['float32']:.2f}× float32); fastest "
        f"meta-step: **{fastest_meta}** ({med_meta[fastest_meta] / med_meta['float32']:.2f}× float32)",
        "",
    ]
    emit(SECTION, lines, args.write)
    log("done")


if __name__ == "__main__":
    main()
