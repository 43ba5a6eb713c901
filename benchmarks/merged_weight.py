"""Benchmark: prediction with merged weights (``compute.merge_without_grad``, the default) against the plain path.

Without gradients every adapted linear layer runs one product with W0 + ΔW, formed once per posterior and weight
sample, instead of the base product, the low-rank mean product and (for a weight sample) the dense σ ⊙ ε product,
each formed again at every forward pass. Same model (SmolLM2-135M, ``load_model(None)``, float32, CPU), same task
posterior φ (θ moved off B = 0), same query batch (``--batch`` four-option questions after a short passage, from
``scoring_head.py``) scored in ``--chunks`` micro-batches; the library's :meth:`MetaLearner.predict` with
``predict.mode = mean`` and with S = ``--samples`` weight samples, merged and plain. Timings interleaved (warm-ups
of each, then ``--reps`` calls of each, order alternating); medians. Run from the repository root::

    .venv/bin/python benchmarks/merged_weight.py --threads 1            # print a Markdown section
    .venv/bin/python benchmarks/merged_weight.py --threads 1 --write    # and replace its section in RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from _common import Record, add_timing_options, emit, parse_args, time_interleaved
from scoring_head import examples

from abmll.bayes.inject import clone_factors
from abmll.config import ABMLLConfig
from abmll.methods import create_method
from abmll.models import load_model
from abmll.scoring import Scorer

SECTION = "merged_weight"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="questions (4 options each)")
    parser.add_argument("--chunks", type=int, default=2, help="micro-batches the questions are scored in")
    parser.add_argument("--samples", type=int, default=8, help="S: weight samples of the sampled predictive")
    add_timing_options(parser, warmup=1, reps=3)
    args = parse_args(parser)
    record = Record()

    model, tok = load_model(None)
    query = examples(args.batch)
    micro = max(1, len(query) // args.chunks)
    methods = {}
    for mode, s in (("mean", 1), ("sample", args.samples)):
        for merge in (True, False):
            config = ABMLLConfig().override({
                "predict.mode": mode, "predict.samples": s, "meta.micro_batch_size": micro,
                "compute.merge_without_grad": merge,
            })  # fmt: skip
            label = f"{mode if mode == 'mean' else f'S={s}'}, {'merged' if merge else 'plain'}"
            methods[label] = create_method("abmll", model, Scorer(tok, config.scoring), config)  # one shared adapter
    theta = next(iter(methods.values())).theta
    gen = torch.Generator().manual_seed(1)
    phi = clone_factors(theta, requires_grad=False)
    for v in phi.values():
        v.add_(0.01 * torch.randn(v.shape, generator=gen))

    def step(method):
        for layer in method.layers.values():  # the methods share the model's layers: each call sets its own path
            layer.merge = method.config.compute.merge_without_grad
        return method.predict(phi, query, seed=0)

    steps = {name: (lambda m=m: step(m)) for name, m in methods.items()}
    times = time_interleaved(steps, args.warmup, args.reps)
    probs = {name: steps[name]() for name in steps}
    record.stop()
    med = {name: statistics.median(t) for name, t in times.items()}
    enc = next(iter(methods.values())).scorer.encode(query)
    lengths = enc.attention_mask.sum(-1)
    lines = [
        *record.header("Prediction with merged weights W0 + ΔW vs the plain path"),
        "- model: SmolLM2-135M (`load_model(None)`, float32, CPU); Bayesian LoRA on q_proj, v_proj (rank 8); "
        f"`predict` under `torch.no_grad`, {len(query)} questions in micro-batches of {micro}",
        f"- query: {enc.input_ids.shape[0]} sequences of {int(lengths.min())}–{int(lengths.max())} tokens, "
        f"{int(lengths.sum())} real tokens",
        f"- timing: {args.warmup} warm-up(s) of each, then {args.reps} timed calls of each, interleaved (order "
        "alternating); medians, seconds",
        "",
        "| predictive | merged | plain | plain / merged | max \\|p_merged − p_plain\\| |",
        "|---|---|---|---|---|",
    ]
    for mode in ("mean", f"S={args.samples}"):
        merged, plain = f"{mode}, merged", f"{mode}, plain"
        diff = (probs[merged] - probs[plain]).abs().max().item()
        lines.append(
            f"| {mode} | {med[merged]:.3f} s | {med[plain]:.3f} s | {med[plain] / med[merged]:.2f}× | {diff:.1e} |"
        )
    lines += [
        "",
        "- the same predictions within float rounding (`tests/test_merged_weight.py` checks 1e-5 on the tiny model, "
        "with left and right padding, options of different lengths, both scorer paths)",
        "",
    ]
    emit(SECTION, lines, args.write)
    print(f"done at {record.elapsed():.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
