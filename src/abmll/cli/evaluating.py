"""``abmll evaluate``: adapt to every support set of the unseen tasks and score their query sets."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from abmll.cli.common import (
    ColumnsOpt,
    DataOpt,
    DeviceOpt,
    ModelOpt,
    PredictMode,
    SettingOpt,
    TasksOpt,
    _build,
    _checkpoint_digest,
    _data_and_tasks,
    _data_fields,
    _errors,
    _method_name,
    _parse_ints,
    _parse_sets,
    _reporter,
    _value,
    app,
    console,
    results_console,
)
from abmll.errors import ConfigError


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


