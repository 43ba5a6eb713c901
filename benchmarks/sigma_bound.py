"""Benchmark: why σθ grew without end in the tuned synthetic comparison, and what the bound σ_max (eq. 2b) does.

On the tiny Llama and the synthetic ``spread`` family (32 meta-training tasks of 64 examples), with ABMLL's values
tuned on that family (`docs/results/synthetic/spread/tune/tuned.json`, rounded: the ``TUNED`` of
``tests/test_bayes_acts.py``), for each of ``--seeds``:

1. unbounded (``lora.sigma_max`` null): the largest, mean and median entry of σθ after ``--steps`` meta-steps;
   the same with the inner loop's σ step switched off (α_σ = 1e-12: σφ = σθ), which tells whether the inner σ
   step or the outer AdamW step drives the growth;
2. bounded (the default σ_max = 1): the same three figures;
3. at meta-step ``--probe-step`` of the unbounded run: the expected NLL over 32 weight samples (common random
   numbers) of 64 fresh examples, with the top 1 % entries of σθ in each layer multiplied by 0, 1, 2, 4 and 16.
   Where a larger σ lowers it, the likelihood itself asks for more noise there, and nothing in eq. 8 stops it.

Run from the repository root::

    .venv/bin/python benchmarks/sigma_bound.py            # print a Markdown section
    .venv/bin/python benchmarks/sigma_bound.py --write    # and replace its section in RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import Record, emit, parse_args

from abmll.bayes.inject import group_by_layer
from abmll.config import ABMLLConfig
from abmll.inner import derive_seed, likelihood
from abmll.methods import create_method
from abmll.scoring import Scorer
from abmll.synthetic import SyntheticFamily
from abmll.tasks.data import MetaBatchSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_bayes_acts import TUNED  # noqa: E402  (one place for the tuned values)

SECTION = "sigma_bound"
FACTORS = (0.0, 1.0, 2.0, 4.0, 16.0)


def train(family: SyntheticFamily, seed: int, steps: int, probe_step: int | None = None, **changes):
    """ABMLL meta-trained ``steps`` meta-steps with ``TUNED`` and ``changes``; the method, and (at ``probe_step``)
    the expected NLL per layer under each scaling of its top 1 % σθ entries."""
    config = ABMLLConfig().override({**TUNED, "seed": seed, **changes})
    model, tokenizer = family.base_model()
    method = create_method("abmll", model, Scorer(tokenizer, config.scoring), config)
    sampler = MetaBatchSampler(family.tasks(range(32), 64), k=4, query_size=4, meta_batch_size=2, seed=seed)
    probe = None
    if probe_step is not None:
        method.meta_train(sampler, steps=probe_step)
        probe = noise_probe(family, method, seed)
    method.meta_train(sampler, steps=steps)
    return method, probe


def sigmas(method) -> dict[str, torch.Tensor]:
    grouped = group_by_layer({k: v.detach() for k, v in method.theta.items()})
    return {name: layer.sigma(grouped[name]) for name, layer in method.layers.items()}


@torch.no_grad()
def noise_probe(family: SyntheticFamily, method, seed: int) -> dict[str, list[float]]:
    """E_ε NLL of 64 fresh examples at θ with each layer's top 1 % σθ entries scaled by each of ``FACTORS``."""
    examples = family.task(20_000 + seed, 64).examples
    seeds = [derive_seed(7, seed, s) for s in range(32)]
    out = {}
    for name, sigma in sigmas(method).items():
        layer = method.layers[name]
        top = (sigma >= torch.quantile(sigma.flatten(), 0.99)).float()
        row = []
        for factor in FACTORS:
            layer.sigma = lambda f, own=type(layer).sigma.__get__(layer), scale=1 + (factor - 1) * top: own(f) * scale
            row.append(float(likelihood(method.model, None, examples, method.scorer, seeds, 64)))
            del layer.sigma
        out[short(name)] = row
    return out


def short(name: str) -> str:
    return name.replace("model.layers.", "L").replace(".self_attn.", ".")


def summary(method) -> tuple[float, float, float]:
    every = torch.cat([s.flatten() for s in sigmas(method).values()])
    return float(every.max()), float(every.mean()), float(every.median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=160, help="meta-steps of every run")
    parser.add_argument("--probe-step", type=int, default=60, help="meta-step of the noise probe (unbounded run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parse_args(parser)
    record = Record()
    family = SyntheticFamily.named("spread")
    rows, probes = [], []
    for seed in args.seeds:
        free, probe = train(family, seed, args.steps, args.probe_step, **{"lora.sigma_max": None})
        no_inner, _ = train(family, seed, args.steps, **{"lora.sigma_max": None, "inner.sigma_lr": 1e-12})
        bounded, _ = train(family, seed, args.steps)
        rows.append((seed, summary(free), summary(no_inner), summary(bounded)))
        probes.append((seed, probe))
    record.stop()

    def cells(s: tuple[float, float, float]) -> str:
        return f"{s[0]:.3g} / {s[1]:.3g} / {s[2]:.3g}"

    lines = [
        *record.header("σθ without and with the bound σ_max (eq. 2b)"),
        f"- setup: tiny Llama, synthetic `spread` family (32 tasks × 64 examples), ABMLL with the tuned values of "
        f"`tests/test_bayes_acts.py::TUNED` (σ_init {TUNED['lora.sigma_init']}), {args.steps} meta-steps",
        f"- elapsed: {record.elapsed():.0f} s",
        "",
        "σθ over every entry of every adapted layer: max / mean / median.",
        "",
        "| seed | unbounded | unbounded, no inner σ step | bounded, σ_max = 1 |",
        "|---|---|---|---|",
        *[f"| {seed} | {cells(a)} | {cells(b)} | {cells(c)} |" for seed, a, b, c in rows],
        "",
        f"Expected NLL (32 weight samples, 64 fresh examples) at meta-step {args.probe_step} of the unbounded run, "
        f"with each layer's top 1 % σθ entries multiplied by {', '.join(f'{f:g}' for f in FACTORS)}:",
        "",
        "| seed | layer | " + " | ".join(f"×{f:g}" for f in FACTORS) + " |",
        "|---|---|" + "---|" * len(FACTORS),
        *[
            f"| {seed} | {layer} | " + " | ".join(f"{v:.4f}" for v in values) + " |"
            for seed, probe in probes
            for layer, values in probe.items()
        ],
    ]
    emit(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
