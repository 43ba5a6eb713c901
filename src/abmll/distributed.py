"""Running one meta-training job on several processes (ranks), e.g. one per GPU.

``abmll train`` is launched unchanged by ``accelerate launch`` or ``torchrun``; :func:`setup` lets Hugging Face
Accelerate (:class:`accelerate.PartialState`) read the launcher's environment, initialise the process group
(NCCL on GPUs, gloo on CPUs) and pick this rank's device. Without a launcher it does nothing and the run is a
single process, exactly as before.

What is distributed is the meta-batch: rank r of W takes tasks r, r + W, r + 2W, … of each meta-batch,
backpropagates their share of the outer loss, and θ's gradients are summed across ranks with an all-reduce
(:func:`all_reduce_sum`), so every rank takes the same optimiser step and holds the same θ. The frozen base
model is replicated on every rank, or sharded across them with FSDP2 (:func:`shard_model`, when the launcher
asks for FSDP); θ is always replicated. Every weight sample ε comes from a seed derived
from (seed, meta-step, task index, inner step, sample), never from a rank or a global RNG, so a run gives the
same θ on any number of ranks, up to float rounding of the gradient sum (done in float64, see
:mod:`abmll.methods.abmll`).

Only rank 0 (:func:`is_main_process`) writes the run's files (config, log, checkpoints, final θ).
The library functions here read ``torch.distributed`` directly, so a process group initialised any other
way (a notebook's own ``init_process_group``) works too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "all_reduce_sum",
    "barrier",
    "broadcast_from_main",
    "check_fsdp_settings",
    "fsdp_requested",
    "is_main_process",
    "is_sharded",
    "launched",
    "launcher_dtype",
    "max_over_processes",
    "setup",
    "shard_model",
    "world",
]

#: Environment variables set by torchrun, ``accelerate launch`` and MPI launchers for a multi-process job.
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def world() -> tuple[int, int]:
    """(rank, world size): ``(0, 1)`` unless ``torch.distributed`` is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run): the one process that writes files."""
    return world()[0] == 0


def launched() -> bool:
    """True when a multi-process launcher started this process: torchrun and ``accelerate launch`` (with
    several processes) set ``LOCAL_RANK``; MPI launchers set a world size."""
    if int(os.environ.get("LOCAL_RANK", "-1")) != -1:
        return True
    return any(int(os.environ.get(v, "1") or "1") > 1 for v in _WORLD_VARS)


def setup(device: str = "auto") -> torch.device:
    """Initialise the process group through Accelerate when launched as one of several processes, and return
    the device this rank should use.

    ``device`` is ``"auto"`` (this rank's GPU when CUDA is available, else the CPU), ``"cpu"`` or ``"cuda"``
    (this rank's GPU). Without a launcher: ``auto`` → ``cuda`` or ``cpu``, anything else as given.
    Safe to call more than once.
    """
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        use_cpu = True
    if not launched():
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(device)
    from accelerate import PartialState

    # cpu=True makes Accelerate use gloo (MULTI_CPU) where it would otherwise find no GPU backend and fall
    # back silently to a single process.
    state = PartialState(cpu=use_cpu)
    if not (dist.is_available() and dist.is_initialized()) and state.num_processes > 1:  # pragma: no cover
        raise RuntimeError("Accelerate reported several processes but torch.distributed is not initialised")
    if device.startswith("cuda:"):
        return torch.device(device)
    return state.device


def launcher_dtype() -> str | None:
    """``"bfloat16"`` or ``"float16"`` when ``accelerate launch`` runs with ``mixed_precision: bf16`` or ``fp16``
    (it sets ``ACCELERATE_MIXED_PRECISION``), else None. ``abmll train`` uses it as ``compute.dtype`` when the
    command line does not set that field and the config leaves it at float32."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower())


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor across ranks in place (a no-op in a single process)."""
    if world()[1] > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's value (a no-op in a single process)."""
    if world()[1] > 1:
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()



def _collective_device() -> torch.device:
    """Where a small tensor must live for a collective of the default group (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")



def max_over_processes(value: int) -> int:
    """The largest of ``value`` over all ranks; every rank gets it. A collective: every rank must call it at
    the same point. In a single process: ``value``."""
    if world()[1] == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# --- FSDP: sharding the frozen base model ----------------------------------------------------------
def fsdp_requested() -> bool:
    """True when the launcher asks for FSDP (``accelerate launch`` with ``distributed_type: FSDP`` sets
    ``ACCELERATE_USE_FSDP=true``; set it yourself under torchrun)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def check_fsdp_settings() -> None:
    """Reject the FSDP settings abmll does not support, before the model is loaded."""
    from abmll.errors import ConfigError

    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("1", "true", "yes"):
        raise ConfigError(
            "fsdp_cpu_ram_efficient_loading is true in the Accelerate config: abmll loads the model on every rank "
            "before sharding it, so set fsdp_cpu_ram_efficient_loading: false (examples/accelerate/fsdp.yaml)"
        )
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in ("1", "true", "yes"):
        raise ConfigError("fsdp_offload_params is not supported by abmll; set fsdp_offload_params: false")


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter of ``model`` is an FSDP shard (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model: nn.Module, replicated: Iterable[nn.Parameter], device: torch.device) -> None:
    """Shard the frozen base model across all ranks with PyTorch FSDP2 (``fully_shard``): each decoder layer
    is one unit, the decoder (embeddings, final norm) another. The parameters in ``replicated`` (θ) are left
    out of FSDP: every rank keeps all of θ and its gradient is summed by :func:`all_reduce_sum`, as without
    FSDP. Parameters and buffers FSDP does not manage (θ, an untied LM head) are moved to ``device``.

    ``FSDP_RESHARD_AFTER_FORWARD`` (written by ``accelerate config``) is honoured; the other FSDP settings of
    an Accelerate config file are not read: the wrapping is always per decoder layer and the base weights
    keep the dtype they were loaded in (``compute.dtype``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    world_size = world()[1]
    if world_size == 1:
        return
    ignored = set(replicated)
    mesh = init_device_mesh(device.type, (world_size,))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("0", "false", "no")
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers FSDP could shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, ignored_params=ignored)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    fully_shard(decoder, mesh=mesh, reshard_after_forward=reshard, ignored_params=ignored)
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not isinstance(tensor, DTensor) and tensor.device != device:
                tensor.data = tensor.data.to(device)
