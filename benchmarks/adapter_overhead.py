"""Benchmark: the cost of ABMLL's Bayesian LoRA layer against plain LoRA, forward + backward to the adapter.

Same model (SmolLM2-135M, ``load_model(None)``, float32, CPU), same batch (``--batch`` four-option questions after
a short passage, ~60–100 tokens per sequence, from ``scoring_head.py``), same scorer (``option``), same rank 8
on q_proj and v_proj, gradient of the options NLL with respect to the adapter only:

- ``abmll``: :class:`abmll.bayes.BayesLoRALinear`, one weight sample ΔW = μ + σ ⊙ ε (what every inner and outer
  step of meta-training runs), gradient to the four factors of φ;
- ``abmll-mean``: the same layer with ΔW = μ (what abmll's ``lora`` and ``structured-lora`` methods run);
- ``peft``: PEFT's ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0)`` on a second copy of the model, gradient to
  its A and B.

Timings are interleaved (warm-ups of each, then ``--reps`` calls of each, order alternating) and reported as
medians and as ratios to ``peft``; one profiled call of ``abmll`` then splits its time by operator, to show
where the extra time goes. Run from the repository root::

    .venv/bin/python benchmarks/adapter_overhead.py --threads 1            # print a Markdown section
    .venv/bin/python benchmarks/adapter_overhead.py --threads 1 --write    # and replace its section in RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from _common import Record, add_timing_options, emit, parse_args, time_interleaved
from scoring_head import examples

from abmll.bayes import inject, posterior, prior, weight_sample
from abmll.bayes.inject import clone_factors
from abmll.config import BayesLoRAConfig, ScoringConfig
from abmll.models import load_model
from abmll.scoring import Scorer

SECTION = "adapter_overhead"
TARGET = 1.3  # ABMLL (one weight sample) forward + backward at most this many times plain LoRA's


def op_table(step, top: int = 8) -> tuple[list[tuple[str, float, int]], float]:
    """One profiled call: the ``top`` operators by self CPU time (name, seconds, calls) and the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) / 1e6
    return [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in rows[:top]], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="questions per batch (4 options each)")
    add_timing_options(parser, warmup=2, reps=5)
    args = parse_args(parser)
    record = Record()

    from peft import LoraConfig, get_peft_model

    batch = examples(args.batch)
    model, tok = load_model(None)
    scorer = Scorer(tok, ScoringConfig())
    inject(model, BayesLoRAConfig(rank=8, alpha=16.0), generator=torch.Generator().manual_seed(0))
    theta = prior(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in theta.values():  # off B = 0, so that every factor's gradient is non-trivial
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    phi = clone_factors(theta)
    phi_params = list(phi.values())

    plain, _ = load_model(None)
    plain = get_peft_model(plain, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    lora_model = plain.base_model.model  # the LlamaForCausalLM with PEFT's layers in place
    lora_params = [p for p in lora_model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in lora_params)
    n_phi = sum(p.numel() for p in phi_params)

    def abmll_step(seed: int | None):
        def step():
            with posterior(model, phi), weight_sample(model, seed):
                loss = scorer.nll(model, batch)
            return torch.autograd.grad(loss, phi_params, allow_unused=True)

        return step

    def peft_step():
        loss = scorer.nll(lora_model, batch)
        return torch.autograd.grad(loss, lora_params)

    steps = {"peft": peft_step, "abmll-mean": abmll_step(None), "abmll": abmll_step(0)}
    times = time_interleaved(steps, args.warmup, args.reps)
    print(f"timed at {record.elapsed():.0f} s", file=sys.stderr, flush=True)
    profile_rows, profile_total = op_table(steps["abmll"])
    profile_mean, mean_total = op_table(steps["abmll-mean"])
    record.stop()
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = med["abmll"] / med["peft"]
    enc = scorer.encode(batch)
    lengths = enc.attention_mask.sum(-1)

    lines = [
        *record.header("Adapter overhead: ABMLL's Bayesian LoRA layer vs plain LoRA, forward + backward"),
        "- model: SmolLM2-135M (`load_model(None)`, float32, CPU); scorer `option`; adapters on q_proj, v_proj, "
        "rank 8, alpha 16, on two copies of the model",
        f"- batch: {len(batch)} questions × 4 options = {enc.input_ids.shape[0]} sequences of "
        f"{int(lengths.min())}–{int(lengths.max())} tokens (padded to {enc.input_ids.shape[1]}), "
        f"{int(lengths.sum())} real tokens; gradient of the options NLL with respect to the adapter "
        f"({n_phi:,} parameters for ABMLL's four factors, {n_lora:,} for PEFT's A and B)",
        f"- timing: {args.warmup} warm-ups of each, then {args.reps} timed calls of each, interleaved (order "
        "alternating); medians, seconds",
        "",
        "| variant | what runs | median | min–max | ratio to PEFT LoRA |",
        "|---|---|---|---|---|",
    ]
    what = {
        "peft": "PEFT LoRA: y = Wx + s·B(Ax)",
        "abmll-mean": "Bayesian LoRA, mean ΔW = μ (abmll's `lora` methods)",
        "abmll": "Bayesian LoRA, one weight sample ΔW = μ + σ ⊙ ε (meta-training)",
    }
    for name in steps:
        t = times[name]
        lines.append(
            f"| `{name}` | {what[name]} | {med[name]:.3f} s | {min(t):.3f}–{max(t):.3f} s | "
            f"{med[name] / med['peft']:.2f}× |"
        )
    verdict = "met" if ratio <= TARGET else f"not met, by {ratio / TARGET - 1:.0%} ({ratio:.2f}× against {TARGET}×)"
    lines += [
        "",
        f"- target: ABMLL (one weight sample) forward + backward ≤ {TARGET}× plain LoRA's: **{verdict}**",
        "",
        f"One profiled call of `abmll` (self CPU time by operator, total {profile_total:.2f} s; `abmll-mean`: "
        f"{mean_total:.2f} s):",
        "",
        "| operator | self CPU | share | calls |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{k}` | {s:.3f} s | {s / profile_total:.0%} | {n} |" for k, s, n in profile_rows]
    lines += [
        "",
        "`abmll-mean` for comparison: "
        + ", ".join(f"`{k}` {s:.3f} s" for k, s, _ in profile_mean[:5])
        + ".",
        "",
    ]
    emit(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
