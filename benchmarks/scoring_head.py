"""Benchmark: the option scorer with the LM head only at the read positions (what ``abmll.scoring.Scorer``
does) against full logits at every position, then reading (``model(**kwargs).logits[read]``).

Same batch, same model (SmolLM2-135M, ``load_model(None)``), same post-processing; the two variants differ
only in ``Scorer._read_logits``. Timings are interleaved (warm-ups of both, then alternating timed reps) and
reported as medians, in ``torch.no_grad`` (``--batch`` examples, default 8) and for forward + backward through
an injected Bayesian LoRA adapter (the first ``--bwd-batch`` of them, default 4). ``--threads N`` pins torch's
thread count: with another process busy on a 2-core machine, 1 thread avoids OpenMP oversubscription stalls,
which otherwise make single calls 10× slower at random. Peak memory is measured in a fresh subprocess per
variant and mode: the rise of the resident set's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) above the resident set before the first call. Run from the repository root::

    .venv/bin/python benchmarks/scoring_head.py            # print a Markdown section
    .venv/bin/python benchmarks/scoring_head.py --write    # and replace its section in benchmarks/RESULTS.md
    .venv/bin/python benchmarks/scoring_head.py --threads 1 --write   # what produced the recorded numbers
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

from abmll.bayes import inject, prior, weight_sample
from abmll.config import BayesLoRAConfig, ScoringConfig
from abmll.models import load_model
from abmll.scoring import Encoded, Scorer
from abmll.tasks.data import Example

SECTION = "scoring_head"
PASSAGE = (
    "Maya keeps a small garden behind her house. In spring she plants tomatoes, beans and sunflowers. "
    "Every morning she waters the plants before school, and on Saturdays she pulls the weeds with her "
    "little brother. By the end of summer the sunflowers are taller than the fence, and the family eats "
    "fresh tomatoes with almost every meal."
).split(". ")
QUESTIONS = [
    ("What does Maya plant in spring?", ["tomatoes, beans and sunflowers", "apples", "rice", "cactus"]),
    ("When does Maya water the plants?", ["every morning", "at midnight", "never", "once a year"]),
    ("Who helps Maya pull the weeds?", ["her little brother", "a teacher", "the mayor", "nobody"]),
    ("What grows taller than the fence?", ["the sunflowers", "the beans", "the grass", "the house"]),
    ("Where is the garden?", ["behind her house", "on the moon", "in a school", "under the sea"]),
    ("On which day does Maya pull weeds?", ["Saturday", "Monday", "Wednesday", "Friday"]),
    ("What does the family eat with meals?", ["fresh tomatoes", "ice cream", "popcorn", "candy"]),
    ("When are the sunflowers tallest?", ["at the end of summer", "in winter", "in early spring", "at night"]),
]


def examples(n: int) -> list[Example]:
    """``n`` four-option questions after a passage of 2–5 sentences: sequences of roughly 60–100 tokens."""
    out = []
    for i in range(n):
        question, options = QUESTIONS[i % len(QUESTIONS)]
        passage = ". ".join(PASSAGE[: 2 + i % 4]) + "."
        out.append(Example(f"{passage}\nQuestion: {question}\nAnswer:", tuple(options), 0, id=f"bench:{i}"))
    return out


class FullLogitsScorer(Scorer):
    """The same scorer, but the LM head runs at every position and the read rows are picked afterwards."""

    def _read_logits(self, model, enc: Encoded) -> torch.Tensor:
        device = next(model.parameters()).device
        kwargs = dict(
            input_ids=enc.input_ids.to(device),
            attention_mask=enc.attention_mask.to(device),
            position_ids=enc.position_ids.to(device),
        )
        return model(**kwargs).logits[enc.read_mask.to(device)].float()


VARIANTS = {"head_at_read": Scorer, "full_logits": FullLogitsScorer}


def make_step(model, scorer: Scorer, batch: list[Example], mode: str, theta=None):
    if mode == "no_grad":

        def step():
            with torch.no_grad():
                return scorer(model, batch)

    else:
        params = list(theta.values())

        def step():  # a weight sample, as in training, so that μ and σ factors all get gradients
            with weight_sample(model, 0):
                loss = scorer.nll(model, batch)
            return torch.autograd.grad(loss, params)

    return step


def memory_child(variant: str, mode: str, n: int) -> None:
    """In a fresh process: the peak resident-set rise of the first call of one variant (MiB), as JSON."""
    model, tok = load_model(None)
    theta = None
    if mode == "fwd_bwd":
        inject(model, BayesLoRAConfig(), generator=torch.Generator().manual_seed(0))
        theta = prior(model)
    step = make_step(model, VARIANTS[variant](tok, ScoringConfig()), examples(n), mode, theta)
    page_in(model)  # the (memory-mapped) weights, so that the rise below is activations only
    report_child(peak_rise(step))


def measure_memory(n: int, n_bwd: int) -> dict[tuple[str, str], float | None]:
    out: dict[tuple[str, str], float | None] = {}
    for mode in ("no_grad", "fwd_bwd"):
        for variant in VARIANTS:
            size = n if mode == "no_grad" else n_bwd
            args = [__file__, "--memory-child", variant, mode, "--batch", str(size)]
            args += ["--threads", str(torch.get_num_threads())]
            out[(variant, mode)] = run_child(args, f"{variant}/{mode}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="examples per batch (4 options each)")
    parser.add_argument(
        "--bwd-batch", type=int, default=4, help="examples per batch for forward + backward (its first examples)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls of each variant first")
    parser.add_argument("--reps", type=int, default=10, help="timed calls of each variant, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--write", action="store_true", help=f"replace this section of {RESULTS}")
    parser.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.batch)
        return

    command = command_line()
    date = utc_date()
    t0 = time.perf_counter()
    model, tok = load_model(None)
    batch = examples(args.batch)
    scorers = {name: cls(tok, ScoringConfig(), padding_side="right") for name, cls in VARIANTS.items()}
    load_start = os.getloadavg()[0]

    def describe(examples_: list[Example]) -> str:
        enc = scorers["head_at_read"].encode(examples_)
        lengths = enc.attention_mask.sum(-1)
        return (
            f"{len(examples_)} examples × 4 options = {enc.input_ids.shape[0]} sequences of {int(lengths.min())}–"
            f"{int(lengths.max())} tokens (padded to {enc.input_ids.shape[1]}), {int(enc.read_mask.sum())} read "
            f"positions of {int(lengths.sum())} real tokens"
        )

    # agreement, then timing without gradients on the plain model
    with torch.no_grad():
        scores = {name: s(model, batch) for name, s in scorers.items()}
    max_diff = (scores["head_at_read"] - scores["full_logits"]).abs().max().item()
    assert max_diff < 1e-4, f"the two variants disagree: max |Δ log-prob| = {max_diff}"
    steps = {name: make_step(model, s, batch, "no_grad") for name, s in scorers.items()}
    timed = {"no_grad": time_interleaved(steps, args.warmup, args.reps)}
    print(f"no_grad timed at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    # forward + backward through an injected adapter (q_proj, v_proj; θ moved off B = 0)
    inject(model, BayesLoRAConfig(), generator=torch.Generator().manual_seed(0))
    theta = prior(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in theta.values():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    bwd_batch = batch[: args.bwd_batch]
    grads = {name: make_step(model, s, bwd_batch, "fwd_bwd", theta)() for name, s in scorers.items()}
    grad_diff = max(
        ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
        for a, b in zip(grads["head_at_read"], grads["full_logits"], strict=True)
    )
    steps = {name: make_step(model, s, bwd_batch, "fwd_bwd", theta) for name, s in scorers.items()}
    timed["fwd_bwd"] = time_interleaved(steps, args.warmup, args.reps)
    print(f"fwd_bwd timed at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    tok_vocab = model.config.vocab_size
    del model, theta, grads, steps

    memory = {} if args.no_memory else measure_memory(args.batch, args.bwd_batch)

    labels = {"no_grad": "`torch.no_grad` forward", "fwd_bwd": "forward + backward to the adapter"}
    lines = [
        "## Option scorer: LM head at the read positions vs full logits",
        "",
        f"- date: {date}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        "- model: SmolLM2-135M (`load_model(None)`, float32, CPU); scorer `option`, right padding",
        f"- batch, no_grad: {describe(batch)}; vocabulary {tok_vocab}",
        f"- batch, forward + backward: {describe(bwd_batch)}; adapter: Bayesian LoRA on q_proj, v_proj (rank 8), "
        "one weight sample, gradient of the options NLL with respect to θ",
        f"- load average (1 min) at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f}; "
        f"total run {time.perf_counter() - t0:.0f} s including the memory subprocesses",
        f"- agreement: max |Δ option log-prob| = {max_diff:.2e} (no_grad); max relative |Δ grad| per adapter "
        f"tensor = {grad_diff:.2e}",
        f"- timing: {args.warmup} warm-ups of each, then {args.reps} timed calls of each, interleaved "
        "(order alternating); medians, seconds",
        "",
        "| mode | head at read positions | full logits then read | ratio (full / read) | peak RSS rise, read "
        "| peak RSS rise, full |",
        "|---|---|---|---|---|---|",
    ]
    for mode, times in timed.items():
        med = {name: statistics.median(t) for name, t in times.items()}
        mem = [memory.get((name, mode)) for name in VARIANTS]
        mem_txt = [f"{m:.0f} MiB" if m is not None else "n/a" for m in mem]
        lines.append(
            f"| {labels[mode]} | {med['head_at_read']:.3f} s | {med['full_logits']:.3f} s | "
            f"{med['full_logits'] / med['head_at_read']:.2f}× | {mem_txt[0]} | {mem_txt[1]} |"
        )
    spread = {mode: {name: (min(t), max(t)) for name, t in times.items()} for mode, times in timed.items()}
    lines += [
        "",
        "Ranges (min–max, s): "
        + "; ".join(
            f"{mode}: read {spread[mode]['head_at_read'][0]:.3f}–{spread[mode]['head_at_read'][1]:.3f}, "
            f"full {spread[mode]['full_logits'][0]:.3f}–{spread[mode]['full_logits'][1]:.3f}"
            for mode in spread
        )
        + ".",
        "",
        "Peak RSS rise: the first call of one variant in a fresh process (model loaded and its weights paged in; "
        "adapter injected for forward + backward): the high-water mark of the resident set above the resident "
        "set just before the call (`/proc/self/status` VmHWM after `clear_refs`); it includes one-time "
        "allocations common to both variants."
        if memory
        else "Peak memory: not measured (`--no-memory`).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(SECTION, text)
        print(f"wrote the '{SECTION}' section of {RESULTS}")


if __name__ == "__main__":
    main()
