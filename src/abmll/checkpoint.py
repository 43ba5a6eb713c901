"""Checkpoints: safetensors for tensors, JSON for everything else; loading never executes code.

A checkpoint folder holds
    adapter_config.json        the ABMLLConfig, the method, the adapted modules and their shapes, versions
    prior.safetensors          θ, keyed "{module}.{factor}"
    trainer_state.safetensors  optimiser tensors (and RNG state), when saved for resuming
    trainer_state.json         step, optimiser hyperparameters, sampler position
    manifest.json              SHA-256 of every other file, written last

Folders are written beside their final place and renamed into it, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from abmll.config import ABMLLConfig
from abmll.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
PRIOR_FILE = "prior.safetensors"
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_JSON = "trainer_state.json"
MANIFEST = "manifest.json"


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that produced a result."""
    out = {"python": platform.python_version()}
    for pkg in ("abmll", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path``, fsync, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, allow_nan=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- optimiser state as tensors + JSON ---------------------------------------------------------------
def optimizer_to_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """Split an optimiser's state into tensors keyed by parameter name and JSON-serialisable values."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{names[index]}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(names[index], {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor], values: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(names):
        entry = {
            k[len(f"optimizer.{name}.") :]: v
            for k, v in tensors.items()
            if k.startswith(f"optimizer.{name}.")
        }
        entry.update(values.get("scalars", {}).get(name, {}))
        if entry:
            state[index] = entry
    optimizer.load_state_dict({"state": state, "param_groups": values["param_groups"]})


# --- save / load -------------------------------------------------------------------------------------
def save_checkpoint(
    directory: str | Path,
    theta: dict[str, torch.Tensor],
    config: ABMLLConfig,
    info: dict[str, Any],
    trainer_tensors: dict[str, torch.Tensor] | None = None,
    trainer_values: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (temporary folder, fsync, rename); returns its path.

    ``info`` records at least ``method`` and ``model``; the adapted modules and shapes are added here.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        modules: dict[str, dict[str, list[int]]] = {}
        for key, tensor in theta.items():
            module, _, factor = key.rpartition(".")
            modules.setdefault(module, {})[factor] = list(tensor.shape)
        meta = {"config": config.to_dict(), "modules": modules, "versions": versions(), **info}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in theta.items()}, str(tmp / PRIOR_FILE))
        if trainer_values is not None:
            save_file(dict(trainer_tensors or {}), str(tmp / TRAINER_TENSORS))
            (tmp / TRAINER_JSON).write_text(json.dumps(trainer_values, indent=2) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"files": {name: sha256(tmp / name) for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for name in files + [MANIFEST]:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
            os.replace(directory, old / "x")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def verify_checkpoint(directory: str | Path) -> None:
    """Raise :class:`CheckpointError` unless every file listed in the manifest has its recorded SHA-256."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: not a complete abmll checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: file {name} listed in the manifest is missing")
        if sha256(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (the file is truncated or altered)")


def load_checkpoint(directory: str | Path, trainer: bool = False) -> dict[str, Any]:
    """Read a verified checkpoint: ``{"theta", "config", "info", "trainer_tensors", "trainer_values"}``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist or is not a folder")
    verify_checkpoint(directory)
    try:
        info = json.loads((directory / ADAPTER_CONFIG).read_text())
        config = ABMLLConfig.from_dict(info.pop("config"), source=str(directory / ADAPTER_CONFIG))
        theta = load_file(str(directory / PRIOR_FILE))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a checkpoint that passed its checksum but does not parse
        raise CheckpointError(f"{directory}: could not be read ({exc})") from None
    out: dict[str, Any] = {"theta": theta, "config": config, "info": info}
    if trainer:
        if not (directory / TRAINER_JSON).is_file():
            raise CheckpointError(f"{directory}: holds no trainer state to resume from")
        out["trainer_tensors"] = load_file(str(directory / TRAINER_TENSORS))
        out["trainer_values"] = json.loads((directory / TRAINER_JSON).read_text())
    return out


def check_fits(theta: dict[str, torch.Tensor], model_theta: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming the first module whose factors are missing or misshapen."""
    modules_ckpt = {k.rpartition(".")[0] for k in theta}
    modules_model = {k.rpartition(".")[0] for k in model_theta}
    for module in sorted(modules_ckpt - modules_model):
        raise CheckpointError(f"{source}: module '{module}' of the checkpoint is not adapted in the model")
    for module in sorted(modules_model - modules_ckpt):
        raise CheckpointError(f"{source}: module '{module}' of the model has no factors in the checkpoint")
    for key, tensor in model_theta.items():
        if key not in theta:
            raise CheckpointError(f"{source}: factor '{key}' is missing from the checkpoint")
        if tuple(theta[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: module '{key.rpartition('.')[0]}' factor '{key.rpartition('.')[2]}' has shape "
                f"{tuple(theta[key].shape)} in the checkpoint but {tuple(tensor.shape)} in the model"
            )


def load_prior_into(model: torch.nn.Module, directory: str | Path) -> dict[str, Any]:
    """Copy a checkpoint's θ into a model that already has Bayesian LoRA layers; returns the checkpoint.

    Fails with :class:`CheckpointError` naming the module when the adapted modules or shapes differ.
    """
    from abmll.bayes.inject import prior

    ckpt = load_checkpoint(directory)
    model_theta = prior(model)
    check_fits(ckpt["theta"], model_theta, str(directory))
    with torch.no_grad():
        for key, param in model_theta.items():
            param.copy_(ckpt["theta"][key])
    return ckpt
