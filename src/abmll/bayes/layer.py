"""The adapter layers: a frozen base layer plus a low-rank-parameterised update ΔW, deterministic
(:class:`LoRALinear`, ΔW = μ: the LoRA baselines) or Bayesian (:class:`BayesLoRALinear`, ΔW random: ABMLL).

Per adapted layer (METHOD.md section 1), with factor pairs ``B ∈ R^{d_out×r}``, ``A ∈ R^{r×d_in}``:

    μ = s · B_μ A_μ                    (s = alpha / r)                          (eq. 1)
    σ = e^λ · g(B_σ A_σ + o) + c       (g ∈ {abs, softplus, exp}, floor c)      (eq. 2)
    σ ← (1/σ' + 1/σ_max)⁻¹ + c         σ' = e^λ g(·): the bound σ < σ_max + c   (eq. 2b)
    ΔW = μ + σ ⊙ ε,  ε ~ N(0, I)       one weight sample for the whole pass     (eq. 3)
    y = base(x) + x ΔWᵀ                the base layer's own forward is kept     (eq. 4)

λ is a learnable log-scale per layer (0 at initialisation): it moves σ of the whole layer by relative amounts,
with a gradient that sums over every entry, so σ can learn at a useful rate from any σ_init (METHOD.md §1).
σ_max (``lora.sigma_max``) bounds every entry smoothly: far below it σ is eq. 2's, near it σ levels off. Where
the expected NLL is flat in an entry of ΔW, nothing in eq. 8 stops σθ there from drifting without end under AdamW
(docs/METHOD.md §8–9).
The layer's own parameters are the global prior θ. A task posterior φ (the same factors, plain tensors) is
bound to the layer for the duration of a forward pass with :func:`abmll.bayes.inject.posterior`; the model
is never copied. What the layer computes is set by two attributes: ``posterior`` (factors to use instead of
θ) and ``noise_seed`` (None: the mean ΔW = μ; an int: a weight sample drawn from that seed, so a recomputed
forward — gradient checkpointing, a second scorer call — sees the same ε; a deterministic layer has no σ and
always computes the mean).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: The factors of the mean μ (eq. 1): all that a deterministic LoRA layer holds.
MEAN_FACTORS = ("mu_A", "mu_B")
#: The factors that parameterise σ (eq. 2); they may take their own step sizes (METHOD.md §3).
SIGMA_FACTORS = ("sigma_A", "sigma_B", "sigma_scale")
#: Every factor of a Bayesian LoRA layer.
FACTORS = MEAN_FACTORS + SIGMA_FACTORS
#: Prefix of every adapter parameter, so that a state dict of θ can be filtered by name.
PREFIX = "abmll_"


def mean_delta(mu_A: torch.Tensor, mu_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """μ = s · B_μ A_μ (eq. 1), dense ``[d_out, d_in]``."""
    return scaling * (mu_B @ mu_A)


def sigma_dense(
    sigma_A: torch.Tensor,
    sigma_B: torch.Tensor,
    sigma_scale: torch.Tensor,
    transform: str,
    offset: float,
    floor: float,
    maximum: float | None = None,
) -> torch.Tensor:
    """σ = e^λ · g(B_σ A_σ + o) + c (eq. 2), dense ``[d_out, d_in]``; λ = ``sigma_scale``; with ``maximum``
    (σ_max) the bounded σ = (1/σ' + 1/σ_max)⁻¹ + c of σ' = e^λ · g(·) (eq. 2b), a sigmoid under ``exp``."""
    pre = sigma_B @ sigma_A + offset
    if transform == "exp" and maximum is not None:
        # (1/σ' + 1/σ_max)⁻¹ = σ_max · sigmoid(log σ' − log σ_max): one dense op kept for backward, as exp; no overflow
        return maximum * torch.sigmoid(pre + (sigma_scale - math.log(maximum))) + floor
    if transform == "abs":
        g = pre.abs()
    elif transform == "softplus":
        g = F.softplus(pre)
    elif transform == "exp":
        g = pre.exp()
    else:
        raise ValueError(f"unknown sigma transform {transform!r}")
    sigma = sigma_scale.exp() * g
    if maximum is not None:
        sigma = sigma * maximum / (sigma + maximum)
    return sigma + floor


def _uniform(tensor: torch.Tensor, bound: float, generator: torch.Generator | None) -> None:
    tensor.uniform_(-bound, bound, generator=generator)


class LoRALinear(nn.Module):
    """Wraps a linear layer (``nn.Linear``, GPT-2 ``Conv1D`` or any module with ``in_features`` and
    ``out_features``) with a deterministic LoRA update ΔW = μ (eqs. 1 and 4)."""

    #: The factors this layer holds (its θ), in the order :meth:`prior_factors` returns them.
    factor_names: tuple[str, ...] = MEAN_FACTORS

    def __init__(
        self, base_layer: nn.Module, in_features: int, out_features: int, rank: int, scaling: float, layer_index: int
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.scaling = scaling
        self.layer_index = layer_index
        weight = next(base_layer.parameters(), None)
        self._device = weight.device if weight is not None else None
        self.add_factors()
        self.reset_parameters()
        self.posterior: dict[str, torch.Tensor] | None = None
        self.noise_seed: int | None = None
        self.enabled = True
        #: Without gradients and under a weight sample, a Bayesian layer runs one product with the merged weight
        #: W0 + ΔW (formed once per posterior and sample) instead of the base product and the update's two (eq. 4;
        #: equal within float rounding). Only for an ``nn.Linear`` base layer; ``compute.merge_without_grad`` sets it.
        self.merge = True
        self._merged: tuple[tuple, torch.Tensor] | None = None
        #: Inside :func:`abmll.bayes.inject.one_noise` (a scorer call's passes), σ ⊙ ε is formed once and reused.
        self.keep_noise = False
        self._noise: tuple[tuple, torch.Tensor] | None = None

    def add_factors(self) -> None:
        """Create θ's parameters (:attr:`factor_names`): always float32, whatever the base layer's dtype."""
        self.abmll_mu_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=self._device))
        self.abmll_mu_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=self._device))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """LoRA's initialisation: A ~ Kaiming-uniform, B = 0, so μθ = 0 at step 0. The generator draws A_σ's
        values too (and drops them), so that a deterministic and a Bayesian layer seeded alike start from the same
        A_μ: every method of a comparison starts from the same μθ."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5) on a [r, d_in] matrix
        with torch.no_grad():
            _uniform(self.abmll_mu_A, bound, generator)
            self.abmll_mu_B.zero_()
            _uniform(torch.empty(self.rank, self.in_features, device=self._device), bound, generator)

    def prior_factors(self) -> dict[str, torch.Tensor]:
        """θ of this layer by factor name (:attr:`factor_names`)."""
        return {name: getattr(self, PREFIX + name) for name in self.factor_names}

    def factors(self) -> dict[str, torch.Tensor]:
        """The factors in use: the bound posterior φ, else the prior θ."""
        return self.posterior if self.posterior is not None else self.prior_factors()

    def mean(self, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        return mean_delta(factors["mu_A"], factors["mu_B"], self.scaling)

    def update(self, h: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """x ΔWᵀ for the input ``h`` (already in the product's dtype): the low-rank mean path s · (x A_μᵀ) B_μᵀ,
        never forming μ densely."""
        dtype = h.dtype
        return self.scaling * ((h @ factors["mu_A"].T.to(dtype)) @ factors["mu_B"].T.to(dtype))

    def clear_merged(self) -> None:
        """Drop the merged weight W0 + ΔW and the kept σ ⊙ ε (of a Bayesian layer), if held."""
        self._merged = None
        self._noise = None

    def merges(self) -> bool:
        """Whether this forward runs one product with W0 + ΔW: never for a deterministic layer, whose low-rank
        product is the cheaper one."""
        return False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x, *args, **kwargs)
        f = self.factors()
        if not args and not kwargs and self.merges():
            return F.linear(x, self.merged_weight(f), self.base_layer.bias)
        y = self.base_layer(x, *args, **kwargs)
        # The products run in the activations' dtype (bfloat16 under compute.dtype = bfloat16); the factors (and
        # σ, ε) stay in their own dtype (float32) until the cast of the product's input.
        dtype = x.dtype if x.is_floating_point() else f["mu_A"].dtype
        return y + self.update(x.to(dtype), f).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling}"


class BayesLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose update is random: ΔW = μ + σ ⊙ ε (eqs. 1–4)."""

    factor_names = FACTORS

    def __init__(
        self,
        base_layer: nn.Module,
        in_features: int,
        out_features: int,
        rank: int,
        scaling: float,
        sigma_transform: str,
        sigma_floor: float,
        sigma_offset: float,
        layer_index: int,
        sigma_max: float | None = None,
    ) -> None:
        super().__init__(base_layer, in_features, out_features, rank, scaling, layer_index)
        self.sigma_transform = sigma_transform
        self.sigma_floor = sigma_floor
        self.sigma_offset = sigma_offset
        self.sigma_max = sigma_max

    def add_factors(self) -> None:
        super().add_factors()
        self.abmll_sigma_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=self._device))
        self.abmll_sigma_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=self._device))
        self.abmll_sigma_scale = nn.Parameter(torch.zeros((), device=self._device))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """LoRA's initialisation for both factor pairs: A ~ Kaiming-uniform, B = 0, λ = 0, so μθ = 0 and
        σθ = σ_init at step 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            for A, B in ((self.abmll_mu_A, self.abmll_mu_B), (self.abmll_sigma_A, self.abmll_sigma_B)):
                _uniform(A, bound, generator)
                B.zero_()
            self.abmll_sigma_scale.zero_()

    @property
    def initial_sigma(self) -> float:
        """σ_init: σ of every entry at initialisation (B_σ = 0, λ = 0), g(o) + c (eqs. 2, 2b)."""
        zero = torch.zeros(1, 1, dtype=torch.float64)
        return float(
            sigma_dense(
                zero, zero, zero[0, 0], self.sigma_transform, self.sigma_offset, self.sigma_floor, self.sigma_max
            )
        )

    def sigma(self, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        return sigma_dense(
            factors["sigma_A"],
            factors["sigma_B"],
            factors["sigma_scale"],
            self.sigma_transform,
            self.sigma_offset,
            self.sigma_floor,
            self.sigma_max,
        )

    def noise(self, seed: int, device: torch.device) -> torch.Tensor:
        """ε ~ N(0, I) of shape ``[d_out, d_in]``, a function of (seed, layer index) alone."""
        generator = torch.Generator(device=device)
        generator.manual_seed((seed * 1_000_003 + self.layer_index) % (2**63 - 1))
        return torch.randn(self.out_features, self.in_features, generator=generator, device=device)

    def sample_delta(self, factors: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        """One weight sample ΔW = μ + σ ⊙ ε (eq. 3), dense ``[d_out, d_in]``."""
        mu_A = factors["mu_A"]
        return self.mean(factors) + self.sigma(factors) * self.noise(seed, mu_A.device)

    def merges(self) -> bool:
        """True without gradients, under a weight sample (a dense ΔW), on an ``nn.Linear`` base layer, with
        ``merge`` on."""
        return (
            self.merge and self.noise_seed is not None and not torch.is_grad_enabled()
            and type(self.base_layer) is nn.Linear
        )  # fmt: skip

    def merged_weight(self, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """W0 + ΔW for the weight sample of ``noise_seed`` (eqs. 3–4), formed once and kept while the factors, their
        values (``_version``), the sample and W0 stay the same; :func:`abmll.bayes.inject.posterior` and
        ``weight_sample`` drop it on exit."""
        weight = self.base_layer.weight
        key = (self.noise_seed, id(weight), weight._version, *((id(t), t._version) for t in factors.values()))
        if self._merged is None or self._merged[0] != key:
            self._merged = None  # free the old one first
            delta = self.sample_delta(factors, self.noise_seed)
            self._merged = (key, (weight.float() + delta).to(weight.dtype))
        return self._merged[1]

    def scaled_noise(self, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """σ ⊙ ε of the weight sample ``noise_seed`` (eq. 3), dense; with ``keep_noise``, formed once and reused
        while the factors (and their values), the sample and the gradient mode stay the same."""
        if not self.keep_noise:
            return self.sigma(factors) * self.noise(self.noise_seed, factors["mu_A"].device)
        key = (self.noise_seed, torch.is_grad_enabled(), *((id(t), t._version) for t in factors.values()))
        if self._noise is None or self._noise[0] != key:
            self._noise = None  # free the old one first
            self._noise = (key, self.sigma(factors) * self.noise(self.noise_seed, factors["mu_A"].device))
        return self._noise[1]

    def release_noise(self) -> None:
        """Drop the kept σ ⊙ ε (autograd keeps what a backward pass still needs)."""
        self._noise = None

    def update(self, h: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """x ΔWᵀ: the low-rank mean path, plus x (σ ⊙ ε)ᵀ under a weight sample (``noise_seed`` set)."""
        out = super().update(h, factors)
        if self.noise_seed is not None:
            out = out + h @ self.scaled_noise(factors).T.to(h.dtype)
        return out

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, "
            f"sigma={self.sigma_transform}(BA{self.sigma_offset:+.3g})+{self.sigma_floor:.3g}"
            + ("" if self.sigma_max is None else f" < {self.sigma_max:.3g}")
        )
