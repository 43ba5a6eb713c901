"""Task-file readers: committed synthetic fixtures, writer/reader round trips, and a table of malformed inputs
that must each raise one DataError naming the file and line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from abmll.errors import DataError
from abmll.tasks import (
    Example,
    Task,
    load_metaicl_tasks,
    make_episode,
    parse_unifiedqa_question,
    read_columns,
    read_crossfit_task,
    read_crossfit_tsv,
    read_metaicl_file,
    read_metaicl_split_files,
    read_metaicl_task,
    read_setting,
    read_unifiedqa_tsv,
    write_jsonl,
    write_metaicl_task,
    write_tsv,
    write_unifiedqa_tsv,
)

FIX = Path(__file__).parent / "fixtures"
COLUMNS = {"input": "sentence", "label_names": ["busy", "calm"], "gold": "label"}


def _classification() -> Task:
    labels = ("no", "yes")
    rows = [
        ("Is the kettle blue?", 1),
        ("Can a spoon fly?", 0),
        ("Does the owl read?", 1),
        ("Is rain dry?", 0),
    ]
    return Task(
        "toy_cls", [Example(q, labels, g, f"toy_cls:{i}") for i, (q, g) in enumerate(rows)], "classification"
    )


def _multiple_choice() -> Task:
    exs = [
        Example("Pick the fruit.", ("pear", "brick", "cloud"), 0, "m0"),
        Example("Pick the tool.\nIt has a handle.", ("river", "hammer"), 1, "m1"),
        Example("Pick the colour.", ("seven", "maybe", "teal", "north"), 2, "m2"),
    ]
    return Task("toy_mc", exs)


# ---------------------------------------------------------------------------------------- committed fixtures


def test_metaicl_fixtures():
    train = read_metaicl_task(FIX / "metaicl", "toy_sentiment", k=4, seed=100, split="train")
    assert train.kind == "classification" and train.labels == ("negative", "positive")
    assert [ex.gold for ex in train.examples] == [1, 0, 1, 0]
    assert train.examples[2].id == "toy_sentiment:4"  # blank line 3 skipped, numbering kept
    splits = read_metaicl_split_files(FIX / "metaicl", "toy_sentiment", k=4, seed=100)
    assert sorted(splits) == ["test", "train"] and len(splits["test"]) == 3
    mc = read_metaicl_task(FIX / "metaicl", "toy_choice", k=4, seed=100)
    assert mc.kind == "multiple_choice" and [ex.id for ex in mc.examples] == ["c1", "c2", "c3", "c4"]
    assert mc.examples[2].answer == "in a drawer"
    # plain {task}.jsonl fallback + options from _configs/{task}.json
    plain = read_metaicl_task(FIX / "metaicl", "toy_nolabels", k=16, seed=13)
    assert plain.labels == ("normal", "odd") and [ex.gold for ex in plain.examples] == [1, 0, 1]
    setting = read_setting(FIX / "settings" / "toy.json")
    tasks = load_metaicl_tasks(FIX / "metaicl", setting["train"], k=4, seed=100)
    assert list(tasks) == ["toy_choice", "toy_nolabels"]


def test_tsv_and_column_fixtures():
    topic = read_crossfit_task(FIX / "crossfit", "toy_topic")
    assert topic.labels == ("business", "sports") and [ex.gold for ex in topic.examples] == [0, 1, 1, 0]
    uqa = read_unifiedqa_tsv(FIX / "unifiedqa" / "toy_mc.tsv")
    assert [ex.gold for ex in uqa.examples] == [0, 0, 1]
    assert uqa.examples[0].options == ("spoons", "thunder", "tuesdays")
    assert uqa.examples[2].input == "who painted the fence?\nmira and tomas had one brush; tomas kept it."
    cols = read_columns(FIX / "columns" / "toy.jsonl", COLUMNS)
    assert cols.kind == "classification" and [ex.gold for ex in cols.examples] == [1, 0, 1]
    two = read_columns(FIX / "columns" / "toy.jsonl", COLUMNS | {"input": ["topic", "sentence"]})
    assert two.examples[0].input == "sea\nThe lighthouse hummed a lullaby."


def test_parse_unifiedqa_variants():
    assert parse_unifiedqa_question("Pick one (A) red (B) blue") == ("Pick one", ("red", "blue"))
    assert parse_unifiedqa_question("q? \\n (a) x (b) y (c) z")[1] == ("x", "y", "z")
    # a parenthesised letter inside an option that is not the next marker stays in the text
    assert parse_unifiedqa_question("q \\n (a) plan (c) later (b) now")[1] == ("plan (c) later", "now")
    assert parse_unifiedqa_question("no options here") is None


# -------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("make", [_classification, _multiple_choice])
def test_metaicl_round_trip(tmp_path, make):
    task = make()
    path = write_metaicl_task(task, tmp_path, k=4, seed=13, split="dev")
    assert path == tmp_path / task.name / f"{task.name}_4_13_dev.jsonl"
    back = read_metaicl_task(tmp_path, task.name, k=4, seed=13, split="dev")
    assert back.examples == task.examples and back.kind == task.kind and back.labels == task.labels


def test_crossfit_tsv_round_trip(tmp_path):
    task = _classification()
    task.labels = ("yes", "no")  # a non-sorted label order survives through config.json
    task.examples = [Example(ex.input, ("yes", "no"), 1 - ex.gold, ex.id) for ex in task.examples]
    write_tsv(task, tmp_path / "toy_cls" / "toy_cls_train.tsv")
    back = read_crossfit_task(tmp_path, "toy_cls", split="train")
    assert [(ex.input, ex.options, ex.gold) for ex in back.examples] == [
        (ex.input, ex.options, ex.gold) for ex in task.examples
    ]
    assert back.examples[0].id == "toy_cls:1"
    write_tsv(task, tmp_path / "bare" / "toy_cls_test.tsv", config=False)  # labels become the sorted outputs
    assert read_crossfit_tsv(tmp_path / "bare" / "toy_cls_test.tsv").labels == ("no", "yes")


def test_unifiedqa_round_trip(tmp_path):
    task = _multiple_choice()
    back = read_unifiedqa_tsv(write_unifiedqa_tsv(task, tmp_path / "mc.tsv"), name="toy_mc")
    assert [(ex.input, ex.options, ex.gold) for ex in back.examples] == [
        (ex.input, ex.options, ex.gold) for ex in task.examples
    ]


def test_columns_round_trip(tmp_path):
    task = _multiple_choice()
    mapping = {"input": "input", "options": "options", "gold": "gold", "id": "id"}
    back = read_columns(write_jsonl(task, tmp_path / "mc.jsonl"), mapping, name="toy_mc")
    assert back.examples == task.examples


def test_columns_datasets_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    task = _multiple_choice()
    records = {
        "id": [ex.id for ex in task.examples],
        "question": [ex.input for ex in task.examples],
        "choices": [list(ex.options) for ex in task.examples],
        "answer": [ex.answer for ex in task.examples],  # gold given as the answer string
    }
    datasets.Dataset.from_dict(records).save_to_disk(str(tmp_path / "single"))
    mapping = {"input": "question", "options": "choices", "gold": "answer", "id": "id"}
    assert read_columns(tmp_path / "single", mapping).examples == task.examples
    cls = _classification()
    feats = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(cls.labels))}
    )
    part = datasets.Dataset.from_dict(
        {"text": [ex.input for ex in cls.examples], "label": [ex.gold for ex in cls.examples]}, features=feats
    )
    datasets.DatasetDict({"train": part, "test": part}).save_to_disk(str(tmp_path / "dict"))
    back = read_columns(tmp_path / "dict", {"input": "text", "gold": "label"}, name="toy_cls", split="test")
    assert back.labels == cls.labels and [ex.gold for ex in back.examples] == [ex.gold for ex in cls.examples]
    assert back.examples[0].id == "toy_cls:0"


# ------------------------------------------------------------------------------------------- malformed input

OPTS = ["negative", "positive"]


def _line(**fields) -> str:
    return json.dumps(
        {"task": "t", "input": "A kite read a book.", "output": "positive", "options": OPTS} | fields
    )


def _jsonl(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


META = "t/t_16_100_train.jsonl"


def _meta(d: Path):
    return read_metaicl_task(d, "t")


def _k_too_large(d: Path):
    return make_episode(read_metaicl_task(d, "t"), k=5, seed=1)


def _setting(d: Path):
    return read_setting(d / "s.json")


def _crossfit(d: Path):
    return read_crossfit_task(d, "c")


def _uqa(d: Path):
    return read_unifiedqa_tsv(d / "u.tsv")


def _cols(mapping: dict, path: str = "c.jsonl"):
    return lambda d: read_columns(d / path, mapping)


def _arrow_missing_column(d: Path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a b"], "label": [0]}).save_to_disk(str(d / "arrow_ds"))
    return read_columns(d / "arrow_ds", {"input": "sentence", "label_names": OPTS, "gold": "label"})


def _arrow_dict_no_split(d: Path):
    datasets = pytest.importorskip("datasets")
    part = datasets.Dataset.from_dict({"text": ["a b"], "label": [0]})
    datasets.DatasetDict({"train": part}).save_to_disk(str(d / "arrow_dict"))
    return read_columns(d / "arrow_dict", {"input": "text", "label_names": OPTS, "gold": "label"})


MALFORMED = [
    # (id, files {relative path: text or bytes}, call, text the message must contain, line or None)
    (
        "missing-field",
        {META: _jsonl(_line(), '{"task": "t", "input": "x", "options": ["a", "b"]}')},
        _meta,
        "'output'",
        2,
    ),
    ("empty-task", {META: ""}, _meta, META.split("/")[1], None),
    ("blank-lines-only", {META: "\n  \n\n"}, _meta, "empty file", None),
    ("answer-not-among-options", {META: _jsonl(_line(), _line(output="neutral"))}, _meta, "'neutral'", 2),
    (
        "duplicate-ids",
        {META: _jsonl(_line(id="a"), _line(id="b"), _line(id="a"))},
        _meta,
        "also on line 1",
        3,
    ),
    ("id-wrong-type", {META: _jsonl(_line(id=["a"]))}, _meta, "'id'", 1),
    ("k-larger-than-task", {META: _jsonl(_line(), _line(output="negative"))}, _k_too_large, "k = 5", None),
    ("non-utf8", {META: _jsonl(_line()).encode() + b'{"input": "caf\xe9"}\n'}, _meta, "UTF-8", 2),
    ("truncated-json", {META: _jsonl(_line(), _line())[:-20] + "\n"}, _meta, "JSON", 2),
    (
        "no-options-anywhere",
        {META: _jsonl('{"task": "t", "input": "x", "output": "yes"}')},
        _meta,
        "_configs/t.json",
        1,
    ),
    ("line-not-object", {META: _jsonl(_line(), '["a", "b"]')}, _meta, "JSON object", 2),
    ("options-not-list", {META: _jsonl(_line(options="negative,positive"))}, _meta, "list of strings", 1),
    ("options-not-strings", {META: _jsonl(_line(options=["positive", 3]))}, _meta, "list of strings", 1),
    ("options-duplicates", {META: _jsonl(_line(options=["positive", "positive"]))}, _meta, "duplicate", 1),
    ("one-option", {META: _jsonl(_line(options=["positive"]))}, _meta, "at least 2", 1),
    ("input-wrong-type", {META: _jsonl(_line(), _line(input=7))}, _meta, "'input'", 2),
    (
        "config-bad-options",
        {META: _jsonl('{"input": "x", "output": "a"}'), "t/config.json": '{"options": "a"}'},
        _meta,
        "config.json",
        None,
    ),
    (
        "config-not-json",
        {META: _jsonl(_line()), "t/config.json": '{"options": ["a",\n "b"'},
        _meta,
        "config.json",
        2,
    ),
    ("missing-task-folder", {"other/other.jsonl": _jsonl(_line())}, _meta, "no folder for task 't'", None),
    ("missing-k-seed-file", {"t/t_16_13_test.jsonl": _jsonl(_line())}, _meta, "t_16_13_test.jsonl", None),
    ("setting-overlap", {"s.json": '{"train": ["a", "b"], "test": ["b", "c"]}'}, _setting, "['b']", None),
    ("setting-not-json", {"s.json": "train: [a]\n"}, _setting, "invalid JSON", 1),
    ("setting-not-object", {"s.json": '["a", "b"]'}, _setting, "JSON object", None),
    ("setting-missing-test", {"s.json": '{"train": ["a"]}'}, _setting, "'test'", None),
    (
        "setting-duplicate-task",
        {"s.json": '{"train": ["a", "a"], "test": ["b"]}'},
        _setting,
        "duplicate",
        None,
    ),
    ("setting-empty-name", {"s.json": '{"train": ["a", ""], "test": ["b"]}'}, _setting, "'train'", None),
    ("tsv-without-tab", {"c/c_train.tsv": "good\tyes\nno tab here\n"}, _crossfit, "exactly one tab", 2),
    ("tsv-two-tabs", {"c/c_train.tsv": "a\tb\tc\n"}, _crossfit, "exactly one tab", 1),
    ("tsv-empty-output", {"c/c_train.tsv": "good\tyes\nbad\t \n"}, _crossfit, "empty output", 2),
    ("tsv-one-label-no-config", {"c/c_train.tsv": "a\tyes\nb\tyes\n"}, _crossfit, "config.json", None),
    (
        "tsv-output-not-in-config",
        {"c/c_train.tsv": "a\tyes\nb\tmaybe\n", "c/config.json": '{"options": ["yes", "no"]}'},
        _crossfit,
        "'maybe'",
        2,
    ),
    (
        "tsv-missing-split",
        {"c/c_train.tsv": "a\tyes\n"},
        lambda d: read_crossfit_task(d, "c", "dev"),
        "c_train.tsv",
        None,
    ),
    (
        "uqa-no-options",
        {"u.tsv": "what is up? \\n (a) sky (b) sea\tsky\nwhat is down?\tground\n"},
        _uqa,
        "no answer options",
        2,
    ),
    ("uqa-answer-not-among", {"u.tsv": "what is up? \\n (a) sky (b) sea\tcloud\n"}, _uqa, "'cloud'", 1),
    ("uqa-one-option", {"u.tsv": "what is up? \\n (a) sky\tsky\n"}, _uqa, "at least 2", 1),
    ("uqa-non-utf8", {"u.tsv": b"q \\n (a) x (b) y\tx\n\xff\xfe\tx\n"}, _uqa, "UTF-8", 2),
    (
        "columns-missing-column",
        {"c.jsonl": '{"sentence": "x", "label": 0}\n{"text": "y", "label": 1}\n'},
        _cols({"input": "sentence", "label_names": OPTS, "gold": "label"}),
        "'sentence'",
        2,
    ),
    (
        "columns-gold-out-of-range",
        {"c.jsonl": '{"s": "x", "label": 0}\n{"s": "y", "label": 2}\n'},
        _cols({"input": "s", "label_names": OPTS, "gold": "label"}),
        "out of range",
        2,
    ),
    (
        "columns-gold-not-option",
        {"c.jsonl": '{"s": "x", "label": "meh"}\n'},
        _cols({"input": "s", "label_names": OPTS, "gold": "label"}),
        "'meh'",
        1,
    ),
    (
        "columns-gold-wrong-type",
        {"c.jsonl": '{"s": "x", "label": 0.5}\n'},
        _cols({"input": "s", "label_names": OPTS, "gold": "label"}),
        "'label'",
        1,
    ),
    (
        "columns-no-options",
        {"c.jsonl": '{"s": "x", "label": 0}\n'},
        _cols({"input": "s", "gold": "label"}),
        "label_names",
        None,
    ),
    (
        "columns-bad-mapping",
        {"c.jsonl": '{"s": "x", "label": 0}\n'},
        _cols({"inputs": "s", "gold": "label"}),
        "column mapping",
        None,
    ),
    ("columns-arrow-missing-column", {}, _arrow_missing_column, "'sentence'", None),
    ("columns-arrow-dict-no-split", {}, _arrow_dict_no_split, "split=", None),
    ("columns-not-a-dataset", {"notds/readme.txt": "hello\n"}, _cols(COLUMNS, "notds"), "save_to_disk", None),
]


def _materialise(root: Path, files: dict) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("files,call,needle,line", [pytest.param(*c[1:], id=c[0]) for c in MALFORMED])
def test_malformed_raises_one_data_error(tmp_path, files, call, needle, line):
    _materialise(tmp_path, files)
    with pytest.raises(DataError) as info:
        call(tmp_path)
    msg = str(info.value)
    assert type(info.value) is DataError
    assert str(tmp_path) in msg  # the file (or folder) at fault is named
    assert needle in msg
    if line is not None:
        assert f"line {line}:" in msg
    assert len(MALFORMED) >= 20


def test_missing_file_lists_existing_files(tmp_path):
    _materialise(tmp_path, {"t/t_16_13_test.jsonl": _jsonl(_line()), "t/t_16_21_test.jsonl": _jsonl(_line())})
    with pytest.raises(DataError, match=r"t_16_100_train\.jsonl.*t_16_13_test\.jsonl', 't_16_21_test\.jsonl"):
        read_metaicl_task(tmp_path, "t")


def test_k_too_large_error_names_file_and_sizes(tmp_path):
    _materialise(tmp_path, {META: _jsonl(_line(), _line(output="negative"))})
    with pytest.raises(
        DataError, match=r"t_16_100_train\.jsonl: task 't': k = 5 is larger than the task \(2"
    ):
        _k_too_large(tmp_path)


@pytest.mark.parametrize(
    "kind,reader",
    [
        ("metaicl", lambda p: read_metaicl_file(p, name="t")),
        ("crossfit", read_crossfit_tsv),
        ("unifiedqa", read_unifiedqa_tsv),
        ("setting", read_setting),
        ("columns", lambda p: read_columns(p, COLUMNS)),
    ],
)
def test_only_data_error_escapes_on_corrupted_bytes(tmp_path, kind, reader):
    """Seeded random byte corruptions of valid files: every read returns a Task or raises DataError only."""
    source = {
        "metaicl": FIX / "metaicl" / "toy_choice" / "toy_choice_4_100_train.jsonl",
        "crossfit": FIX / "crossfit" / "toy_topic" / "toy_topic_train.tsv",
        "unifiedqa": FIX / "unifiedqa" / "toy_mc.tsv",
        "setting": FIX / "settings" / "toy.json",
        "columns": FIX / "columns" / "toy.jsonl",
    }[kind]
    data = source.read_bytes()
    rng = random.Random(kind)
    junk = b'{}[]",:\t\n\\ (a)(B)0\x80\xff\xc3'
    path = tmp_path / "f"
    for _ in range(150):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(buf) + 1)
            op = rng.random()
            if op < 0.4 and i < len(buf):
                del buf[i : i + rng.randint(1, 8)]
            elif op < 0.8:
                buf[i:i] = bytes(rng.choice(junk) for _ in range(rng.randint(1, 3)))
            else:
                buf = buf[:i]
        path.write_bytes(bytes(buf))
        try:
            result = reader(path)
        except DataError as e:
            assert type(e) is DataError and str(path) in str(e)
        else:
            assert isinstance(result, (Task, dict))
