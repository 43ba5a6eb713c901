"""Plan a run before loading any weights: parameter counts and the estimated memory of a method's meta-step for a
model, from its config alone (``abmll plan``).

The model's module tree is built on the ``meta`` device (``AutoModelForCausalLM.from_config`` under
``torch.device("meta")``: shapes, no storage), the method's adapter layers are injected exactly as
:func:`abmll.inject` does, and the parameter counts are read off it: they are exact. Memory is split into

- **persistent** parts, exact: the base weights (and buffers) in the model's dtype; θ (always float32); θ's
  gradient; the optimiser's state (AdamW's two moments; none for Reptile's SGD);
- **transient** parts, held only during a meta-step, found by running *the method's own meta-step*
  (:meth:`abmll.methods.template.MetaLearner.meta_step`) on the meta device under :class:`LiveBytes` (a dispatch
  mode that adds up every storage an operator creates and subtracts it when the storage is freed, as the
  allocator would; a value read by Python, such as a loss, reads as 1). Its scorer (:class:`_ShapeScorer`) runs
  the decoder on ``batch`` sequences of ``seq_len`` tokens and the LM head at ``read_tokens`` positions per
  sequence, as the option scorer's plain path does (``scoring.shared_prefix = false``: one whole sequence per
  option); the default shared-prefix path encodes each prompt once and needs less, so for it the plan is an
  upper bound (both are checked against measured meta-steps). Attention runs through the fused kernel's memory
  footprint (what CPU flash and CUDA flash or memory-efficient attention keep), or the math backend under
  second-order gradients, as in a real run. The components (activations and the sampled ΔW of one pass, the
  KL's working set) are measured alone for the table.

With first-order gradients nothing is kept from one inner step to the next, so the memory does not depend on the
number of inner steps K (it costs time only); with ``second_order`` the graph of all K·S inner passes is kept.
Allocator overheads (CUDA's caching allocator, fragmentation) are not modelled: on a GPU leave some headroom.
``tests/test_plan.py`` checks the estimate against the allocations of a real meta-step (``torch.profiler`` with
``profile_memory``) on the tiny test model and on SmolLM2-135M.

About 550 lines on purpose: the meta model, the byte counter, the shape scorer, the plan and its table are
used together and by nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from abmll.config import GRADIENT_ORDERS
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
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return 1.0  # a meta tensor's value (a loss, a norm) read by Python: any finite number will do
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


class _ShapeScorer:
    """The scorer a planned meta-step runs with: ``nll`` is :func:`_nll` on ``batch`` sequences of ``seq_len``
    tokens (whatever examples it is given); the method's meta-step is the real one."""

    def __init__(self, batch: int, seq_len: int, read_tokens: int) -> None:
        self.batch, self.seq_len, self.read_tokens = batch, seq_len, read_tokens

    def nll(self, model: torch.nn.Module, examples) -> torch.Tensor:
        return _nll(model, self.batch, self.seq_len, self.read_tokens)


def _planned_episode():
    """One task of one support and one query example: with ``meta.micro_batch_size`` ≥ 1 every inner step and
    the outer loss run one forward pass (of :class:`_ShapeScorer`'s ``batch`` sequences) per weight sample."""
    from abmll.tasks.data import Episode, Example

    example = Example("x", ("a", "b"), 0)
    return Episode("planned", [example], [example])


def _noise_shapes_only(layers: dict) -> None:
    """On the meta device a layer cannot seed a generator: draw ε as an empty tensor of the same shape."""
    for layer in layers.values():
        layer.noise = (
            lambda seed, device, layer=layer: torch.empty(layer.out_features, layer.in_features, device=device)
        )


# --- the plan -------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Parameter counts (exact) and memory (bytes; estimated) of a method's meta-step."""

    model: str
    architecture: str
    method: str
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
    #: Transient peaks (bytes above the persistent parts) of the meta-step run on the meta device.
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
    method: str = "abmll",
    overrides: dict[str, Any] | None = None,
) -> Plan:
    """Count the parameters and estimate the memory of a meta-step of ``method`` (default ABMLL) for ``model``
    (anything :func:`load_config` takes), with LoRA of ``rank`` on ``targets`` (default ``q_proj, v_proj``),
    forward passes of ``batch`` sequences of ``seq_len`` tokens with the LM head at ``read_tokens`` positions
    of each, ``inner_steps`` inner steps of ``samples`` weight samples, base weights and activations in
    ``dtype`` (``compute.dtype``), optionally with ``gradient_checkpointing`` of every decoder layer; ``order``
    and ``beta`` are ABMLL's ``inner.order`` and ``objective.beta``; ``overrides`` any other config field (e.g. a
    method's own settings, ``{"maml.order": "first_order"}``).

    The method's own :meth:`~abmll.methods.template.MetaLearner.meta_step` runs on the meta device, with a
    scorer that feeds the decoder sequences of the given shape (:class:`_ShapeScorer`)."""
    from abmll.bayes.inject import bayes_layers, inject
    from abmll.config import ABMLLConfig
    from abmll.methods import create_method, get_method

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
    cls = get_method(method)
    if not cls.meta_learns:
        raise ConfigError(f"plan: method '{method}' learns nothing across tasks: it has no meta-step to plan")
    settings = {
        "lora.rank": rank, "inner.inner_steps": inner_steps, "inner.inner_samples": samples, "inner.order": order,
        "objective.beta": beta, "compute.dtype": dtype, "compute.gradient_checkpointing": gradient_checkpointing,
        "meta.meta_batch_size": 1, "meta.max_grad_norm": None, **({} if targets is None else {"lora.targets": targets}),
    }  # fmt: skip
    run_config = ABMLLConfig().override({**settings, **(overrides or {})})
    lora = run_config.lora
    config, label = load_config(model)
    mdl = meta_model(config, DTYPES[dtype])
    base_params = sum(p.numel() for p in mdl.parameters())
    base_bytes = _param_bytes(mdl)
    inject(mdl, lora, bayesian=cls.bayesian)  # on the meta device: no seeded generator
    layers = bayes_layers(mdl)
    if cls.bayesian:
        _noise_shapes_only(layers)
    learner = create_method(method, mdl, _ShapeScorer(batch, seq_len, read_tokens), run_config)
    theta = learner.theta
    n_theta = sum(p.numel() for p in theta.values())
    theta_bytes = sum(p.numel() * p.element_size() for p in theta.values())
    shapes: dict[str, int] = {}
    for layer in layers.values():
        key = f"{layer.out_features}x{layer.in_features}"
        shapes[key] = shapes.get(key, 0) + 1

    # The optimiser's state exists from the second meta-step on: allocate it outside the count (it is persistent).
    for p in theta.values():
        p.grad = torch.zeros_like(p)
    learner.optimizer.step()
    opt_bytes = sum(
        v.numel() * v.element_size()
        for state in learner.optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.device.type == "meta"
    )
    effective_order = getattr(learner, "order", order)
    with _attention(effective_order), LiveBytes() as live:
        learner.meta_step([_planned_episode()])
    phases = {"meta_step": live.peak}

    # Components: activations and the sampled ΔW of one forward + backward pass, the KL's working set.
    from abmll.bayes.inject import clone_factors, posterior, weight_sample
    from abmll.objectives import LayerwiseGrad, kl_divergence

    phi = clone_factors(theta)
    passes = {}
    for name, seed in (("mean", None), ("sample", 0)):
        with _attention(effective_order), LiveBytes() as live, posterior(mdl, phi), weight_sample(mdl, seed):
            loss = _nll(mdl, batch, seq_len, read_tokens)
            torch.autograd.grad(loss, list(phi.values()), allow_unused=True)
            del loss
        passes[name] = live.peak
    kl_bytes = 0
    if cls.bayesian and beta > 0:
        with LiveBytes() as live:
            kl_divergence(phi, {k: v.detach() for k, v in theta.items()}, layers, LayerwiseGrad(list(phi.values())))
        kl_bytes = live.peak
    del phi
    # φ, its gradient and the next φ during an inner update, and the previous φ and its gradient that backtracking
    # (eq. 7c) keeps to take an overshooting step again
    posterior_bytes = (5 if run_config.inner.backtrack is not None else 3) * theta_bytes
    memory = {
        "base_weights": base_bytes,
        "theta": theta_bytes,
        "theta_grad": theta_bytes,
        "optimizer": opt_bytes,
        "posterior": posterior_bytes,
        "activations": passes["mean"],
        "sampled_delta_w": max(passes["sample"] - passes["mean"], 0) if cls.bayesian else 0,
        "kl": kl_bytes,
    }
    persistent = base_bytes + theta_bytes * 2 + opt_bytes
    peak = persistent + max(phases.values())
    notes = [f"method '{method}': its own meta-step, run on the meta device"]
    if effective_order == "second_order":
        notes.append(
            f"second-order gradients: the graphs of all {inner_steps}×{samples} inner passes are kept (one "
            "micro-batch per inner step assumed; each more micro-batch adds its graph)"
        )
    else:
        notes.append(
            "first-order gradients: nothing but the previous φ is kept between inner steps, so memory does not "
            f"depend on the number of inner steps ({inner_steps}) from K = 2 on; several weight samples ({samples}) "
            "add the running sum of their gradients (θ-sized); they cost time"
        )
    notes.append(
        "allocator overheads (CUDA's caching allocator, fragmentation) are not modelled: leave some headroom"
    )
    return Plan(
        model=label,
        architecture=type(mdl).__name__,
        method=method,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        rank=rank,
        targets=lora.targets,
        batch=batch,
        seq_len=seq_len,
        read_tokens=read_tokens,
        inner_steps=inner_steps,
        samples=samples,
        order=effective_order,
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
    ("posterior", "φ (posterior)", "meta-step", "φ, its gradient and the next φ in an inner update (and the previous φ "
     "and its gradient, with backtracking)"),
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
    phase_names = {"meta_step": f"{result.method}'s meta-step"}
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
