"""The data model: an example, a task, an episode (k-shot support set and query set), seeded sampling.

METHOD.md section 7: meta-test tasks have a k-shot support set (k = 16 by default, sampled with a seed;
MetaICL uses seeds 100, 13, 21, 42, 87) and a query set.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from abmll.errors import DataError

DEFAULT_SEEDS = (100, 13, 21, 42, 87)
KINDS = ("multiple_choice", "classification")


@dataclass(frozen=True)
class Example:
    """One question: the input text, its answer options, and the index of the gold option."""

    input: str
    options: tuple[str, ...]
    gold: int
    id: str = ""

    def __post_init__(self) -> None:
        if len(self.options) < 2:
            raise DataError(
                f"example {self.id or self.input[:40]!r}: needs at least 2 options, got {self.options}"
            )
        if not 0 <= self.gold < len(self.options):
            raise DataError(f"example {self.id or self.input[:40]!r}: gold index {self.gold} out of range")

    @property
    def answer(self) -> str:
        return self.options[self.gold]


@dataclass
class Task:
    """A named set of examples. ``classification`` tasks share one fixed label set (``labels``)."""

    name: str
    examples: list[Example]
    kind: str = "multiple_choice"
    labels: tuple[str, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or self.name
        if not self.examples:
            raise DataError(f"{where}: task '{self.name}' has no examples")
        if self.kind not in KINDS:
            raise DataError(f"{where}: task kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "classification":
            if self.labels is None:
                self.labels = self.examples[0].options
            for ex in self.examples:
                if tuple(ex.options) != tuple(self.labels):
                    raise DataError(
                        f"{where}: classification task '{self.name}' example {ex.id!r} has options "
                        f"{list(ex.options)}, expected the task's labels {list(self.labels)}"
                    )

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class Episode:
    """A task's k-shot support set and its query set, disjoint."""

    task: str
    support: list[Example]
    query: list[Example]
    seed: int = 0
    meta: dict = field(default_factory=dict)


def sample_support(task: Task, k: int, seed: int, per_label: bool = False) -> list[int]:
    """Indices of a seeded k-shot support set: k in total, or k per label (CrossFit) for classification."""
    where = f"{task.source}: " if task.source else ""
    if k < 0:
        raise DataError(f"{where}task '{task.name}': k must be ≥ 0, got {k}")
    rng = random.Random(seed)
    if per_label and task.kind == "classification":
        by_label: dict[int, list[int]] = defaultdict(list)
        for i, ex in enumerate(task.examples):
            by_label[ex.gold].append(i)
        chosen: list[int] = []
        for label in sorted(by_label):
            pool = by_label[label]
            if k > len(pool):
                raise DataError(
                    f"{where}task '{task.name}': k = {k} per label but label {task.labels[label]!r} "
                    f"has {len(pool)} examples"
                )
            chosen.extend(rng.sample(pool, k))
        rng.shuffle(chosen)
        return chosen
    if k > len(task.examples):
        raise DataError(
            f"{where}task '{task.name}': k = {k} is larger than the task ({len(task.examples)} examples)"
        )
    return rng.sample(range(len(task.examples)), k)


def make_episode(
    task: Task,
    k: int,
    seed: int,
    query_size: int | None = None,
    per_label: bool = False,
    query_pool: Task | None = None,
) -> Episode:
    """A seeded episode: k support examples; the query set is the rest (or ``query_pool``), capped at
    ``query_size`` (a seeded subsample) when given."""
    support_idx = sample_support(task, k, seed, per_label)
    support = [task.examples[i] for i in support_idx]
    if query_pool is not None:
        query = list(query_pool.examples)
    else:
        taken = set(support_idx)
        query = [ex for i, ex in enumerate(task.examples) if i not in taken]
    if query_size is not None and len(query) > query_size:
        rng = random.Random(seed + 1)
        query = rng.sample(query, query_size)
    if not query:
        where = f"{task.source}: " if task.source else ""
        raise DataError(
            f"{where}task '{task.name}': no examples left for the query set after a {k}-shot support set"
        )
    return Episode(task=task.name, support=support, query=query, seed=seed)


def example_key(task: str, ex: Example) -> str:
    """A digest of the task name and the example's content (input, options, gold), independent of its id and
    of where it was read from: two copies of one question have the same key."""
    text = json.dumps([task, ex.input, list(ex.options), ex.gold], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def disjoint_queries(
    task: str,
    pool: Sequence[Example],
    seeds: Sequence[int],
    supports: dict[int, Sequence[Example]],
    query_size: int | None = None,
) -> dict[int, list[Example]]:
    """Query sets, disjoint across ``seeds`` (every seed of the evaluation, in order), for the seeds that are
    keys of ``supports``: the pool, deduplicated by content, is ordered by :func:`example_key` (a fixed shuffle
    that depends on the task and the examples alone), cut into ``len(seeds)`` contiguous parts, and seed
    ``seeds[j]`` takes part j less its own support examples, capped at ``query_size``. A seed's query set thus
    depends only on the pool, its position in ``seeds``, its support set and the cap."""
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds):
        raise DataError(f"task '{task}': the seeds {seeds} repeat one; expected distinct seeds")
    unique: dict[str, Example] = {}
    for ex in pool:
        unique.setdefault(example_key(task, ex), ex)
    ranked = [unique[key] for key in sorted(unique)]
    n, parts = len(ranked), len(seeds)
    out: dict[int, list[Example]] = {}
    for seed, support in supports.items():
        if seed not in seeds:
            raise DataError(f"task '{task}': seed {seed} is not one of the evaluation's seeds {seeds}")
        j = seeds.index(seed)
        taken = {example_key(task, ex) for ex in support}
        query = [ex for ex in ranked[j * n // parts : (j + 1) * n // parts] if example_key(task, ex) not in taken]
        out[seed] = query if query_size is None else query[:query_size]
        if not out[seed]:
            raise DataError(
                f"task '{task}': its query pool of {n} examples, cut into {parts} disjoint parts (one per seed), "
                f"leaves seed {seed} no query example once its support set is removed; use fewer seeds or more data"
            )
    return out


class MetaBatchSampler:
    """Meta-batches of episodes drawn from a pool of tasks, as a pure function of (seed, step): the same
    step always gives the same episodes, so a resumed run continues exactly where it stopped."""

    def __init__(
        self,
        tasks: Sequence[Task],
        k: int,
        query_size: int,
        meta_batch_size: int,
        seed: int = 0,
        per_label: bool = False,
    ) -> None:
        if not tasks:
            raise DataError("meta-training needs at least one task")
        self.tasks = list(tasks)
        self.k, self.query_size, self.meta_batch_size = k, query_size, meta_batch_size
        self.seed, self.per_label = seed, per_label
        for task in self.tasks:
            need = k + 1 if not (per_label and task.kind == "classification") else k * len(task.labels) + 1
            if len(task) < need:
                raise DataError(
                    f"task '{task.name}' has {len(task)} examples; "
                    f"a {k}-shot episode with a query set needs ≥ {need}"
                )

    def meta_batch(self, step: int) -> list[Episode]:
        rng = random.Random(f"{self.seed}:{step}")
        T = self.meta_batch_size
        if T <= len(self.tasks):
            chosen = rng.sample(range(len(self.tasks)), T)
        else:
            chosen = [rng.randrange(len(self.tasks)) for _ in range(T)]
        return [
            make_episode(
                self.tasks[i],
                self.k,
                rng.randrange(2**31),
                query_size=self.query_size,
                per_label=self.per_label,
            )
            for i in chosen
        ]


class EpisodeCycle:
    """A fixed list of episodes served as meta-batches of ``meta_batch_size``, cycling in order."""

    def __init__(self, episodes: Sequence[Episode], meta_batch_size: int) -> None:
        if not episodes:
            raise DataError("meta-training needs at least one episode")
        self.episodes, self.meta_batch_size = list(episodes), meta_batch_size

    def meta_batch(self, step: int) -> list[Episode]:
        n = len(self.episodes)
        start = step * self.meta_batch_size
        return [self.episodes[(start + i) % n] for i in range(self.meta_batch_size)]
