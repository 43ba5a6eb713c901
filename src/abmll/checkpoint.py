"""Checkpoints: safetensors for tensors, JSON for everything else; loading never executes code.

A checkpoint folder holds
    abmll_config.json          the ABMLLConfig, the method, the adapted modules and their shapes, versions
                               (``adapter_config.json`` in checkpoints of schema version 1, still read)
    prior.safetensors          θ, keyed "{module}.{factor}"
    trainer_state.safetensors  optimiser tensors and RNG states (torch, CUDA), when saved for resuming
    trainer_state.json         step, optimiser hyperparameters, sampler position, RNG states (python, numpy)
    manifest.json              ``schema_version`` and the SHA-256 of every other file, written last

Folders are written beside their final place (every file and the folder fsynced) and renamed into it, so a
reader never sees half a checkpoint; a checkpoint whose files do not match the manifest is refused. Nothing
here unpickles: tensors are read with safetensors, everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from abmll.config import ABMLLConfig
from abmll.errors import CheckpointError

#: The checkpoint's own config file (not PEFT's ``adapter_config.json``, so PEFT never mistakes it for an adapter).
CONFIG_FILE = "abmll_config.json"
#: Its name in checkpoints of schema version 1 (read, never written).
LEGACY_CONFIG_FILE = "adapter_config.json"
#: Version of the checkpoint layout, recorded in the manifest; a manifest without one is version 1.
CHECKPOINT_SCHEMA_VERSION = 2
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


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries) to disk; a no-op for folders where the
    platform cannot open them (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    except OSError:
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync, rename it into place, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_atomic(path: Path, data: Any, indent: int | None = 2) -> None:
    """Write JSON to a temporary file beside ``path``, fsync, then rename it into place (``indent`` None: one line,
    for a large record)."""
    write_text_atomic(path, json.dumps(data, indent=indent, allow_nan=True) + "\n")


def read_json_object(path: Path, error: type[Exception], expected: str = "a JSON object") -> dict[str, Any]:
    """A JSON file that must hold an object; an unreadable file, invalid JSON or another JSON type raises
    ``error`` naming the file (each caller its own error class: config, data or checkpoint)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{path}: invalid JSON ({exc})") from None
    except OSError as exc:
        raise error(f"{path}: could not be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected {expected}, got {type(data).__name__}")
    return data


# --- RNG states as tensors + JSON --------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNG states of torch (CPU and every initialised CUDA device), numpy and Python's
    ``random``, split into tensors and JSON-serialisable values (restored by :func:`set_rng_state`)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    values = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return tensors, values


def set_rng_state(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    """Restore the RNG states saved by :func:`rng_state` (CUDA states only where those devices exist)."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np_values = values["numpy"]
    np.random.set_state(
        (
            np_values["kind"],
            tensors["rng.numpy"].numpy().astype(np.uint32),
            np_values["pos"],
            np_values["has_gauss"],
            np_values["cached_gaussian"],
        )
    )
    py = values["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


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
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in theta.items()}, str(tmp / PRIOR_FILE))
        if trainer_values is not None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in (trainer_tensors or {}).items()},
                str(tmp / TRAINER_TENSORS),
            )
            (tmp / TRAINER_JSON).write_text(json.dumps(trainer_values, indent=2) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"schema_version": CHECKPOINT_SCHEMA_VERSION, "files": {name: sha256(tmp / name) for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for name in files + [MANIFEST]:
            fsync_path(tmp / name)
        fsync_path(tmp)
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
            os.replace(directory, old / "x")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        fsync_path(directory.parent)
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
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
            raise TypeError("'files' is not a mapping of file names to SHA-256 digests")
        version = manifest.get("schema_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise TypeError(f"'schema_version' is {version!r}, expected an integer ≥ 1")
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if version > CHECKPOINT_SCHEMA_VERSION:
        raise CheckpointError(
            f"{manifest_path}: checkpoint schema_version {version} is newer than this abmll reads "
            f"({CHECKPOINT_SCHEMA_VERSION}); upgrade abmll to load it"
        )
    # Every file that is read must be covered by the manifest.
    read = {config_file(directory), PRIOR_FILE}
    read |= {n for n in (TRAINER_TENSORS, TRAINER_JSON) if (directory / n).exists()}
    for name in sorted(read - set(files)):
        raise CheckpointError(f"{directory}: file {name} is not listed in the manifest (added or altered)")
    for name, digest in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{manifest_path}: invalid file name {name!r} in the manifest")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: file {name} listed in the manifest is missing")
        if sha256(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (the file is truncated or altered)")


def config_file(directory: str | Path) -> str:
    """Name of a checkpoint's config file: ``abmll_config.json``, or ``adapter_config.json`` in a checkpoint
    of schema version 1 (which has no ``abmll_config.json``)."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() and (directory / LEGACY_CONFIG_FILE).is_file():
        return LEGACY_CONFIG_FILE
    return CONFIG_FILE


def load_checkpoint(directory: str | Path, trainer: bool = False) -> dict[str, Any]:
    """Read a verified checkpoint: ``{"theta", "config", "info", "trainer_tensors", "trainer_values"}``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist or is not a folder")
    verify_checkpoint(directory)
    if trainer and not (directory / TRAINER_JSON).is_file():
        raise CheckpointError(f"{directory}: holds no trainer state to resume from")
    name = config_file(directory)
    try:
        info = json.loads((directory / name).read_text(encoding="utf-8"))
        config = ABMLLConfig.from_dict(info.pop("config"), source=str(directory / name))
        theta = with_sigma_scale(load_file(str(directory / PRIOR_FILE)))
        out: dict[str, Any] = {"theta": theta, "config": config, "info": info}
        if trainer:
            out["trainer_tensors"] = load_file(str(directory / TRAINER_TENSORS))
            out["trainer_values"] = json.loads((directory / TRAINER_JSON).read_text(encoding="utf-8"))
            if not isinstance(out["trainer_values"], dict):
                raise TypeError(f"{TRAINER_JSON} is not a JSON object")
    except Exception as exc:  # noqa: BLE001 - a checkpoint that passed its checksum but does not parse
        raise CheckpointError(f"{directory}: could not be read ({type(exc).__name__}: {exc})") from None
    return out


def with_sigma_scale(theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ with a zero log-scale λ (``sigma_scale``) for every Bayesian layer that has none: checkpoints written
    before λ existed had σ = g(B_σ A_σ + o) + c, which is eq. 2 with λ = 0."""
    out = dict(theta)
    for key, tensor in theta.items():
        module, _, factor = key.rpartition(".")
        if factor == "sigma_A" and f"{module}.sigma_scale" not in theta:
            out[f"{module}.sigma_scale"] = torch.zeros((), dtype=tensor.dtype)
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
