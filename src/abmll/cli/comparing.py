"""``abmll compare``, ``abmll demo`` and ``abmll tune``: every method on the same tasks and budget, and the
search of each method's settings on meta-validation tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from abmll.cli.common import (
    Budget,
    ColumnsOpt,
    DataOpt,
    DeviceOpt,
    ModelOpt,
    ReportTo,
    ReportToOpt,
    SettingOpt,
    _check_data,
    _device,
    _errors,
    _parse_ints,
    _parse_sets,
    _portable,
    _reporter,
    _task_names,
    _tracker,
    _value,
    app,
    console,
    results_console,
)
from abmll.errors import ConfigError

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
        help="Budget: smoke (CI: 2 meta-steps, two test tasks, one seed), quick (10 meta-steps, every test task, one "
        "seed, 24 queries), full (10 meta-steps, 3 seeds, 100 queries). abmll plan estimates a meta-step's memory.",
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
    theta_from: Path | None = None,
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
    method_names = [m.strip() for m in methods.split(",") if m.strip()]
    if tuned is not None:
        from abmll.tune import check_finished, read_tuned

        tuned_values = read_tuned(tuned)  # an unknown method or field fails here
        check_finished(tuned, method_names)  # so does an unfinished study
    mapping = _check_data(data, columns)
    names = _task_names(tasks)
    if data is None:
        from abmll.suite import build_suite

        data = build_suite(progress=console.print)
    comparison = from_preset(
        preset, method_names, data, model, setting, test_tasks=names,
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
        from abmll.methods import METHODS
        from abmll.tune import check_tuned

        shared = {METHODS[m].meta_trained_as for m in comparison.methods}  # abmll-icl may take abmll's values
        comparison.tuned = {m: v for m, v in tuned_values.items() if m in comparison.methods or m in shared}
        check_tuned(comparison.tuned, comparison.config, str(tuned))
        comparison.extra["tuned"] = _portable(tuned)
    if theta_from is not None:
        if not theta_from.is_dir():
            raise ConfigError(f"--theta-from {theta_from}: no such comparison folder")
        comparison.theta_from = theta_from
        comparison.extra["theta_from"] = _portable(theta_from)
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
    if results is None:  # cells left to another worker of this comparison: the last one writes the report
        console.print(f"no report yet: other runs into {out} hold cells ({time.perf_counter() - start:.0f} s)")
        return
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
    theta_from: Annotated[
        Path | None,
        typer.Option(
            "--theta-from",
            help="Another comparison's folder, e.g. the same study at another --k: each meta-learner loads the θ of "
            "its (method, seed) cell there instead of meta-training again; that θ must have been meta-trained with "
            "this config, model, data and tasks (an error names what differs). Test-time fields may differ "
            "(inner.test_inner_steps, inner.test_inner_lr, predict.samples, predict.mode), for their ablations.",
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
            config=config, sets=sets, report_to=report_to, columns=columns, tuned=tuned, theta_from=theta_from,
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


