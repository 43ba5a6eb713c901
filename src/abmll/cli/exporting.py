"""``abmll export-peft``, ``abmll export-merged`` and ``abmll plan``: adapters out to the Hugging Face
ecosystem, and the memory of a meta-step before any weights are loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from abmll.cli.common import (
    DeviceOpt,
    DType,
    GradientOrder,
    ModelOpt,
    _device,
    _errors,
    _method_name,
    _parse_sets,
    _reporter,
    _value,
    app,
    console,
    results_console,
)

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


