"""One way to put a method on a model, used by every command: load the model (in the config's compute dtype and
quantisation, on a device), put the scorer on its tokenizer, create the method (injecting its adapter layers),
and load a trained θ into it.

    method = build("smollm2-135m", "abmll", config, checkpoint="runs/prior/final")
    method.model, method.scorer.tokenizer
"""

from __future__ import annotations

import os
from typing import Any

import torch

from abmll.checkpoint import check_fits, load_checkpoint
from abmll.config import ABMLLConfig
from abmll.errors import ConfigError
from abmll.methods import Method, create_method, get_method
from abmll.models import load_model
from abmll.scoring import Scorer


def build(
    model: str | os.PathLike[str] | torch.nn.Module | None,
    method: str,
    config: ABMLLConfig,
    *,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
    checkpoint: str | os.PathLike[str] | dict[str, Any] | None = None,
) -> Method:
    """The method ``method`` with ``config`` on ``model``.

    ``model`` is anything :func:`abmll.models.load_model` takes (None: the embedded default), loaded with
    ``config.compute``'s dtype and quantisation and moved to ``device``; or an already loaded model, passed with
    its ``tokenizer``. ``checkpoint`` (a folder or what :func:`abmll.checkpoint.load_checkpoint` returned) has
    its θ loaded into the method; :class:`~abmll.errors.CheckpointError` names the module where it does not fit.
    """
    cls = get_method(method)
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ConfigError("build(): pass the tokenizer of the loaded model as well")
        if device is not None:
            model.to(device)
    else:
        if tokenizer is not None:
            raise ConfigError("build(): a tokenizer is only passed together with an already loaded model")
        compute = config.compute
        model, tokenizer = load_model(model, dtype=compute.dtype, quantization=compute.quantization, device=device)
        if device is not None and compute.quantization == "none":  # quantised weights are placed on load
            model.to(device)
    built = create_method(method, model, Scorer(tokenizer, config.scoring), config)
    if checkpoint is not None and cls.adapted:
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        source = str(checkpoint) if not isinstance(checkpoint, dict) else "checkpoint"
        check_fits(ckpt["theta"], built.state_dict(), source)
        built.load_state_dict(ckpt["theta"])
    return built
