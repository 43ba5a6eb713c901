"""Property-based fuzzing (hypothesis) of every reader in ``abmll.tasks.readers``, of config loading (JSON,
YAML, dicts, dotted overrides) and of checkpoint loading: whatever the bytes or values, the only exceptions
that escape are the library's own (:class:`abmll.errors.AbmllError` subclasses). Deterministic
(``derandomize=True``) and bounded (``max_examples``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abmll.checkpoint import CONFIG_FILE, MANIFEST, load_checkpoint, save_checkpoint, sha256
from abmll.config import ABMLLConfig
from abmll.errors import AbmllError
from abmll.tasks import readers
from abmll.tasks.data import Task

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def only_library_errors(call: Callable[[], Any]) -> Any:
    """Run ``call``; an AbmllError is an acceptable outcome, any other exception fails the test."""
    try:
        return call()
    except AbmllError as exc:
        assert str(exc), "an error without a message"
        return None


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh(base: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=base))


# ---------------------------------------------------------------------------------------------- strategies

WORDS = st.sampled_from(["yes", "no", "maybe", "", " ", "a\tb", "x\ny", "(A) x (B) y", "\\n", "t", "../t", "é"])
TEXT = st.one_of(WORDS, st.text(max_size=10))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.integers(), st.floats(), TEXT
)
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4), max_leaves=10)
OPTIONS = st.one_of(st.lists(WORDS, max_size=4), st.lists(TEXT, max_size=3), JSON)
LINE = st.fixed_dictionaries(
    {},
    optional={
        "task": st.one_of(WORDS, JSON),
        "input": st.one_of(TEXT, JSON),
        "output": st.one_of(WORDS, JSON),
        "options": OPTIONS,
        "id": st.one_of(TEXT, st.integers(), JSON),
        "gold": st.one_of(st.integers(-2, 4), WORDS, JSON),
        "sentence": st.one_of(TEXT, JSON),
        "label": st.one_of(st.integers(-2, 4), WORDS),
    },
)


@st.composite
def damaged(draw, text: str) -> bytes:
    """``text`` as bytes, maybe with a BOM, cut short, or with a few bytes replaced."""
    data = text.encode("utf-8")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if data and draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    for _ in range(draw(st.integers(0, 2))):
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.binary(min_size=1, max_size=3)) + data[pos + 1 :]
    return data


@st.composite
def jsonl(draw, line=LINE) -> bytes:
    rows = draw(st.lists(st.one_of(line.map(json.dumps), JSON.map(json.dumps), TEXT), max_size=6))
    return draw(damaged(draw(st.sampled_from(["\n", "\r\n"])).join(rows)))


@st.composite
def tsv(draw) -> bytes:
    cell = st.one_of(WORDS, TEXT, st.lists(st.sampled_from(["(A)", "(B)", "(a)", "(b)", "(c)", "\\n", " ", "x"]))
                     .map("".join))  # fmt: skip
    rows = draw(st.lists(st.lists(cell, min_size=1, max_size=3).map("\t".join), max_size=6))
    return draw(damaged("\n".join(rows)))


FILES = st.one_of(jsonl(), st.binary(max_size=120), JSON.map(json.dumps).map(str.encode))
TASK_NAMES = st.one_of(st.sampled_from(["t", "../t", "", ".", "..", "a/b", "t\x00", "T", "t\\u"]), st.text(max_size=6))
SPLITS = st.sampled_from(["train", "dev", "test", "bogus"])


# ------------------------------------------------------------------------------------------------ readers


@FUZZ
@given(content=FILES, config=st.one_of(st.none(), FILES))
def test_read_metaicl_file(base, content, config):
    folder = fresh(base)
    (folder / "t_16_100_train.jsonl").write_bytes(content)
    if config is not None:
        (folder / "config.json").write_bytes(config)
    only_library_errors(lambda: readers.read_metaicl_file(folder / "t_16_100_train.jsonl"))
    shutil.rmtree(folder)


@FUZZ
@given(
    content=FILES,
    config=st.one_of(st.none(), FILES),
    whole=st.booleans(),
    name=TASK_NAMES,
    k=st.integers(-2, 20),
    seed=st.integers(-1, 200),
    split=SPLITS,
)
def test_read_metaicl_task_and_split_files(base, content, config, whole, name, k, seed, split):
    data = fresh(base)
    (data / "t").mkdir()
    (data / "t" / ("t.jsonl" if whole else "t_16_100_train.jsonl")).write_bytes(content)
    if config is not None:
        (data / "_configs").mkdir()
        (data / "_configs" / "t.json").write_bytes(config)
    only_library_errors(lambda: readers.read_metaicl_task(data, name, k, seed, split))
    only_library_errors(lambda: readers.read_metaicl_split_files(data, name, k, seed))
    only_library_errors(lambda: readers.load_metaicl_tasks(data, [name, "t"], 16, 100, split))
    shutil.rmtree(data)


@FUZZ
@given(content=st.one_of(FILES, st.fixed_dictionaries({}, optional={"options": OPTIONS, "kind": JSON,
                                                                     "x": JSON}).map(json.dumps).map(str.encode)))
def test_read_task_config(base, content):
    folder = fresh(base)
    (folder / "config.json").write_bytes(content)
    only_library_errors(lambda: readers.read_task_config(folder / "config.json"))
    only_library_errors(lambda: readers.find_task_config(folder, "t"))
    shutil.rmtree(folder)


SETTING = st.dictionaries(
    st.one_of(st.sampled_from(["train", "test", "dev", "valid"]), TEXT),
    st.one_of(st.lists(TASK_NAMES, max_size=4), JSON),
    max_size=5,
)


@FUZZ
@given(content=st.one_of(FILES, SETTING.map(json.dumps).map(str.encode), SETTING.map(json.dumps).flatmap(damaged)))
def test_read_setting(base, content):
    folder = fresh(base)
    (folder / "s.json").write_bytes(content)
    result = only_library_errors(lambda: readers.read_setting(folder / "s.json"))
    if result is not None:
        assert {"train", "test"} <= result.keys() and not set(result["train"]) & set(result["test"])
    shutil.rmtree(folder)


@FUZZ
@given(content=st.one_of(tsv(), st.binary(max_size=120)), config=st.one_of(st.none(), FILES), split=SPLITS)
def test_read_crossfit(base, content, config, split):
    data = fresh(base)
    (data / "t").mkdir()
    (data / "t" / "t_train.tsv").write_bytes(content)
    if config is not None:
        (data / "t" / "config.json").write_bytes(config)
    only_library_errors(lambda: readers.read_crossfit_tsv(data / "t" / "t_train.tsv"))
    only_library_errors(lambda: readers.read_crossfit_task(data, "t", split))
    shutil.rmtree(data)


@FUZZ
@given(content=st.one_of(tsv(), st.binary(max_size=120)))
def test_read_unifiedqa_tsv(base, content):
    folder = fresh(base)
    (folder / "q.tsv").write_bytes(content)
    task = only_library_errors(lambda: readers.read_unifiedqa_tsv(folder / "q.tsv"))
    assert task is None or isinstance(task, Task)
    shutil.rmtree(folder)


@settings(FUZZ, max_examples=300)
@given(question=st.one_of(st.text(max_size=40), st.lists(st.sampled_from(
    ["(A)", "(B)", "(C)", "(a)", "(b)", "(c)", "\\n", " ", "x", "yes", "("]), max_size=12).map("".join)))
def test_parse_unifiedqa_question_never_raises(question):
    parsed = readers.parse_unifiedqa_question(question)  # a pure function: no exception at all
    assert parsed is None or (isinstance(parsed[0], str) and isinstance(parsed[1], tuple))


MAPPING = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "input": st.one_of(st.sampled_from(["sentence", "input"]), st.lists(TEXT, max_size=2), JSON),
            "options": st.one_of(st.just("options"), JSON),
            "label_names": st.one_of(st.just(["busy", "calm"]), OPTIONS),
            "gold": st.one_of(st.sampled_from(["label", "gold", "output"]), JSON),
            "id": st.one_of(st.just("id"), JSON),
        },
    ),
    st.dictionaries(st.one_of(TEXT, st.integers()), JSON, max_size=3),
    JSON,
)


@FUZZ
@given(content=FILES, mapping=MAPPING, split=st.one_of(st.none(), SPLITS))
def test_read_columns_jsonl(base, content, mapping, split):
    folder = fresh(base)
    (folder / "rows.jsonl").write_bytes(content)
    only_library_errors(lambda: readers.read_columns(folder / "rows.jsonl", mapping, split=split))
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def saved_dataset(base) -> Path:
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b"])})
    part = datasets.Dataset.from_dict({"sentence": ["x y", "z"], "label": [0, 1]}, features=feats)
    datasets.DatasetDict({"train": part}).save_to_disk(str(base / "ds"))
    return base / "ds"


@settings(FUZZ, max_examples=25)
@given(mapping=MAPPING, split=st.one_of(st.none(), SPLITS), junk=st.binary(max_size=40))
def test_read_columns_datasets_folder(base, saved_dataset, mapping, split, junk):
    only_library_errors(lambda: readers.read_columns(saved_dataset, mapping, split=split))
    folder = fresh(base)  # a folder that is not a saved dataset
    (folder / "dataset_dict.json").write_bytes(junk)
    only_library_errors(lambda: readers.read_columns(folder, mapping, split=split))
    shutil.rmtree(folder)


CELL = st.sampled_from(["sentence", "label", "A", "B", "t", "0", "1", "2", "", '"', '"a,b"', "é", "NA", "../x"])
CSV = st.lists(st.lists(CELL, min_size=1, max_size=5).map(",".join), min_size=1, max_size=5).map("\n".join)
COLUMN_MAPPING = st.one_of(
    st.sampled_from(
        [
            {"input": "sentence", "options": ["A", "B"], "answer": "label"},
            {"input": "sentence", "labels": ["busy", "calm"], "answer": "label", "task": "t"},
            {"input": ["sentence", "A"], "options": "B", "answer": "label", "id": "t"},
        ]
    ),
    MAPPING,
)


@settings(FUZZ, max_examples=40)
@given(
    content=st.one_of(CSV.flatmap(damaged), FILES), mapping=COLUMN_MAPPING, suffix=st.sampled_from([".csv", ".jsonl"])
)
def test_read_column_data_files(base, content, mapping, suffix):
    """CSV and JSONL files of any bytes, read through a column mapping: a ColumnData or one library error."""
    folder = fresh(base)
    (folder / f"rows{suffix}").write_bytes(content)
    data = only_library_errors(lambda: readers.read_column_data(folder / f"rows{suffix}", mapping))
    assert data is None or all(isinstance(task, Task) for task in data.tasks.values())
    shutil.rmtree(folder)


# ------------------------------------------------------------------------------------------------ configs

FIELDS = {
    section: sorted(values)
    for section, values in ABMLLConfig().to_dict().items()
    if isinstance(values, dict)
}
VALUE = st.one_of(JSON, st.sampled_from([0, 1, -1, 0.5, 1e308, float("inf"), "abs", "first_order", "skip", "re:("]))
CONFIG = st.fixed_dictionaries(
    {},
    optional={
        **{
            section: st.one_of(
                st.dictionaries(st.sampled_from(names), VALUE, max_size=3),
                st.dictionaries(st.sampled_from(names), VALUE, max_size=3),
                st.dictionaries(st.one_of(st.sampled_from(names), TEXT, st.integers()), VALUE, max_size=2),
                JSON,
            )
            for section, names in FIELDS.items()
        },
        "seed": VALUE,
        "extra": JSON,
    },
)


@FUZZ
@given(
    data=st.one_of(CONFIG, JSON),
    dump=st.sampled_from(["json", "yaml"]),
    suffix=st.sampled_from([".json", ".yaml", ".yml", ""]),
    mutate=st.booleans(),
    raw=st.one_of(st.none(), st.binary(max_size=80), st.sampled_from([b"!!python/object/apply:os.system ['true']",
                                                                     b"a: [1", b"{", b"- 1\n- 2", b"\xff\xfe"])),
)
def test_config_load(base, data, dump, suffix, mutate, raw, request):
    folder = fresh(base)
    text = json.dumps(data) if dump == "json" else yaml.safe_dump(data)
    blob = raw if raw is not None else text.encode()
    if mutate and blob:
        blob = blob[: len(blob) // 2]
    path = folder / f"c{suffix}"
    path.write_bytes(blob)
    config = only_library_errors(lambda: ABMLLConfig.load(path))
    assert config is None or isinstance(config, ABMLLConfig)
    shutil.rmtree(folder)


@settings(FUZZ, max_examples=300)
@given(data=st.one_of(CONFIG, JSON))
def test_config_from_dict(data):
    config = only_library_errors(lambda: ABMLLConfig.from_dict(data, source="fuzz.json"))
    if config is not None:  # a config that validates round-trips
        assert ABMLLConfig.from_dict(config.to_dict()) == config


DOTTED = st.one_of(
    st.sampled_from([f"{s}.{f}" for s, names in FIELDS.items() for f in names] + ["seed"]),
    st.sampled_from(list(FIELDS)),
    TEXT,
    st.integers(),
)


@settings(FUZZ, max_examples=300)
@given(overrides=st.dictionaries(DOTTED, VALUE, max_size=3))
def test_config_override(overrides):
    only_library_errors(lambda: ABMLLConfig().override(overrides))


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def checkpoint(base) -> Path:
    theta = {"m.A_mu": torch.ones(2, 3), "m.B_mu": torch.zeros(3, 2)}
    return save_checkpoint(base / "ckpt", theta, ABMLLConfig(), {"method": "abmll", "model": "tiny"}, {}, {"step": 1})


@FUZZ
@given(
    name=st.sampled_from(sorted(["abmll_config.json", "prior.safetensors", "trainer_state.json",
                                 "trainer_state.safetensors", "manifest.json"])),
    content=st.one_of(st.binary(max_size=80), JSON.map(json.dumps).map(str.encode), CONFIG.map(
        lambda c: json.dumps({"config": c, "method": "abmll"}).encode())),
    fix_manifest=st.booleans(),
)
def test_load_checkpoint(base, checkpoint, name, content, fix_manifest):
    folder = fresh(base) / "ckpt"
    shutil.copytree(checkpoint, folder)
    (folder / name).write_bytes(content)
    if fix_manifest and name != MANIFEST:
        files = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
        (folder / MANIFEST).write_text(json.dumps({"files": {n: sha256(folder / n) for n in files}}))
    result = only_library_errors(lambda: load_checkpoint(folder, trainer=True))
    if not fix_manifest or name == MANIFEST:
        assert result is None or (folder / name).read_bytes() == (checkpoint / name).read_bytes()
    shutil.rmtree(folder.parent)


def test_config_file_name_is_the_one_fuzzed():
    assert CONFIG_FILE == "abmll_config.json"
