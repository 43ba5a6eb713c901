"""Benchmark: the synthetic task family through the library's own harness, where the truth is known.

The family of :mod:`abmll.synthetic` (every task labelled by a known teacher ΔW_i = M + s ⊙ E_i on the tiny Llama)
is written as a model folder and a data folder (:func:`abmll.synthetic.write_benchmark`), then run exactly as a
user's data would be:

1. ``abmll tune`` of every meta-learner on the family's 'dev' tasks (the same trials per method);
2. ``abmll compare --tuned`` of every method at k = 16 and k = 4, meta-trained until the 'dev' loss stops improving
   (validated every 25 meta-steps, patience 4, at most 300 meta-steps), 3 seeds with disjoint query sets;
3. the truth table (:func:`abmll.synthetic.truth_table`): each method's KL(task teacher ‖ predictive) on its query
   examples, which needs no sampled label, against the mean teacher (a perfect prior, no adaptation) and W0
   (zero-shot), and ABMLL minus each method per task, with 95 % t-intervals across the unseen tasks;
4. with ``--ablations``, the paper's claims at k = 16: ``abmll`` compared again with one of its tuned values changed
   (:data:`ABLATIONS`: β off, the paper's v1 and v2 values; the ``straight_through_kl`` gradient; S = 1, 4, 16
   posterior samples and the mean mode; K_test = 1, 4, 16; adapters on the top block only), each variant in its own
   folder and all of them in one truth table (``ablations/truth.md``). A variant that changes only test-time
   fields meta-trains the same θ again (same seed and training config), so it differs by its test-time choice only,
   up to where the meta-validation stops.

Every step resumes (``--resume`` of tune and compare; the written family is kept when it is the same), so a run
can be accumulated over several sittings, and two runs at once share the comparisons' cells out (the one that
finishes a comparison's last cell writes its report and truth table). Run from the repository root::

    .venv/bin/python benchmarks/synthetic_harness.py --family spread          # the full run
    .venv/bin/python benchmarks/synthetic_harness.py --family spread --quick  # a few minutes: a check

The family's files go to ``runs/synthetic/{family}`` (regenerated from the seeds; not committed), the tuning, the
reports and ``truth.md`` / ``truth.json`` to ``--out`` (default ``docs/results/synthetic/{family}``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from abmll.checkpoint import versions, write_json_atomic
from abmll.synthetic import FAMILIES, SETTING_FILE, SyntheticFamily, truth_table, write_benchmark
from abmll.tune import search_space

ROOT = Path(__file__).resolve().parent.parent
ABMLL = str(Path(sys.executable).with_name("abmll"))
METHODS = "lora,lora-task,structured-lora,reptile,maml,abmll"
#: Shared by tuning and comparison: the full preset's protocol (3 seeds, 100 queries at most), scored as the
#: teachers are (per-option sums), with room for 16 demonstrations in the tiny model's 512 positions.
SHARED = ["--preset", "full", "--set", "scoring.length_norm=none", "--set", "scoring.max_length=512"]
FULL = {"train": 64, "dev": 8, "test": 32, "examples": 128, "trials": 8, "tune_steps": 50, "steps": 300, "ks": [16, 4]}
QUICK = {"train": 8, "dev": 2, "test": 4, "examples": 48, "trials": 2, "tune_steps": 4, "steps": 8, "ks": [4]}
#: ABMLL's ablations: a variant's name and the tuned values it changes (section 4 of the docstring).
ABLATIONS: dict[str, dict[str, Any]] = {
    "beta-off": {"objective.beta": 0.0},
    "beta-v1": {"objective.beta": 5e-10},
    "beta-v2": {"objective.beta": 1e-7},
    "straight-through-kl": {"inner.order": "straight_through_kl"},
    "top-block-only": {"lora.layers": 1},
    "mean-mode": {"predict.mode": "mean"},
    "samples-1": {"predict.samples": 1},
    "samples-16": {"predict.samples": 16},
    "k-test-1": {"inner.test_inner_steps": 1},
    "k-test-16": {"inner.test_inner_steps": 16},
    "samples-4": {"predict.samples": 4},
    "k-test-4": {"inner.test_inner_steps": 4},
}
ABLATION_K = 16


def run(command: list[str], log: list[str]) -> None:
    """Run one abmll command (its output shown as it comes) and record it; stop on a failure."""
    shown = shlex.join(["abmll", *command[1:]])
    log.append(shown)
    print(f"$ {shown}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def compare_command(methods: str, data: list[str], k: int, size: dict[str, Any], rest: list[str]) -> list[str]:
    """``abmll compare`` of ``methods`` at k, meta-trained to a plateau (validated every 25 meta-steps, patience 4,
    at most ``size["steps"]``), resumed, with ``rest`` (tuned file, output folder, overrides) at the end."""
    return [
        ABMLL, "compare", "--methods", methods, *data, *SHARED, "--k", str(k),
        "--set", f"meta.meta_steps={size['steps']}", "--set", "meta.validate_every=25", "--set", "meta.patience=4",
        *rest, "--resume",
    ]  # fmt: skip


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
    ]
    labels = table.get("labels", {})
    if labels:
        lines += [
            "Against the sampled labels (the comparison's own metrics, per task: the mean gold NLL of its queries and "
            "its ECE, 15 bins, averaged over seeds), mean and 95 % t-interval across tasks:",
            "",
            "| predictor | NLL | ABMLL − it | ECE | ABMLL − it |",
            "|---|---|---|---|---|",
        ]
        nll, ece = labels["nll"], labels["ece"]
        for name, result in sorted(nll["methods"].items(), key=lambda kv: kv[1]["mean"]["mean"]):
            paired = [part["paired"].get(name) for part in (nll, ece)]
            lines.append(
                f"| {name} | {cell(result['mean'])} | {cell(paired[0]) if paired[0] else '—'} | "
                f"{cell(ece['methods'][name]['mean'])} | {cell(paired[1]) if paired[1] else '—'} |"
            )
        lines.append("")
    lines += [
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
    parser.add_argument("--ablations", action="store_true", help="then ABMLL's ablations at k = 16")
    parser.add_argument("--test-tasks", type=int, help="unseen tasks of the family (default 32; 4 with --quick)")
    parser.add_argument("--ks", type=int, nargs="+", help="shots of the comparisons (default 16 4)")
    parser.add_argument("--tuned-from", type=Path, help="a tuning folder to reuse (its tuned.json) instead of tuning")
    parser.add_argument(
        "--k-test", type=int, help="every method takes this many test-time steps (its tuned α kept): equal K_test"
    )
    args = parser.parse_args()
    size = dict(QUICK if args.quick else FULL)
    size.update({k: v for k, v in (("test", args.test_tasks), ("ks", args.ks)) if v is not None})
    family = SyntheticFamily.named(args.family)
    # Paths relative to the repository root, where the commands run: the recorded commands name no machine path.
    where = Path("runs") / ("synthetic-quick" if args.quick else "synthetic") / args.family
    out = args.out or (where / "results" if args.quick else Path("docs") / "results" / "synthetic" / args.family)
    # The train and dev tasks do not depend on the number of test tasks: a tuning of the default benchmark serves.
    folder = "benchmark" if args.test_tasks is None else f"benchmark-test{args.test_tasks}"
    bench = write_benchmark(
        family, ROOT / where / folder, train=size["train"], dev=size["dev"], test=size["test"],
        examples=size["examples"],
    ).relative_to(ROOT)  # fmt: skip
    data = ["--model", str(bench / "model"), "--data", str(bench / "data")]
    data += ["--setting", str(bench / "data" / "settings" / SETTING_FILE)]
    commands: list[str] = []
    tuned: list[str] = []
    if args.tuned_from is not None:
        tuned = ["--tuned", str(args.tuned_from / "tuned.json")]
    elif not args.skip_tune:
        tune_out = out / "tune"
        resume = ["--resume"] if (tune_out / "tune.db").exists() else []
        run(
            [ABMLL, "tune", "--methods", args.methods, "--trials", str(size["trials"]), "--seeds", "100", *data,
             *SHARED, "--set", f"meta.meta_steps={size['tune_steps']}", "--out", str(tune_out), *resume],
            commands,
        )  # fmt: skip
        tuned = ["--tuned", str(tune_out / "tuned.json")]
    if args.k_test is not None:
        tuned = equal_k_test(tuned, args.k_test, out)
    methods = f"zero-shot,icl,{args.methods},abmll-icl" if args.methods == METHODS else f"zero-shot,{args.methods}"
    for k in size["ks"]:
        cell_out = out / f"k{k}"
        run(compare_command(methods, data, k, size, [*tuned, "--out", str(cell_out)]), commands)
        if not (ROOT / cell_out / "results.json").is_file():  # another worker holds cells: it writes the truth
            continue
        table = truth_table(ROOT / bench, ROOT / cell_out)
        record = {"family": args.family, "k": k, "commands": commands, "versions": versions(), **table}
        write_json_atomic(ROOT / cell_out / "truth.json", record)
        text = markdown(table, args.family, k, commands)
        (ROOT / cell_out / "truth.md").write_text(text, encoding="utf-8")
        print(text)
    if args.ablations:
        ablate(args, size, data, out, bench, commands)
    print(json.dumps({"out": str(out)}))


def equal_k_test(tuned: list[str], k_test: int, out: Path) -> list[str]:
    """``--tuned`` of a copy of the tuned file (written into ``out``) in which every method takes ``k_test``
    test-time steps, each with its own tuned α: the methods then differ at equal K_test."""
    values = json.loads((ROOT / tuned[1]).read_text()) if tuned else {}
    for name, fields in values.items():
        if isinstance(fields, dict) and name != "study":
            fields["inner.test_inner_steps"] = k_test
    (ROOT / out).mkdir(parents=True, exist_ok=True)
    values["study"] = {**values.get("study", {}), "k_test": k_test, "tuned_from": tuned[1] if tuned else None}
    write_json_atomic(ROOT / out / "tuned.json", values)
    return ["--tuned", str(out / "tuned.json")]


def ablate(args: argparse.Namespace, size: dict[str, Any], data: list[str], out: Path, bench: Path, log: list[str]):
    """Section 4: each variant of :data:`ABLATIONS` as ``abmll compare --methods abmll`` with a tuned file whose
    ``abmll`` values are the tuned ones with the variant's changes, then one truth table of all of them beside the
    main comparison's ``abmll``."""
    tuned_file = ROOT / out / "tune" / "tuned.json"
    tuned = json.loads(tuned_file.read_text()) if tuned_file.is_file() else {}
    folder = out / "ablations"
    commands: list[str] = []
    for name, changes in ABLATIONS.items():
        variant = folder / name
        (ROOT / variant).mkdir(parents=True, exist_ok=True)
        # A searched field changes in the variant's tuned file (tuned values go on top of --set), another by --set.
        searched = search_space("abmll")
        values = {**tuned.get("abmll", {}), **{k: v for k, v in changes.items() if k in searched}}
        write_json_atomic(ROOT / variant / "tuned.json", {"abmll": values})
        sets = [arg for k, v in changes.items() if k not in searched for arg in ("--set", f"{k}={v}")]
        run(
            compare_command(
                "abmll", data, ABLATION_K, size, [*sets, "--tuned", str(variant / "tuned.json"), "--out", str(variant)]
            ),
            commands,
        )
    # One table: each variant's abmll cells under its name, and the main comparison's abmll as "tuned".
    pooled = ROOT / folder / "pooled"
    if pooled.exists():
        shutil.rmtree(pooled)
    sources = {"tuned": ROOT / out / f"k{ABLATION_K}" / "abmll"}
    sources.update({name: ROOT / folder / name / "abmll" for name in ABLATIONS})
    for name, source in sources.items():
        if source.is_dir():
            (pooled / name).mkdir(parents=True)
            for seed in source.glob("seed-*"):
                if (seed / "predictions.jsonl").is_file():
                    (pooled / name / seed.name).mkdir()
                    shutil.copy(seed / "predictions.jsonl", pooled / name / seed.name / "predictions.jsonl")
    table = truth_table(ROOT / bench, pooled, against="tuned")
    shutil.rmtree(pooled)
    record = {"family": args.family, "k": ABLATION_K, "ablations": ABLATIONS, "commands": log + commands}
    write_json_atomic(ROOT / folder / "truth.json", {**record, "versions": versions(), **table})
    text = markdown(table, args.family, ABLATION_K, log + commands).replace(
        "through the harness", "through the harness: ABMLL's ablations"
    ).replace("ABMLL − it", "tuned ABMLL − it")
    (ROOT / folder / "truth.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
