"""Benchmark: how much of a support set's gradient is the task's own teacher, and how much is label noise.

On the synthetic families of :mod:`abmll.synthetic` (teachers ΔW_i = M + s ⊙ E_i), at the mean teacher W0 + M
(the prior mean meta-training should find), each example j of task i gives a gradient g_ij = ∇_ΔW NLL of the
adapted layers (dense, every q_proj and v_proj). Over a support set of n examples the mean gradient is

    ḡ_i = E g_i + noise,    E‖ḡ_i‖² = ‖E g_i‖² + tr Σ_i / n                                        (eq. G1)

with ``E g_i`` the task's signal (0 on the identical family: its labels are samples of the very teacher W0 + M)
and Σ_i the covariance of one example's gradient (label noise). Reported per family, mean over tasks:
S = ‖E g_i‖² (estimated without bias as ‖ḡ_i‖² − tr Σ̂_i / N over N examples) and C = tr Σ_i; then

- n_eq = C / S: the support size at which the task's signal moves the inner loop as far as the label noise does;
- for n in a grid, the ratio of the root-mean-square first inner step, spread family / identical family,
  √((S_spread + C_spread / n) / (C_identical / n)): to first order the displacement μφ − μθ of a gradient inner
  loop started at the mean teacher, which sets σθ at the empirical-Bayes fixed point σθ² = σφ² + (μφ − μθ)²
  (docs/METHOD.md §9). σθ twice as large on the spread family needs this ratio ≥ 2;
- in predictive terms, on fresh probe inputs: KL(task teacher ‖ mean teacher), the teacher's entropy (the label
  noise of one example) and KL(mean teacher ‖ base).

The dense gradient is what any parameterisation of ΔW sees before its own projection (a LoRA's inner step moves
μ along s²(G AᵀA + B BᵀG), which keeps a similar share of signal and of noise when E_i's direction is random).

Run from the repository root::

    .venv/bin/python benchmarks/synthetic_signal.py            # printed only
    .venv/bin/python benchmarks/synthetic_signal.py --write    # written to RESULTS.md
"""

from __future__ import annotations

import argparse
import math

import torch
from _common import Record, emit, parse_args

from abmll.metrics import mean_interval
from abmll.synthetic import FAMILIES, SyntheticFamily, predictive_kl

SECTION = "synthetic_signal"
#: First task index of the measured tasks: apart from the indices the family benchmark trains, tests and validates.
FIRST = 50_000


def example_gradients(family: SyntheticFamily, examples, delta) -> torch.Tensor:
    """``[len(examples), D]``: each example's gradient of the option NLL with respect to ΔW of every adapted
    layer (flattened, layers in model order), at W0 + ``delta``."""
    model = family._model
    weights = [model.get_submodule(n).weight for n in family.layers]
    out = []
    with family._applied(delta):
        for ex in examples:
            for w in weights:
                w.grad = None
            family.scorer.nll(model, [ex]).backward()
            out.append(torch.cat([w.grad.detach().flatten().double() for w in weights]))
    for w in weights:
        w.grad = None
    return torch.stack(out)


def layer_slices(family: SyntheticFamily) -> dict[str, slice]:
    out, start = {}, 0
    for n in family.layers:
        size = family._model.get_submodule(n).weight.numel()
        out[n], start = slice(start, start + size), start + size
    return out


def measure(fname: str, args) -> dict:
    family = SyntheticFamily.named(fname, seed=args.family_seed)
    slices = layer_slices(family)
    mean_delta = family.delta()
    signal = {n: [] for n in [*slices, "all"]}
    noise = {n: [] for n in [*slices, "all"]}
    for i in range(FIRST, FIRST + args.tasks):
        task = family.task(i, args.examples, seed=0)
        g = example_gradients(family, task.examples, mean_delta)
        for name, part in [*slices.items(), ("all", slice(None))]:
            gi = g[:, part]
            mean = gi.mean(0)
            trace = float(((gi - mean) ** 2).sum(1).sum() / (len(gi) - 1))  # tr Σ̂
            signal[name].append(float(mean.pow(2).sum()) - trace / len(gi))  # unbiased ‖E g‖²
            noise[name].append(trace)
    probe = family.probe(args.probe, seed=1)
    mean_probs, base = family.probs(probe, mean_delta), family.probs(probe)
    teachers = [family.probs(probe, family.delta(i)) for i in range(FIRST, FIRST + args.tasks)]
    return {
        "signal": signal,
        "noise": noise,
        "kl_task_to_mean": [predictive_kl(t, mean_probs) for t in teachers],
        "teacher_entropy": [float(-torch.xlogy(t.double(), t.double()).sum(-1).mean()) for t in teachers],
        "kl_mean_to_base": predictive_kl(mean_probs, base),
    }


def fmt(i: dict, digits: int = 3) -> str:
    return f"{i['mean']:.{digits}g} [{i['low']:.{digits}g}, {i['high']:.{digits}g}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=16, help="tasks per family")
    parser.add_argument("--examples", type=int, default=128, help="examples per task (N)")
    parser.add_argument("--probe", type=int, default=256, help="fresh inputs of the predictive figures")
    parser.add_argument("--family-seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024, 4096], help="support sizes n")
    args = parse_args(parser)
    record = Record()
    result = {f: measure(f, args) for f in FAMILIES}
    record.stop()
    spread, ident = result["spread"], result["identical"]
    lines = [
        *record.header("Synthetic families: a support set's gradient, the task's signal against label noise"),
        f"- run: {args.tasks} tasks per family (indices from {FIRST}), {args.examples} examples each, "
        f"{args.probe} probe inputs, family seed {args.family_seed}; gradients at the mean teacher W0 + M; total "
        f"{record.elapsed():.0f} s",
        "",
        "Per-task figures, mean over tasks with a 95 % t-interval over tasks. S = ‖E g_i‖² (unbiased, eq. G1), "
        "C = tr Σ_i (one example's gradient covariance), n_eq = C / S.",
        "",
        "| layers | family | S | C | n_eq = C / S |",
        "|---|---|---|---|---|",
    ]
    for name in [*spread["signal"]]:
        for fname, r in result.items():
            s, c = sum(r["signal"][name]) / args.tasks, sum(r["noise"][name]) / args.tasks
            n_eq = f"{c / s:.0f}" if s > 0 else "∞ (S ≤ 0: no signal)"
            label = name if name != "all" else "all adapted"
            s_i, c_i = fmt(mean_interval(r["signal"][name])), fmt(mean_interval(r["noise"][name]))
            lines.append(f"| {label} | {fname} | {s_i} | {c_i} | {n_eq} |")
    s_sp = sum(spread["signal"]["all"]) / args.tasks
    c_sp, c_id = sum(spread["noise"]["all"]) / args.tasks, sum(ident["noise"]["all"]) / args.tasks
    lines += [
        "",
        "First inner step from the mean teacher: root-mean-square displacement, spread family / identical family, "
        "√((S_spread + C_spread / n) / (C_identical / n)), all adapted layers (σθ twice as large needs ≥ 2):",
        "",
        "| support size n | " + " | ".join(str(n) for n in args.sizes) + " |",
        "|---" * (len(args.sizes) + 1) + "|",
        "| ratio | " + " | ".join(f"{math.sqrt(max(s_sp + c_sp / n, 0) / (c_id / n)):.2f}" for n in args.sizes) + " |",
        "",
        "Predictive, on the probe inputs (nats): KL(task teacher ‖ mean teacher) and the teacher's entropy (mean "
        "over tasks, 95 % t-interval over tasks); KL(mean teacher ‖ base)",
        "",
        "| family | KL(task teacher ‖ mean teacher) | teacher entropy | KL(mean teacher ‖ base) |",
        "|---|---|---|---|",
    ]
    for fname, r in result.items():
        lines.append(f"| {fname} | {fmt(mean_interval(r['kl_task_to_mean']))} | "
                     f"{fmt(mean_interval(r['teacher_entropy']))} | {r['kl_mean_to_base']:.3f} |")  # fmt: skip
    emit(SECTION, lines + [""], args.write)


if __name__ == "__main__":
    main()
