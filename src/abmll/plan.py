"""Plan a run before loading any weights: parameter counts and the estimated memory of an ABMLL meta-step for a
model, from its config alone (``abmll plan``).

The model's module tree is built on the ``meta`` device (``AutoModelForCausalLM.from_config`` under
``torch.device("meta")``: shapes, no storage), the Bayesian LoRA layers are injected exactly as
:func:`abmll.inject` does, and the parameter counts are read off it: they are exact. Memory is split into

- **persistent** parts, exact: the base weights (and buffers) in the model's dtype; θ (the four factor pairs and
  the log-scale λ of every adapted layer, always float32); θ's gradient; AdamW's two moments of θ;
- **transient** parts, held only during a meta-step, found by *simulating* one meta-step on the meta device
  with :class:`LiveBytes` (a dispatch mode that adds up every storage an operator creates and subtracts it
  when the storage is freed, as the allocator would): the forward and backward of one micro-batch (the
  activations autograd keeps, plus the dense weight sample ΔW = μ + σ ⊙ ε of every adapted layer, which the
  backward pass needs), the KL term (the dense μ and σ of φ and θ: one adapted layer's at a time where
  :func:`abmll.objectives.kl_divergence` differentiates layer by layer), and the posterior copies φ.

The simulated step mirrors :meth:`abmll.methods.abmll.ABMLL.meta_step` (first order by default): a float64 sum for
θ's gradient, φ⁰ = θ, inner steps (one weight sample each, NLL then β·KL gradients, the SGD update of φ), the
straight-through φᴷ, the outer NLL and β·KL backward into θ.grad, the gradient sum, one AdamW step. Each forward
pass runs the decoder on ``batch`` sequences of ``seq_len`` tokens and the LM head at ``read_tokens`` positions per
sequence, as the option scorer's plain path does (``scoring.shared_prefix = false``: one whole sequence per option);
the default shared-prefix path encodes each prompt once and needs less, so for it the plan is an upper bound (both
are checked against measured meta-steps); attention runs through the fused kernel's memory footprint (what CPU flash
and CUDA flash or memory-efficient attention keep), or the math backend under second-order gradients, as in a real
run. With first-order gradients nothing is kept from one inner step to the next, so the memory does not depend on
the number of inner steps K or weight samples S (they cost time only); with ``second_order`` the graph of all K·S
inner passes is kept. Allocator overheads (CUDA's caching allocator, fragmentation) are not modelled: on a GPU leave
some headroom. ``tests/test_plan.py`` checks the estimate against the allocations of a real meta-step
(``torch.profiler`` with ``profile_memory``) on the tiny test model and on SmolLM2-135M. """

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import weakref
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from abmll.config import GRADIENT_ORDERS, BayesLoRAConfig
from abmll.errors import ConfigError, ModelError

__all__ = [
    "SHIPPED_CONFIGS",
    "LiveBytes",
    "Plan",
    "format_bytes",
    "load_config",
    "measure_peak",
    "meta_model",
    "plan",
    "plan_table",
]

#: Model configs (config.json only, no weights) that ship with the package, by name.
SHIPPED_CONFIGS = {"llama3-8b": "Meta-Llama-3-8B", "qwen2-7b": "Qwen2-7B"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MIB = 2**20


# --- the config ------------------------------------------------------------------------------------------
def _shipped(name: str) -> Path:
    return Path(str(resources.files("abmll") / "data" / "models" / name / "config.json"))


def load_config(model: Any) -> tuple[Any, str]:
    """A ``transformers`` config and a label for it, from one of: a config object; a shipped name
    (``llama3-8b``, ``qwen2-7b``); ``smollm2-135m`` (the embedded default; fetched on first use); a
    ``config.json`` file or any JSON file with a ``model_type``; a local folder with ``config.json``; a
    Hugging Face Hub id (needs the Hub). Raises :class:`ModelError` naming what was tried."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model, type(model).__name__
    name = os.fspath(model)
    from abmll.models import _DEFAULT_ALIASES, DEFAULT_MODEL

    if name.lower() in SHIPPED_CONFIGS:
        path = _shipped(name.lower())
        return AutoConfig.from_pretrained(path.parent), f"{name.lower()} (shipped config.json)"
    if name.lower() in _DEFAULT_ALIASES:
        from abmll.assets import smollm2_folder

        return AutoConfig.from_pretrained(smollm2_folder()), DEFAULT_MODEL
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"cannot plan for {name!r}: the folder {path} has no config.json")
            return AutoConfig.from_pretrained(path), str(path)
        if path.is_file():
            if path.suffix.lower() != ".json":
                raise ModelError(
                    f"cannot plan for {name!r}: expected a config.json file, a folder with one, a shipped name "
                    f"({', '.join(SHIPPED_CONFIGS)}) or a Hub id"
                )
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or "model_type" not in data:
                raise ModelError(f"cannot plan for {name!r}: {path} has no 'model_type' field")
            data = dict(data)
            return AutoConfig.for_model(data.pop("model_type"), **data), str(path)
        from abmll.models import _looks_like_path

        if _looks_like_path(name):
            raise ModelError(f"cannot plan for {name!r}: no such file or folder")
        return AutoConfig.from_pretrained(name), f"Hub id {name}"
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"cannot read a model config from {name!r} (a shipped name: {', '.join(SHIPPED_CONFIGS)}; a "
            f"config.json file; a folder with one; or a Hub id, which needs the Hub): {type(exc).__name__}: {exc}"
        ) from exc


def meta_model(config: Any, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM of ``config`` on the ``meta`` device: every module and shape, no weights."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:
        raise ModelError(
            f"cannot build a causal LM from the config ({type(config).__name__}): {type(exc).__name__}: {exc}"
        ) from exc
    return model.eval()


# --- counting live bytes on the meta device --------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Inside ``with LiveBytes() as live:``, the bytes of every storage created by an operator are added to
    ``live.now`` and subtracted when the storage is freed; ``live.peak`` is the highest value reached.

    Works on ``meta`` tensors (and real ones): views and in-place results, whose storage is an input's, are
    not counted again; storages created before the block are never counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._refs:
                continue
            size = storage.nbytes()
            self._refs[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
            self.now += size
            self.peak = max(self.peak, self.now)
        return out

    def _free(self, key: int, size: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.now -= size

    def reset_peak(self) -> None:
        self.peak = self.now


def measure_peak(fn) -> int:
    """Run ``fn()`` on real tensors and return the peak of the bytes it allocated through torch's CPU allocator
    and had not yet freed (above what was allocated before the call), from the allocation events that
    ``torch.profiler`` records with ``profile_memory=True``. Deterministic: it counts allocations, so neither
    the load of the machine nor the C library's allocator changes it; memory that torch does not allocate
    (the Python objects, library buffers) is not in it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    now = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events):
        now += nbytes
        peak = max(peak, now)
    return peak


# --- the simulated meta-step ----------------------------------------------------------------------------
def _nll(model: torch.nn.Module, batch: int, seq_len: int, read_tokens: int) -> torch.Tensor:
    """What ``Scorer.nll`` computes, with shapes only: the decoder on ``batch`` sequences, the LM head at
    ``read_tokens`` positions of each, token log-probs summed per sequence, cross-entropy over the options."""
    dev = next(model.parameters()).device
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=dev)
    position_ids = torch.zeros(batch, seq_len, dtype=torch.long, device=dev)
    mask = torch.ones(batch, 1, seq_len, seq_len, dtype=torch.bool, device=dev)  # the 4-D padding+causal mask
    hidden = model.get_decoder()(
        input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    n_read = batch * read_tokens
    read = torch.zeros(n_read, dtype=torch.long, device=dev)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, read)
    logits = model.get_output_embeddings()(hidden).float()
    token_lp = torch.log_softmax(logits, dim=-1).gather(-1, read[:, None])
    per_row = torch.zeros(batch, device=dev).index_add(0, read, token_lp[:, 0])
    return torch.nn.functional.cross_entropy(per_row[None, :], torch.zeros(1, dtype=torch.long, device=dev))


@contextlib.contextmanager
def _fused_attention():
    """On the meta device SDPA would pick its math backend, which keeps the [L, L] attention probabilities of
    every head for the backward pass; real runs (CPU flash attention, CUDA flash or memory-efficient attention)
    keep q, k, v, the output and a log-sum-exp. Route ``F.scaled_dot_product_attention`` to the CPU flash kernel,
    whose meta implementation keeps what the fused kernels keep."""
    original = torch.nn.functional.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # what SDPA does before a fused kernel
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                attn_mask.logical_not(), float("-inf")
            )
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )[0]

    torch.nn.functional.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _attention(order: str):
    """The attention kernel of a real run: fused, or math for second-order meta-gradients (which ABMLL forces
    there: the fused kernels have no double backward)."""
    if order == "second_order":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return _fused_attention()


def _sum(total: list, grads) -> list:
    return [t if g is None else (g if t is None else t + g) for t, g in zip(total, grads, strict=True)]


@dataclass
class _Shape:
    batch: int
    seq_len: int
    read_tokens: int
    inner_steps: int
    samples: int
    order: str
    beta: float = 1e-6


def _simulate(model, theta: dict, layers: dict, shape: _Shape, live: LiveBytes) -> dict[str, int]:
    """Run one meta-step's memory-relevant operations on the meta device; the transient peaks (bytes above
    the base weights, θ, θ.grad and AdamW's state) of its phases."""
    from abmll import objectives
    from abmll.bayes.inject import clone_factors, posterior, weight_sample
    from abmll.inner import sgd_step, straight_through
    from abmll.objectives import kl_divergence

    # The KL differentiated layer by layer (objectives.LayerwiseGrad), or summed over layers first (older code).
    layerwise = "grad" in inspect.signature(kl_divergence).parameters
    LayerwiseGrad = getattr(objectives, "LayerwiseGrad", None)  # noqa: N806 - a class
    second = shape.order == "second_order"
    lr = 0.1  # any value: the update allocates lr·g, then φ − lr·g
    peaks: dict[str, int] = {}
    params = list(theta.values())
    start = live.now

    def phase(name: str) -> None:
        peaks[name] = max(peaks.get(name, 0), live.peak - start)
        live.reset_peak()

    with _attention(shape.order):
        # meta_step: each task's gradient of θ is computed from None and added to a float64 sum.
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for p in params:
            p.grad = None
        live.reset_peak()
        phi = dict(theta) if second else clone_factors(theta)
        prior_side = theta if second else {k: v.detach() for k, v in theta.items()}
        # First order: every inner step costs the same memory and nothing is kept between them: one is enough.
        steps = shape.inner_steps if second else min(shape.inner_steps, 1)
        for _ in range(steps):
            grads: list = [None] * len(params)
            with posterior(model, phi):
                for s in range(shape.samples if second else 1):
                    with weight_sample(model, s):
                        loss = _nll(model, shape.batch, shape.seq_len, shape.read_tokens)
                        grads = _sum(grads, torch.autograd.grad(loss, list(phi.values()), create_graph=second,
                                                                allow_unused=True))
                        del loss
            phase("inner_nll")
            if shape.beta > 0:
                if layerwise:  # each layer's KL differentiated as soon as it is computed
                    kl_grad = LayerwiseGrad(list(phi.values()), shape.beta, create_graph=second)
                    kl_divergence(phi, prior_side, layers, kl_grad)
                    grads = _sum(grads, kl_grad.grads)
                    del kl_grad
                else:
                    kl = shape.beta * kl_divergence(phi, prior_side, layers)
                    grads = _sum(
                        grads, torch.autograd.grad(kl, list(phi.values()), create_graph=second, allow_unused=True)
                    )
                    del kl
                phase("inner_kl")
            phi = sgd_step(phi, grads, lr, second)
            del grads
            phase("inner_update")
        if not second:
            phi = straight_through(phi, theta)
        with posterior(model, phi), weight_sample(model, 0):
            loss = _nll(model, shape.batch, shape.seq_len, shape.read_tokens)
            loss.backward(retain_graph=second)
            del loss
        phase("outer_nll")
        if shape.beta > 0:
            if layerwise:  # φᴷ enters as a detached copy; its gradient goes through φᴷ's graph once at the end
                phi_in = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
                kl_grad = LayerwiseGrad([*phi_in.values(), *params], shape.beta)
                kl_divergence(phi_in, theta, layers, kl_grad)
                kl_grad.backward([*phi.values(), *params])
                del kl_grad, phi_in
            else:
                kl = shape.beta * kl_divergence(phi, theta, layers)
                kl.backward()
                del kl
            phase("outer_kl")
        del phi
        for acc, p in zip(total, params, strict=True):
            if p.grad is not None:
                acc.add_(p.grad)
        for acc, p in zip(total, params, strict=True):
            p.grad = acc.to(p.dtype)
        del total
        phase("gradient_sum")
    return peaks


def _noise_shapes_only(layers: dict) -> None:
    """On the meta device a layer cannot seed a generator: draw ε as an empty tensor of the same shape."""
    for layer in layers.values():
        layer.noise = (
            lambda seed, device, layer=layer: torch.empty(layer.out_features, layer.in_features, device=device)
        )


# --- the plan -------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Parameter counts (exact) and memory (bytes; estimated) of a first-order ABMLL meta-step."""

    model: str
    architecture: str
    dtype: str
    gradient_checkpointing: bool
    rank: int
    targets: list[str] | str
    batch: int
    seq_len: int
    read_tokens: int
    inner_steps: int
    samples: int
    order: str
    base_params: int
    adapter_params: int
    target_modules: int
    target_shapes: dict[str, int]
    #: Bytes by component: base_weights, theta, theta_grad, optimizer, posterior, activations, sampled_delta_w,
    #: kl (the working set of the KL term).
    memory: dict[str, int]
    #: Simulated transient peaks (bytes above the persistent parts) of the phases of a meta-step.
    phases: dict[str, int]
    #: Persistent parts + the highest transient phase: the estimated peak of a meta-step.
    peak: int
    notes: list[str] = field(default_factory=list)

    @property
    def persistent(self) -> int:
        m = self.memory
        return m["base_weights"] + m["theta"] + m["theta_grad"] + m["optimizer"]

    @property
    def step_rise(self) -> int:
        """The estimated peak above the base weights, θ and AdamW's state: what a first meta-step adds."""
        return self.peak - self.memory["base_weights"] - self.memory["theta"] - self.memory["optimizer"]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["persistent"] = self.persistent
        out["step_rise"] = self.step_rise
        return out


def _param_bytes(model: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def plan(
    model: Any,
    rank: int = 8,
    targets: list[str] | str | None = None,
    batch: int = 32,
    seq_len: int = 128,
    read_tokens: int = 4,
    inner_steps: int = 5,
    samples: int = 1,
    order: str = "first_order",
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    beta: float = 1e-6,
) -> Plan:
    """Count the parameters and estimate the memory of an ABMLL meta-step for ``model`` (anything
    :func:`load_config` takes), with Bayesian LoRA of ``rank`` on ``targets`` (default ``q_proj, v_proj``),
    forward passes of ``batch`` sequences of ``seq_len`` tokens with the LM head at ``read_tokens`` positions
    of each, ``inner_steps`` inner steps of ``samples`` weight samples, base weights and activations in
    ``dtype`` (``compute.dtype``), optionally with ``gradient_checkpointing`` of every decoder layer."""
    from abmll.bayes.inject import bayes_layers, inject, prior

    for name, value, low in (
        ("batch", batch, 1), ("seq_len", seq_len, 1), ("read_tokens", read_tokens, 1),
        ("inner_steps", inner_steps, 0), ("samples", samples, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"plan: {name} = {value!r} is invalid: expected an integer ≥ {low}")
    if read_tokens > seq_len:
        raise ConfigError(f"plan: read_tokens = {read_tokens} is invalid: expected at most seq_len ({seq_len})")
    if order not in GRADIENT_ORDERS:
        raise ConfigError(f"plan: order = {order!r} is invalid: expected one of {GRADIENT_ORDERS}")
    if dtype not in DTYPES:
        raise ConfigError(f"plan: dtype = {dtype!r} is invalid: expected one of {sorted(DTYPES)}")
    lora = BayesLoRAConfig(rank=rank, **({} if targets is None else {"targets": targets}))
    config, label = load_config(model)
    mdl = meta_model(config, DTYPES[dtype])
    base_params = sum(p.numel() for p in mdl.parameters())
    base_bytes = _param_bytes(mdl)
    inject(mdl, lora)
    if gradient_checkpointing:
        from abmll.models import enable_gradient_checkpointing, eval_mode

        enable_gradient_checkpointing(mdl)
        eval_mode(mdl)
    layers = bayes_layers(mdl)
    theta = prior(mdl)
    n_theta = sum(p.numel() for p in theta.values())
    theta_bytes = sum(p.numel() * p.element_size() for p in theta.values())
    shapes: dict[str, int] = {}
    for layer in layers.values():
        key = f"{layer.out_features}x{layer.in_features}"
        shapes[key] = shapes.get(key, 0) + 1
    _noise_shapes_only(layers)

    shape = _Shape(batch, seq_len, read_tokens, inner_steps, samples, order, beta)
    # AdamW's state exists from the second meta-step on: allocate it outside the count (it is persistent).
    optimizer = torch.optim.AdamW(list(theta.values()))
    for p in theta.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    opt_bytes = sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.device.type == "meta"
    )
    with LiveBytes() as live:
        phases = _simulate(mdl, theta, layers, shape, live)
        start = live.now
        optimizer.step()
        phases["optimizer_step"] = live.peak - start

    # Components: activations and the sampled ΔW of one forward + backward pass, the KL's working set.
    from abmll.bayes.inject import clone_factors, posterior, weight_sample

    phi = clone_factors(theta)
    passes = {}
    for name, seed in (("mean", None), ("sample", 0)):
        with _attention(order), LiveBytes() as live, posterior(mdl, phi), weight_sample(mdl, seed):
            loss = _nll(mdl, batch, seq_len, read_tokens)
            torch.autograd.grad(loss, list(phi.values()), allow_unused=True)
            del loss
        passes[name] = live.peak
    del phi
    posterior_bytes = 3 * theta_bytes  # φ, its gradient, and the next φ during an inner update
    memory = {
        "base_weights": base_bytes,
        "theta": theta_bytes,
        "theta_grad": theta_bytes,
        "optimizer": opt_bytes,
        "posterior": posterior_bytes,
        "activations": passes["mean"],
        "sampled_delta_w": max(passes["sample"] - passes["mean"], 0),
        "kl": max(phases.get("inner_kl", 0), phases.get("outer_kl", 0)),
    }
    persistent = base_bytes + theta_bytes * 2 + opt_bytes
    peak = persistent + max(phases.values())
    notes = []
    if order == "first_order":
        notes.append(
            "first-order gradients: nothing is kept between inner steps, so memory does not depend on the "
            f"number of inner steps ({inner_steps}) or weight samples ({samples}); they cost time only"
        )
    else:
        notes.append(
            f"second-order gradients: the graphs of all {inner_steps}×{samples} inner passes are kept (one "
            "micro-batch per inner step assumed; each more micro-batch adds its graph)"
        )
    notes.append(
        "allocator overheads (CUDA's caching allocator, fragmentation) are not modelled: leave some headroom"
    )
    return Plan(
        model=label,
        architecture=type(mdl).__name__,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        rank=rank,
        targets=lora.targets,
        batch=batch,
        seq_len=seq_len,
        read_tokens=read_tokens,
        inner_steps=inner_steps,
        samples=samples,
        order=order,
        base_params=base_params,
        adapter_params=n_theta,
        target_modules=len(layers),
        target_shapes=shapes,
        memory=memory,
        phases=phases,
        peak=peak,
        notes=notes,
    )


# --- output ---------------------------------------------------------------------------------------------
def format_bytes(n: int) -> str:
    """``1536`` → ``"1.5 KiB"``; binary units, three significant digits."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


_COMPONENTS = (
    ("base_weights", "base weights", "always", "the frozen model's weights and buffers"),
    ("theta", "θ (prior)", "always", "four factor pairs and a log-scale per adapted layer, float32"),
    ("theta_grad", "θ gradient", "always", "float32"),
    ("optimizer", "optimiser state", "always", "AdamW's two moments of θ, float32"),
    ("posterior", "φ (posterior)", "meta-step", "φ, its gradient and the next φ in an inner update"),
    ("activations", "activations", "forward+backward", "what autograd keeps of one micro-batch, mean ΔW"),
    ("sampled_delta_w", "sampled ΔW", "forward+backward", "dense σ and ε of every adapted layer, kept for backward"),
    ("kl", "KL term", "KL pass", "the dense μ and σ of φ and θ that the KL's gradient needs"),
)


def plan_table(result: Plan) -> Any:
    """The plan as rich tables: settings, parameter counts, memory by component, the estimated peak."""
    from rich.console import Group
    from rich.table import Table

    targets = result.targets if isinstance(result.targets, str) else ",".join(result.targets)
    settings = (
        f"{result.model} ({result.architecture}), base weights and activations in {result.dtype}"
        + (", gradient checkpointing" if result.gradient_checkpointing else "")
        + f"\nBayesian LoRA rank {result.rank} on {targets}; {result.order.replace('_', '-')} meta-gradients, "
        f"K = {result.inner_steps} inner steps × S = {result.samples} weight samples\n"
        f"each forward pass: {result.batch} sequences × {result.seq_len} tokens, LM head at {result.read_tokens} "
        "positions per sequence"
    )
    params = Table(title="Parameters (exact)", title_justify="left")
    params.add_column("what")
    params.add_column("count", justify="right")
    params.add_row("base model", f"{result.base_params:,}")
    share = result.adapter_params / result.base_params if result.base_params else 0.0
    params.add_row("θ (trainable)", f"{result.adapter_params:,} ({share:.3%} of the base)")
    shapes = ", ".join(f"{n} × {shape}" for shape, n in result.target_shapes.items())
    params.add_row("adapted layers", f"{result.target_modules} ({shapes}, d_out x d_in)")

    memory = Table(title="Memory (estimated)", title_justify="left")
    memory.add_column("component")
    memory.add_column("size", justify="right")
    memory.add_column("held")
    memory.add_column("what")
    for key, label, held, what in _COMPONENTS:
        memory.add_row(label, format_bytes(result.memory[key]), held, what)
    phase_names = {
        "inner_nll": "inner step: NLL forward+backward",
        "inner_kl": "inner step: KL forward+backward",
        "inner_update": "inner step: φ update",
        "outer_nll": "outer NLL forward+backward",
        "outer_kl": "outer KL backward",
        "gradient_sum": "gradient sum",
        "optimizer_step": "AdamW step",
    }
    worst = max(result.phases, key=result.phases.get)
    memory.add_section()
    memory.add_row("persistent", format_bytes(result.persistent), "always", "base weights, θ, its gradient, AdamW")
    memory.add_row(
        "[bold]peak[/]",
        f"[bold]{format_bytes(result.peak)}[/]",
        "",
        f"persistent + the largest phase: {phase_names.get(worst, worst)} ({format_bytes(result.phases[worst])})",
    )
    notes = "\n".join(f"- {n}" for n in result.notes)
    return Group(settings, params, memory, notes)
