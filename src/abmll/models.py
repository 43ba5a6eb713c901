"""Loading causal language models: the embedded default, local folders, GGUF files, Hub ids; and putting a model
in the precision and memory mode of a config's ``compute`` section (:func:`prepare_model`: dtype, gradient
checkpointing, quantisation). The tiny random Llama of the tests and benchmarks is in :mod:`abmll.tiny`."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abmll.errors import ModelError

logger = logging.getLogger("abmll.models")
__all__ = [
    "DEFAULT_MODEL",
    "cast_base_model",
    "check_quantization",
    "enable_gradient_checkpointing",
    "eval_mode",
    "load_model",
    "load_tokenizer",
    "prepare_model",
    "torch_dtype",
]

DEFAULT_MODEL = "smollm2-135m"
"""Name of the embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32)."""

_DEFAULT_ALIASES = {DEFAULT_MODEL, "smollm2-135m-instruct", "smollm2"}


def _with_pad_token(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _finish(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    tokenizer = _with_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def _looks_like_path(name: str) -> bool:
    """True when ``name`` can only be meant as a local path (a Hub id is ``name`` or ``org/name``)."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name.lower().endswith(".gguf")
        or name.count("/") > 1
        or "\\" in name
    )


def _source(name_or_path: str | os.PathLike[str] | None) -> tuple[str, str | Path, dict[str, Any], str]:
    """``(name, source, tokenizer kwargs, description)`` of a model argument of :func:`load_model`; raises
    :class:`ModelError` for a path that is not a model."""
    name = DEFAULT_MODEL if name_or_path is None else os.fspath(name_or_path)

    if name.lower() in _DEFAULT_ALIASES:
        from abmll.assets import smollm2_folder

        source: str | Path = smollm2_folder()  # AssetError (with download instructions) propagates
        tok_kwargs: dict[str, Any] = {}
        what = f"the embedded default model {DEFAULT_MODEL!r} (converted folder {source})"
    else:
        path = Path(name).expanduser()
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelError(
                    f"cannot load model {name!r}: it is a file but not a .gguf file; expected a folder with "
                    "config.json, a .gguf file, or a Hub id"
                )
            source = path.parent
            tok_kwargs = {"gguf_file": path.name}
            what = f"GGUF file {path}"
        elif path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if (path / "config.json").is_file():
                source, tok_kwargs, what = path, {}, f"local folder {path}"
            elif len(ggufs) == 1:
                source, tok_kwargs, what = path, {"gguf_file": ggufs[0].name}, f"GGUF file {ggufs[0]}"
            else:
                raise ModelError(
                    f"cannot load model {name!r}: the folder {path} has no config.json"
                    + (f" and {len(ggufs)} .gguf files (pass one of them)" if ggufs else "")
                    + "; expected a folder written by save_pretrained, a .gguf file, or a Hub id"
                )
        elif _looks_like_path(name):
            raise ModelError(
                f"cannot load model {name!r}: no such file or folder; expected a folder with config.json, "
                f"a .gguf file, a Hub id, or {DEFAULT_MODEL!r}"
            )
        else:
            source, tok_kwargs, what = name, {}, f"Hub id {name!r}"

    return name, source, tok_kwargs, what


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    quantization: str = "none",
    device: torch.device | str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode, with a pad token (the EOS token if it had none).

    ``name_or_path`` is one of: ``None`` or ``"smollm2-135m"`` (the embedded default, converted once by
    :func:`abmll.assets.smollm2_folder`); a path to a ``.gguf`` file; a local folder with ``config.json``
    (what ``save_pretrained`` writes); or a Hugging Face Hub id such as ``meta-llama/Meta-Llama-3-8B``.
    ``dtype`` (a ``torch.dtype`` or a name such as ``"bfloat16"``) is the dtype of the weights.
    ``quantization`` = ``"4bit"`` (NF4) or ``"8bit"`` quantises the linear layers with bitsandbytes on load
    (CUDA only; :func:`check_quantization`). With a CUDA ``device`` the weights load straight onto it.
    Raises :class:`ModelError` naming the model and what was expected when loading fails.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization != "none":
        kwargs["quantization_config"] = _bnb_config(quantization, dtype)
        device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    if device is not None and torch.device(device).type == "cuda":
        kwargs["device_map"] = {"": torch.device(device)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    name, source, tok_kwargs, what = _source(name_or_path)
    kwargs.update(tok_kwargs)  # a GGUF file names itself to the model and to the tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
    except Exception as exc:
        hint = (
            " (not a local folder with config.json or a .gguf file, so it was tried as a Hub id; the Hub "
            "could not be reached or has no such model)"
            if isinstance(source, str)
            else ""
        )
        raise ModelError(
            f"cannot load model {name!r} from {what}{hint}: {type(exc).__name__}: {exc}"
        ) from exc
    return _finish(model, tokenizer)


def load_tokenizer(name_or_path: str | os.PathLike[str] | None = None) -> Any:
    """The tokenizer of a model argument of :func:`load_model` (without its weights), with a pad token."""
    from transformers import AutoTokenizer

    name, source, tok_kwargs, what = _source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {name!r} from {what}: {type(exc).__name__}: {exc}") from exc
    return _with_pad_token(tokenizer)


# ----------------------------------------------------------------------------------------------------------
# Precision and memory (the config's ``compute`` section)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` → the torch dtype."""
    if name not in _DTYPES:
        raise ModelError(f"dtype {name!r} is invalid: expected one of {tuple(_DTYPES)}")
    return _DTYPES[name]


def check_quantization(quantization: str) -> None:
    """Raise :class:`ModelError` unless ``quantization`` is ``"none"`` or bitsandbytes and a CUDA GPU are
    both available (bitsandbytes' 4-bit and 8-bit layers run on CUDA only)."""
    if quantization == "none":
        return
    if quantization not in ("4bit", "8bit"):
        raise ModelError(f"compute.quantization = {quantization!r} is invalid: expected 'none', '4bit' or '8bit'")
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package is not installed (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is available")
    if missing:
        raise ModelError(
            f"compute.quantization = {quantization!r} needs bitsandbytes and a CUDA GPU, but "
            + " and ".join(missing)
            + "; use compute.quantization = 'none' here (compute.dtype = 'bfloat16' halves the memory instead)"
        )


def _bnb_config(quantization: str, dtype: torch.dtype) -> Any:
    check_quantization(quantization)
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _is_quantized(model: nn.Module) -> bool:
    return getattr(model, "hf_quantizer", None) is not None or bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def _is_adapter_param(name: str) -> bool:
    from abmll.bayes.layer import PREFIX

    return name.rpartition(".")[2].startswith(PREFIX)


def cast_base_model(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters of the frozen base model to ``dtype`` in place, leaving the
    adapter's θ (parameters named ``abmll_*``) in float32. Quantised weights and buffers are left as they are.
    A cast is logged (a model loaded in bfloat16 under ``compute.dtype = float32`` doubles its memory)."""
    changed: set[torch.dtype] = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point() and param.dtype != dtype and not _is_adapter_param(name):
                changed.add(param.dtype)
                param.data = param.data.to(dtype)
    if changed:
        logger.warning(
            "cast the base model's weights from %s to %s (compute.dtype)",
            ", ".join(sorted(str(d).removeprefix("torch.") for d in changed)),
            str(dtype).removeprefix("torch."),
        )


def _checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [
        m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    ]


def eval_mode(model: nn.Module) -> nn.Module:
    """``model.train(False)`` (no dropout anywhere), keeping gradient checkpointing of the decoder layers on.

    Hugging Face checkpoints a decoder layer only while that layer's ``training`` flag is set; meta-training
    runs the model in eval mode (the randomness is the weight samples'), so the flag is set on the
    checkpointed decoder layers themselves and on nothing inside them (their attention and dropout modules
    stay in eval mode). The decoder layers of Llama, Qwen2, Mistral and GPT-2 read no ``training`` flag of
    their own."""
    model.train(False)
    for layer in _checkpointing_layers(model):
        layer.training = True
    return model


class _CheckpointWithAdapterState:
    """``torch.utils.checkpoint`` (non-reentrant) for one decoder layer, replaying the backward pass's
    recomputation with the adapter state that the layer's Bayesian LoRA layers had in the forward pass: the
    bound posterior φ, the weight-sample seed and the on/off switch. Without this, a recomputation would read
    whatever :func:`abmll.bayes.posterior` and :func:`abmll.bayes.weight_sample` bind at backward time (a
    later inner step's φ and ε under second-order meta-gradients)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        from abmll.bayes.inject import bayes_layers

        layers = list(bayes_layers(self.module).values())
        forward_state = [(la.posterior, la.noise_seed, la.enabled) for la in layers]

        def replay(*a: Any, **k: Any) -> Any:
            current = [(la.posterior, la.noise_seed, la.enabled) for la in layers]
            try:
                for la, (phi, seed, on) in zip(layers, forward_state, strict=True):
                    la.posterior, la.noise_seed, la.enabled = phi, seed, on
                return function(*a, **k)
            finally:
                for la, (phi, seed, on) in zip(layers, current, strict=True):
                    la.posterior, la.noise_seed, la.enabled = phi, seed, on

        kwargs.setdefault("use_reentrant", False)
        return checkpoint(replay, *args, **kwargs)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Hugging Face gradient (activation) checkpointing of every decoder layer, non-reentrant, with each
    recomputation seeing the same posterior and weight sample as its forward pass. Idempotent; call it before
    or after :func:`abmll.inject`."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(
            f"{type(model).__name__} does not support gradient checkpointing; "
            "set compute.gradient_checkpointing = false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 (gradient_… is its old alias)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers 4
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in model.modules():
        if hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = _CheckpointWithAdapterState(module)
    if not model.training:
        eval_mode(model)  # mark the checkpointed decoder layers (see eval_mode)


def prepare_model(model: nn.Module, compute: Any) -> None:
    """Put ``model`` in the mode of a :class:`abmll.config.ComputeConfig`: base weights in ``compute.dtype``
    (θ stays float32), gradient checkpointing, and a check that a quantised config has a quantised model
    (quantisation happens on load: :func:`load_model` with ``quantization=``). Idempotent."""
    if compute.quantization != "none":
        check_quantization(compute.quantization)
        if not _is_quantized(model):
            raise ModelError(
                f"compute.quantization = {compute.quantization!r} but the model was loaded unquantised; load it "
                f"with abmll.models.load_model(name, quantization={compute.quantization!r}) (abmll train does)"
            )
    else:
        cast_base_model(model, torch_dtype(compute.dtype))
    if compute.gradient_checkpointing:
        enable_gradient_checkpointing(model)
