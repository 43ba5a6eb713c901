"""A synthetic task family that knows its truth: every task is labelled by a teacher model whose weights are known.

The base weights W0 are the tiny random Llama (:func:`abmll.tiny.tiny_llama`). Task i's teacher adds to each
adapted layer (``q_proj`` and ``v_proj`` of every block, the library's default targets)

    ΔW_i = M + s ⊙ E_i                                                                      (eq. S1)

- M, the family mean, is low rank: ``M = m · B A / √r`` with ``B ∈ R^{d_out×r}``, ``A ∈ R^{r×d_in}`` of
  N(0, 1) entries, so every entry of M has standard deviation m (``mean_scale``), rank r (``mean_rank``);
- E_i ~ N(0, I), dense, or low rank ``E_i = B_i A_i / √r_E`` (``noise_rank``; entries of variance 1 either way);
- s (``spread``) sets how far tasks stray from the mean teacher W0 + M: s = 0 makes every task the same.

A task's examples have random word inputs, the family's fixed options, and a gold option *sampled* from the
teacher's option distribution ``p(y | x, W0 + ΔW_i)`` computed by the library's :class:`~abmll.scoring.Scorer`
(default option scorer). Each option is one word repeated ``option_repeats`` times: the tiny model's logits are
small (its tied embeddings are initialised with standard deviation 0.02), so a single-token option's probability
barely moves whatever ΔW is; the option scorer sums the repeated tokens' log-probabilities, which lets a teacher
move the option distribution far from the base model's.

Everything is a pure function of seeds: the family ``seed`` draws M, (seed, i) draws E_i, and (seed, i, example
seed) draws a task's inputs and labels. Teachers are applied to the family's own copy of the base model by adding
ΔW to its weights for the duration of a call (the library's adapter layers are not involved).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from abmll.scoring import Scorer
from abmll.tasks.data import Example, Task
from abmll.tiny import TINY_WORDS, tiny_llama

#: Words of the options (each repeated ``option_repeats`` times); the first ``n_options`` are used.
OPTION_WORDS = ("red", "blue", "green", "black", "white", "brown")
#: Words of the inputs: the tiny tokenizer's vocabulary without the option words.
INPUT_WORDS = tuple(w for w in TINY_WORDS if w not in OPTION_WORDS)
#: Keys of the independent random streams (mean, task noise, task examples, probe inputs).
_MEAN, _NOISE, _EXAMPLES, _PROBE = range(4)
Delta = dict[str, torch.Tensor]


def _rng(*coordinates: int) -> np.random.Generator:
    """A numpy generator that is a pure function of non-negative integer coordinates."""
    return np.random.default_rng([int(c) for c in coordinates])


def _normal(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(torch.float32)


@dataclass(frozen=True)
class SyntheticFamily:
    """A family of tasks with teachers ΔW_i = M + s ⊙ E_i (eq. S1) on the tiny Llama of ``model_seed``."""

    spread: float = 0.0  # s
    mean_scale: float = 0.1  # m: standard deviation of every entry of M
    mean_rank: int = 4  # r: rank of M
    noise_rank: int | None = None  # None: E_i dense N(0, I); an int: E_i of that rank
    n_options: int = 4
    option_repeats: int = 4
    input_words: int = 6
    seed: int = 0  # draws M, the E_i and every task's examples
    model_seed: int = 0  # W0 = tiny_llama(seed=model_seed), token embeddings × embedding_scale
    embedding_scale: float = 1.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if not 2 <= self.n_options <= len(OPTION_WORDS):
            raise ValueError(f"n_options must lie in [2, {len(OPTION_WORDS)}], got {self.n_options}")
        if self.spread < 0 or self.mean_scale < 0:
            raise ValueError("spread and mean_scale must be ≥ 0")
        if self.mean_rank < 1 or (self.noise_rank is not None and self.noise_rank < 1):
            raise ValueError("mean_rank and noise_rank must be ≥ 1")
        if self.option_repeats < 1 or self.input_words < 1 or self.seed < 0:
            raise ValueError("option_repeats and input_words must be ≥ 1, seed ≥ 0")
        if self.embedding_scale <= 0:
            raise ValueError("embedding_scale must be > 0")

    @classmethod
    def named(cls, name: str, seed: int = 0, **changes: Any) -> SyntheticFamily:
        """One of :data:`FAMILIES` (``identical``: s = 0, every task the same; ``spread``: tasks really
        differ), with ``seed`` and any other field changed."""
        if name not in FAMILIES:
            raise ValueError(f"unknown synthetic family {name!r}; available: {sorted(FAMILIES)}")
        return cls(**{**FAMILIES[name], "seed": seed, **changes})

    # --- the base model and its adapted layers -----------------------------------------------------------
    def base_model(self) -> tuple[Any, Any]:
        """A fresh copy of W0 and its tokenizer, e.g. for a method to adapt: the tiny Llama of ``model_seed``
        with its (tied) token embeddings scaled by ``embedding_scale``, which sharpens its option distributions."""
        model, tokenizer = tiny_llama(seed=self.model_seed)
        if self.embedding_scale != 1.0:
            with torch.no_grad():
                model.get_input_embeddings().weight.mul_(self.embedding_scale)
        return model, tokenizer

    @functools.cached_property
    def _model(self) -> Any:
        return self.base_model()[0]

    @functools.cached_property
    def scorer(self) -> Scorer:
        """The scorer that turns the teachers into option probabilities (the library's default config)."""
        return Scorer(self.base_model()[1])

    @functools.cached_property
    def layers(self) -> tuple[str, ...]:
        """Names of the adapted layers, in model order (the names the library's adapter layers get)."""
        return tuple(n for n, _ in self._model.named_modules() if n.rsplit(".", 1)[-1] in self.targets)

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(" ".join([w] * self.option_repeats) for w in OPTION_WORDS[: self.n_options])

    # --- teachers ----------------------------------------------------------------------------------------
    @functools.cached_property
    def _mean(self) -> Delta:
        out = {}
        for index, name in enumerate(self.layers):
            d_out, d_in = self._model.get_submodule(name).weight.shape
            rng = _rng(self.seed, _MEAN, index)
            B, A = _normal(rng, d_out, self.mean_rank), _normal(rng, self.mean_rank, d_in)
            out[name] = self.mean_scale * (B @ A) / self.mean_rank**0.5
        return out

    def delta(self, task: int | None = None) -> Delta:
        """ΔW of every adapted layer: task ``task``'s teacher M + s ⊙ E_i (eq. S1), or M (the mean teacher)
        when ``task`` is None."""
        if task is None or self.spread == 0:
            return {name: m.clone() for name, m in self._mean.items()}
        out = {}
        for index, (name, m) in enumerate(self._mean.items()):
            rng = _rng(self.seed, _NOISE, task, index)
            if self.noise_rank is None:
                noise = _normal(rng, *m.shape)
            else:
                noise = _normal(rng, m.shape[0], self.noise_rank) @ _normal(rng, self.noise_rank, m.shape[1])
                noise = noise / self.noise_rank**0.5
            out[name] = m + self.spread * noise
        return out

    @contextmanager
    def _applied(self, delta: Delta | None) -> Iterator[Any]:
        """The family's model with W0 + ΔW in its adapted layers; W0 restored afterwards."""
        saved = {}
        try:
            with torch.no_grad():
                for name, d in (delta or {}).items():
                    weight = self._model.get_submodule(name).weight
                    saved[name] = weight.clone()
                    weight.add_(d.to(weight))
            yield self._model
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    self._model.get_submodule(name).weight.copy_(w)

    @torch.no_grad()
    def probs(self, examples: Sequence[Example], delta: Delta | None = None, batch: int = 64) -> torch.Tensor:
        """Option probabilities ``[len(examples), n_options]`` of the model W0 + ``delta`` (W0 when None)."""
        with self._applied(delta) as model:
            out = [
                torch.softmax(self.scorer(model, examples[i : i + batch]), -1)
                for i in range(0, len(examples), batch)
            ]
        return torch.cat(out).cpu()

    # --- data --------------------------------------------------------------------------------------------
    def _inputs(self, rng: np.random.Generator, n: int) -> list[str]:
        picks = rng.integers(len(INPUT_WORDS), size=(n, self.input_words))
        return [" ".join(INPUT_WORDS[j] for j in row) for row in picks]

    def probe(self, n: int, seed: int = 0) -> list[Example]:
        """``n`` fresh inputs with the family's options, not drawn by any task, for comparing predictive
        distributions (their gold index is 0 and means nothing)."""
        return [
            Example(text, self.options, 0, id=f"probe:{seed}:{j}")
            for j, text in enumerate(self._inputs(_rng(self.seed, _PROBE, seed), n))
        ]

    def task(self, index: int, n: int, seed: int = 0) -> Task:
        """Task ``index`` with ``n`` examples: random inputs, gold options sampled from its teacher's option
        distribution. ``seed`` draws the inputs and labels (the teacher depends on ``index`` alone)."""
        rng = _rng(self.seed, _EXAMPLES, index, seed)
        texts = self._inputs(rng, n)
        unlabelled = [Example(t, self.options, 0) for t in texts]
        p = self.probs(unlabelled, self.delta(index)).double()
        u = torch.from_numpy(rng.random(n))
        gold = (p.cumsum(-1) < u[:, None]).sum(-1).clamp(max=self.n_options - 1)  # inverse CDF
        name = f"synthetic-{index}"
        examples = [
            Example(t, self.options, int(g), id=f"{name}:{seed}:{j}")
            for j, (t, g) in enumerate(zip(texts, gold.tolist(), strict=True))
        ]
        return Task(name, examples, kind="classification", labels=self.options, source="abmll.synthetic")

    def tasks(self, indices: Sequence[int], n: int, seed: int = 0) -> list[Task]:
        return [self.task(i, n, seed) for i in indices]


#: The named families: the same mean teacher, tasks identical (s = 0) or spread far around it (s large) along one
#: random direction per task and layer (E_i of rank 1, a shift that a LoRA can follow), on W0 with its embeddings
#: scaled by 5 (the tiny model's option distributions are then far from uniform: the mean teacher is 0.40 nats from
#: W0, and two tasks' teachers 2.8 nats apart on average).
FAMILIES: dict[str, dict[str, Any]] = {
    "identical": {"spread": 0.0, "embedding_scale": 5.0},
    "spread": {"spread": 0.3, "noise_rank": 1, "embedding_scale": 5.0},
}


def predictive_kl(teacher: Any, student: Any) -> float:
    """Mean over rows of KL(teacher ‖ student) between option distributions ``[N, n_options]`` (nats)."""
    p = torch.as_tensor(teacher, dtype=torch.float64)
    q = torch.as_tensor(student, dtype=torch.float64).clamp_min(1e-12)
    return float((torch.xlogy(p, p) - p * q.log()).sum(-1).mean())


__all__ = ["FAMILIES", "INPUT_WORDS", "OPTION_WORDS", "SyntheticFamily", "predictive_kl"]
