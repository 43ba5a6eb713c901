"""Find the target modules of a Hugging Face model, wrap them in adapter layers (:class:`BayesLoRALinear`, or
:class:`LoRALinear` for a deterministic LoRA), and bind task posteriors and weight samples to them for a forward
pass.

θ and φ are flat dicts keyed ``"{module name}.{factor}"`` (factor ∈ ``mu_A, mu_B`` and, for a Bayesian layer,
``sigma_A, sigma_B, sigma_scale``); the same keys name θ in a checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from abmll.bayes.layer import FACTORS, PREFIX, BayesLoRALinear, LoRALinear
from abmll.config import BayesLoRAConfig
from abmll.errors import ModelError

Factors = dict[str, torch.Tensor]


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear-like module, or None when it is not one."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2: weight is [d_in, d_out]
        return module.weight.shape[0], module.weight.shape[1]
    if hasattr(module, "in_features") and hasattr(module, "out_features"):  # e.g. bitsandbytes Linear4bit
        return int(module.in_features), int(module.out_features)
    return None


def _is_target(
    name: str, module: nn.Module, targets: list[str] | str, output_layer: nn.Module | None
) -> bool:
    if _features(module) is None or isinstance(module, LoRALinear):
        return False
    if isinstance(targets, str):
        if targets == "all-linear":
            return module is not output_layer
        return re.fullmatch(targets[3:], name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def inject(
    model: nn.Module, config: BayesLoRAConfig, generator: torch.Generator | None = None, bayesian: bool = True
) -> list[str]:
    """Wrap every target module of ``model`` in place, freeze all other parameters, return the wrapped names.
    ``bayesian``: Bayesian LoRA layers (ΔW = μ + σ ⊙ ε); else deterministic LoRA layers (ΔW = μ, no σ factors).

    Raises :class:`ModelError` when no module matches the targets or when the model is already adapted.
    """
    if bayes_layers(model):
        raise ModelError("the model already has Bayesian LoRA layers; inject once per model")
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [
        name
        for name, module in model.named_modules()
        if _is_target(name, module, config.targets, output_layer)
    ]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _features(m) is not None})
        raise ModelError(
            f"no module of the model matches targets {config.targets!r}; linear modules: {linear}"
        )
    if config.layers is not None:
        names = top_blocks(model, names, config.layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for index, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        d_in, d_out = _features(base)
        if bayesian:
            layer = BayesLoRALinear(
                base,
                d_in,
                d_out,
                rank=config.rank,
                scaling=config.scaling,
                sigma_transform=config.sigma_transform,
                sigma_floor=config.sigma_floor,
                sigma_offset=config.sigma_offset,
                layer_index=index,
                sigma_max=config.sigma_max,
            )
        else:
            layer = LoRALinear(base, d_in, d_out, rank=config.rank, scaling=config.scaling, layer_index=index)
        if generator is not None:
            layer.reset_parameters(generator)
        setattr(parent, child, layer)
    return names


def top_blocks(model: nn.Module, names: list[str], n: int) -> list[str]:
    """The module names of ``names`` inside the top ``n`` decoder blocks (``lora.layers``). A block is an element of
    the model's longest ``nn.ModuleList`` (``model.layers`` of a Llama, ``transformer.h`` of GPT-2)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ModelError("lora.layers: the model has no list of decoder blocks (an nn.ModuleList) to count from")
    blocks_name, blocks = max(lists, key=lambda item: len(item[1]))
    lowest = max(len(blocks) - n, 0)
    prefix = f"{blocks_name}." if blocks_name else ""
    kept = [name for name in names if name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) >= lowest]
    outside = [name for name in names if not name.startswith(prefix)]
    if outside:
        raise ModelError(
            f"lora.layers = {n}: target module '{outside[0]}' is not inside a decoder block ({blocks_name}.N); "
            "choose targets inside the blocks or leave lora.layers null"
        )
    return kept


def bayes_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapter layers of ``model`` (Bayesian or deterministic LoRA) by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_bayesian(model: nn.Module) -> bool:
    """True when the model's adapter layers are Bayesian (they have σ factors)."""
    return all(isinstance(m, BayesLoRALinear) for m in bayes_layers(model).values())


def prior(model: nn.Module, factors: tuple[str, ...] = FACTORS) -> dict[str, nn.Parameter]:
    """θ: the flat dict of the prior's trainable factors (the model's own parameters, not copies), those named in
    ``factors`` that the layers hold (a deterministic LoRA layer holds the mean factors only)."""
    out: dict[str, nn.Parameter] = {}
    for name, layer in bayes_layers(model).items():
        for factor, param in layer.prior_factors().items():
            if factor in factors:
                out[f"{name}.{factor}"] = param
    if not out:
        raise ModelError("the model has no Bayesian LoRA layers; call abmll.inject(model, config) first")
    return out


def group_by_layer(flat: dict[str, torch.Tensor]) -> dict[str, Factors]:
    """``{"a.b.mu_A": t, ...}`` → ``{"a.b": {"mu_A": t, ...}}``."""
    out: dict[str, Factors] = {}
    for key, tensor in flat.items():
        name, _, factor = key.rpartition(".")
        out.setdefault(name, {})[factor] = tensor
    return out


def unwrap(model: nn.Module) -> list[str]:
    """Put the original base layers back in place of the Bayesian LoRA layers; returns their names."""
    names = list(bayes_layers(model))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).base_layer)
    return names


@contextmanager
def posterior(model: nn.Module, phi: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Run the model with the task posterior φ (a flat factor dict) in place of θ, without copying it.

    ``None`` keeps θ. Gradients flow from the model's outputs to the tensors of φ.
    """
    layers = bayes_layers(model)
    grouped = group_by_layer(phi) if phi is not None else {}
    if phi is not None:
        missing = sorted(set(layers) - set(grouped))
        extra = sorted(set(grouped) - set(layers))
        if missing or extra:
            raise ModelError(
                f"posterior does not fit the model: missing layers {missing}, unknown layers {extra}"
            )
    previous = {name: layer.posterior for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            layer.posterior = grouped.get(name)
        yield
    finally:
        for name, layer in layers.items():
            layer.posterior = previous[name]
            layer.clear_merged()


@contextmanager
def weight_sample(model: nn.Module, seed: int | None) -> Iterator[None]:
    """Forward passes inside use the weight sample ΔW = μ + σ ⊙ ε(seed); ``None`` means the mean ΔW = μ."""
    layers = list(bayes_layers(model).values())
    previous = [layer.noise_seed for layer in layers]
    try:
        for layer in layers:
            layer.noise_seed = None if seed is None else int(seed)
        yield
    finally:
        for layer, old in zip(layers, previous, strict=True):
            layer.noise_seed = old
            layer.clear_merged()


@contextmanager
def one_noise(model: nn.Module) -> Iterator[None]:
    """Forward passes inside share each Bayesian layer's σ ⊙ ε (one weight sample, one posterior): the passes of
    one scorer call (prompt prefix, prompts, options) form it once instead of once each; gradients flow to σ's
    factors through the shared tensor. Dropped on exit."""
    layers = [layer for layer in bayes_layers(model).values() if isinstance(layer, BayesLoRALinear)]
    previous = [layer.keep_noise for layer in layers]
    try:
        for layer in layers:
            layer.keep_noise = True
        yield
    finally:
        for layer, old in zip(layers, previous, strict=True):
            layer.keep_noise = old
            if not old:
                layer.release_noise()


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Forward passes inside use the base model alone (ΔW = 0)."""
    layers = list(bayes_layers(model).values())
    try:
        for layer in layers:
            layer.enabled = False
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def clone_factors(factors: dict[str, torch.Tensor], requires_grad: bool = True) -> dict[str, torch.Tensor]:
    """φ⁰ = θ: a detached copy of the factors, as leaves that can receive gradients."""
    return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in factors.items()}


__all__ = [
    "FACTORS",
    "PREFIX",
    "adapters_disabled",
    "bayes_layers",
    "clone_factors",
    "group_by_layer",
    "inject",
    "is_bayesian",
    "one_noise",
    "posterior",
    "prior",
    "top_blocks",
    "unwrap",
    "weight_sample",
]
