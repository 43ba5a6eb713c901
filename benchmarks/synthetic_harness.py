"""Benchmark: the synthetic task family through the library's own harness, where the truth is known.

The family of :mod:`abmll.synthetic` (every task labelled by a known teacher ΔW_i = M + s ⊙ E_i on the tiny Llama)
is written as a model folder and a data folder (:func:`abmll.synthetic.write_benchmark`), then run exactly as a
user's data would be:

1. ``abmll tune`` of every meta-learner on the family's 'dev' tasks (the same trials per method);
2. ``abmll compare --tuned`` of every method at k = 16 and k = 4, meta-trained until the 'dev' loss stops improving
   (validated every 25 meta-steps, patience 4, at most 300 meta-steps), 3 seeds with disjoint query sets;
3. the truth table (:func:`abmll.synthetic.truth_table`): each method's KL(task teacher ‖ predictive) on its query
   examples, which needs no sampled label, against the mean teacher (a perfect prior, no adaptation) and W0
   (zero-shot), and ABMLL minus each method per task, with 95 % t-intervals across the unseen tasks.

Every step resumes (``--resume`` of tune and compare; the written family is kept when it is the same), so a run
can be accumulated over several sittings. Run from the repository root::

    .venv/bin/python benchmarks/synthetic_harness.py --family spread          # the full run
    .venv/bin/python benchmarks/synthetic_harness.py --family spread --quick  # a few minutes: a check

The family's files go to ``runs/synthetic/{family}`` (regenerated from the seeds; not committed), the tuning, the
reports and ``truth.md`` / ``truth.json`` to ``--out`` (default ``docs/results/synthetic/{family}``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from abmll.checkpoint import versions, write_json_atomic
from abmll.synthetic import FAMILIES, SETTING_FILE, SyntheticFamily, truth_table, write_benchmark

ROOT = Path(__file__).resolve().parent.parent
ABMLL = str(Path(sys.executable).with_name("abmll"))
METHODS = "lora,lora-task,structured-lora,reptile,maml,abmll"
#: Shared by tuning and comparison: the full preset's protocol (3 seeds, 100 queries at most), scored as the
#: teachers are (per-option sums), with room for 16 demonstrations in the tiny model's 512 positions.
SHARED = ["--preset", "full", "--set", "scoring.length_norm=none", "--set", "scoring.max_length=512"]
FULL = {"train": 64, "dev": 8, "test": 32, "examples": 128, "trials": 8, "tune_steps": 50, "steps": 300, "ks": [16, 4]}
QUICK = {"train": 8, "dev": 2, "test": 4, "examples": 48, "trials": 2, "tune_steps": 4, "steps": 8, "ks": [4]}


def run(command: list[str], log: list[str]) -> None:
    """Run one abmll command (its output shown as it comes) and record it; stop on a failure."""
    shown = shlex.join(["abmll", *command[1:]])
    log.append(shown)
    print(f"$ {shown}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def markdown(table: dict[str, Any], family: str, k: int, commands: list[str]) -> str:
    def cell(r: dict[str, Any]) -> str:
        return f"{r['mean']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"

    n = next(iter(table["methods"].values()))["mean"]["n"]
    lines = [
        f"# The synthetic '{family}' family through the harness, k = {k}",
        "",
        f"KL(task teacher ‖ predictive) in nats on the query examples of {n} unseen tasks (every seed), mean and "
        "95 % t-interval across tasks (lower is better; 0 is the teacher itself). Written by "
        "`benchmarks/synthetic_harness.py`; the comparison's own report (accuracy, ECE, NLL against the sampled "
        "labels) is `report.md` beside this file.",
        "",
        "| predictor | KL to the task's teacher | ABMLL − it (paired by task) |",
        "|---|---|---|",
    ]
    for name, result in sorted(table["methods"].items(), key=lambda kv: kv[1]["mean"]["mean"]):
        paired = table["paired"].get(name)
        lines.append(f"| {name} | {cell(result['mean'])} | {cell(paired) if paired else '—'} |")
    refs = table["references"]
    lines += [
        f"| *mean teacher W0 + M (a perfect prior, no adaptation)* | {cell(refs['mean_teacher']['mean'])} | |",
        f"| *W0 (the base model)* | {cell(refs['base']['mean'])} | |",
        "",
        f"The teachers' entropy, the expected NLL of the Bayes-optimal predictor on these queries: "
        f"{cell(refs['teacher_entropy']['mean'])} nats.",
        "",
        "Commands:",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="spread")
    parser.add_argument("--methods", default=METHODS, help="the meta-learners to tune and compare")
    parser.add_argument("--out", type=Path, help="relative to the repo root; default docs/results/synthetic/FAMILY")
    parser.add_argument("--quick", action="store_true", help="a small run that checks the pipeline")
    parser.add_argument("--skip-tune", action="store_true", help="compare with the library's defaults")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    family = SyntheticFamily.named(args.family)
    # Paths relative to the repository root, where the commands run: the recorded commands name no machine path.
    where = Path("runs") / ("synthetic-quick" if args.quick else "synthetic") / args.family
    out = args.out or (where / "results" if args.quick else Path("docs") / "results" / "synthetic" / args.family)
    bench = write_benchmark(
        family, ROOT / where / "benchmark", train=size["train"], dev=size["dev"], test=size["test"],
        examples=size["examples"],
    ).relative_to(ROOT)  # fmt: skip
    data = ["--model", str(bench / "model"), "--data", str(bench / "data")]
    data += ["--setting", str(bench / "data" / "settings" / SETTING_FILE)]
    commands: list[str] = []
    tuned: list[str] = []
    if not args.skip_tune:
        tune_out = out / "tune"
        resume = ["--resume"] if (tune_out / "tune.db").exists() else []
        run(
            [ABMLL, "tune", "--methods", args.methods, "--trials", str(size["trials"]), "--seeds", "100", *data,
             *SHARED, "--set", f"meta.meta_steps={size['tune_steps']}", "--out", str(tune_out), *resume],
            commands,
        )  # fmt: skip
        tuned = ["--tuned", str(tune_out / "tuned.json")]
    for k in size["ks"]:
        cell_out = out / f"k{k}"
        run(
            [ABMLL, "compare", "--methods", f"zero-shot,icl,{args.methods},abmll-icl", *data, *SHARED, "--k", str(k),
             "--set", f"meta.meta_steps={size['steps']}", "--set", "meta.validate_every=25", "--set", "meta.patience=4",
             *tuned, "--out", str(cell_out), "--resume"],
            commands,
        )  # fmt: skip
        table = truth_table(ROOT / bench, ROOT / cell_out)
        record = {"family": args.family, "k": k, "commands": commands, "versions": versions(), **table}
        write_json_atomic(ROOT / cell_out / "truth.json", record)
        text = markdown(table, args.family, k, commands)
        (ROOT / cell_out / "truth.md").write_text(text, encoding="utf-8")
        print(text)
    print(json.dumps({"out": str(out)}))


if __name__ == "__main__":
    main()
