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
import json
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from abmll.checkpoint import versions, write_json_atomic
from abmll.errors import ConfigError
from abmll.metrics import NLL_FLOOR, expected_calibration_error, mean_interval
from abmll.scoring import Scorer
from abmll.tasks.data import Episode, Example, Task, make_episode
from abmll.tasks.readers import write_metaicl_task
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


#: The first task index of :class:`FreshTasks`: far above every training, dev and test index of a benchmark.
FRESH = 1_000_000


class FreshTasks:
    """Meta-batches of tasks drawn afresh from a family at every meta-step: task ``FRESH + step · T + j`` with
    ``support + query`` examples drawn with ``seed``, so no example is seen twice and a spread family's teachers never
    repeat. A pure function of (seed, step), like :class:`~abmll.tasks.data.MetaBatchSampler` (its stand-in)."""

    def __init__(self, family: SyntheticFamily, support: int, query: int, meta_batch_size: int, seed: int) -> None:
        self.family, self.support, self.query = family, support, query
        self.meta_batch_size, self.seed = meta_batch_size, seed

    def meta_batch(self, step: int) -> list[Episode]:
        first = FRESH + step * self.meta_batch_size
        tasks = self.family.tasks(range(first, first + self.meta_batch_size), self.support + self.query, self.seed)
        return [make_episode(t, self.support, self.seed, query_size=self.query) for t in tasks]


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
    rows = _kl_rows(teacher, student)
    return sum(rows) / len(rows)


def _kl_rows(teacher: Any, student: Any) -> list[float]:
    """KL(teacher ‖ student) of each row of two ``[N, n_options]`` option distributions (nats)."""
    p = torch.as_tensor(teacher, dtype=torch.float64)
    q = torch.as_tensor(student, dtype=torch.float64).clamp_min(1e-12)
    return (torch.xlogy(p, p) - p * q.log()).sum(-1).tolist()


# --- the family as a benchmark of the library's harness (abmll tune, abmll compare) ---------------------------

#: The setting file of a written benchmark, under ``OUT/data/settings/``.
SETTING_FILE = "synthetic.json"
#: Option distributions recorded for every dev and test example: the task's teacher, the mean teacher, W0.
TRUTHS = ("teacher", "mean_teacher", "base")


def write_benchmark(
    family: SyntheticFamily, out: str | Path, train: int = 64, dev: int = 8, test: int = 32, examples: int = 128
) -> Path:
    """Write ``family`` as a model folder and a data folder that ``abmll tune`` and ``abmll compare`` read like
    any user's (``--model OUT/model --data OUT/data --setting OUT/data/settings/synthetic.json``)::

        OUT/model/                                W0 and its tokenizer (save_pretrained)
        OUT/data/synthetic-{i}/synthetic-{i}.jsonl  each task's ``examples`` examples (whole-task file)
        OUT/data/settings/synthetic.json          tasks 0..train-1 "train", the next ``dev`` "dev", the next
                                                  ``test`` "test"
        OUT/truth.jsonl                           each dev and test example's option distributions under its
                                                  task's teacher, the mean teacher and W0 (:data:`TRUTHS`)
        OUT/family.json                           the family, the sizes and the package versions

    The teachers are scored with the library's default scorer, so a comparison that shares the family's truth
    must score with ``scoring.length_norm = none`` (the default). Written into a temporary folder and renamed
    into place: OUT is complete or absent. An OUT that records the same family and sizes is kept as it is;
    any other existing OUT is refused."""
    out = Path(out)
    record = {
        "family": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(family).items()},
        "sizes": {"train": train, "dev": dev, "test": test, "examples": examples},
    }
    if min(train, dev, test) < 0 or test < 1 or examples < 2:
        raise ConfigError(f"write_benchmark: need test ≥ 1, train and dev ≥ 0 and examples ≥ 2, got {record['sizes']}")
    if out.exists():
        kept = out / "family.json"
        if kept.is_file() and {k: v for k, v in json.loads(kept.read_text()).items() if k in record} == record:
            return out
        raise ConfigError(f"{out} exists and is not this synthetic benchmark ({kept} differs or is missing)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model, tokenizer = family.base_model()
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        ends = (train, train + dev, train + dev + test)
        groups = {"train": range(ends[0]), "dev": range(ends[0], ends[1]), "test": range(ends[1], ends[2])}
        truth_lines = []
        for group, indices in groups.items():
            for index in indices:
                task = family.task(index, examples)
                write_metaicl_task(task, tmp / "data", k=None)
                (tmp / "data" / task.name / "config.json").write_text(
                    json.dumps({"kind": task.kind, "options": list(family.options)}) + "\n", encoding="utf-8"
                )
                if group == "train":
                    continue
                truths = {
                    "teacher": family.probs(task.examples, family.delta(index)),
                    "mean_teacher": family.probs(task.examples, family.delta(None)),
                    "base": family.probs(task.examples),
                }
                for j, ex in enumerate(task.examples):
                    row = {name: [round(p, 7) for p in truths[name][j].tolist()] for name in TRUTHS}
                    truth_lines.append(json.dumps({"task": task.name, "id": ex.id, **row}))
        settings = tmp / "data" / "settings"
        settings.mkdir(parents=True)
        names = {g: [f"synthetic-{i}" for i in indices] for g, indices in groups.items()}
        (settings / SETTING_FILE).write_text(json.dumps(names, indent=1) + "\n", encoding="utf-8")
        (tmp / "truth.jsonl").write_text("".join(line + "\n" for line in truth_lines), encoding="utf-8")
        write_json_atomic(tmp / "family.json", {**record, "versions": versions()})
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def truth_table(benchmark: str | Path, comparison: str | Path, against: str = "abmll") -> dict[str, Any]:
    """How far each method of a comparison on a written benchmark is from the truth: per method, the mean over
    its query predictions (every seed) of KL(task teacher ‖ method's predictive) per test task, and the mean
    over tasks with a 95 % t-interval across tasks (the family's tasks are independent draws); the same for
    the references (the mean teacher: a perfect prior with no adaptation; W0: zero-shot) on the same query
    examples, and the teacher's entropy (the expected NLL of the Bayes-optimal predictor); and ``paired``:
    ``against`` minus each other method per task, with its interval. ``labels`` holds the same per method for
    the comparison's own metrics against the sampled labels: ``nll`` (the mean gold NLL of a task's queries) and
    ``ece`` (a task's ECE, 15 bins, averaged over seeds), each with its ``paired`` differences across tasks.
    Reads ``OUT/{method}/seed-*/predictions.jsonl`` of ``abmll compare``; an example id missing from
    ``truth.jsonl`` is an error."""
    benchmark, comparison = Path(benchmark), Path(comparison)
    truth = {}
    with open(benchmark / "truth.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            truth[row["id"]] = row
    methods: dict[str, dict[str, list[float]]] = {}
    # Against the sampled labels: per method and task, the gold NLL of every query and the ECE of each seed.
    labels: dict[str, dict[str, dict[str, list[float]]]] = {"nll": {}, "ece": {}}
    asked: dict[str, set[str]] = {}
    for path in sorted(comparison.glob("*/seed-*/predictions.jsonl")):
        name = path.parent.parent.name
        per_task = methods.setdefault(name, {})
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        missing = [r["id"] for r in rows if r["id"] not in truth]
        if missing:
            raise ConfigError(f"{path}: example {missing[0]!r} is not in {benchmark / 'truth.jsonl'}")
        kls = _kl_rows([truth[r["id"]]["teacher"] for r in rows], [r["probs"] for r in rows])
        by_task: dict[str, list[dict[str, Any]]] = {}
        for r, kl in zip(rows, kls, strict=True):
            per_task.setdefault(r["task"], []).append(kl)
            asked.setdefault(r["task"], set()).add(r["id"])
            by_task.setdefault(r["task"], []).append(r)
        for task, task_rows in by_task.items():
            probs, gold = [r["probs"] for r in task_rows], [r["gold"] for r in task_rows]
            nll = labels["nll"].setdefault(name, {}).setdefault(task, [])
            nll.extend(-math.log(max(p[g], NLL_FLOOR)) for p, g in zip(probs, gold, strict=True))  # as gold_nll
            labels["ece"].setdefault(name, {}).setdefault(task, []).append(expected_calibration_error(probs, gold))
    if not methods:
        raise ConfigError(f"{comparison}: no */seed-*/predictions.jsonl of abmll compare")
    references: dict[str, dict[str, list[float]]] = {"mean_teacher": {}, "base": {}, "teacher_entropy": {}}
    for task, ids in asked.items():
        rows = [truth[i] for i in sorted(ids)]
        teacher = [r["teacher"] for r in rows]
        references["mean_teacher"][task] = _kl_rows(teacher, [r["mean_teacher"] for r in rows])
        references["base"][task] = _kl_rows(teacher, [r["base"] for r in rows])
        p = torch.tensor(teacher, dtype=torch.float64)
        references["teacher_entropy"][task] = (-torch.xlogy(p, p).sum(-1)).tolist()

    def summary(per_task: dict[str, list[float]]) -> dict[str, Any]:
        tasks = {task: sum(v) / len(v) for task, v in sorted(per_task.items())}
        return {"tasks": tasks, "mean": mean_interval(tasks.values())}

    table = {
        "methods": {name: summary(per_task) for name, per_task in sorted(methods.items())},
        "references": {name: summary(per_task) for name, per_task in references.items()},
        "paired": {},
    }
    table["labels"] = {
        metric: {"methods": {name: summary(per_task) for name, per_task in sorted(values.items())}, "paired": {}}
        for metric, values in labels.items()
    }
    for part in (table, *table["labels"].values()):
        if against in part["methods"]:
            mine = part["methods"][against]["tasks"]
            for name, result in part["methods"].items():
                shared = sorted(set(mine) & set(result["tasks"]))
                if name != against and shared:
                    part["paired"][name] = mean_interval([mine[t] - result["tasks"][t] for t in shared])
    return table


__all__ = [
    "FAMILIES", "FRESH", "INPUT_WORDS", "OPTION_WORDS", "SETTING_FILE", "FreshTasks", "SyntheticFamily",
    "predictive_kl", "truth_table", "write_benchmark",
]
