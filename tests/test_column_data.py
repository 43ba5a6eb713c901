"""`--data` with `--columns`: a datasets folder (save_to_disk), a parquet, CSV or JSONL file (or a folder of
them) read through a column mapping. A task's examples serve as a `{task}.jsonl` file would: support sets are
drawn from them with the seed, query sets are disjoint across seeds; meta-training reads all of them. A
malformed row is one error that names the file (or split) and the row or line; train, evaluate and compare run
on such data."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import PAIRS, error_line, family_task, invoke, save_tiny

from abmll.errors import ConfigError, DataError
from abmll.evaluation import load_episodes
from abmll.tasks.data import Task, example_key
from abmll.tasks.readers import parse_column_mapping, read_column_data, read_training_task, write_metaicl_task

SEEDS = [100, 13]
MAPPING = {"input": "question", "options": "choices", "answer": "label", "id": "qid"}


def tasks() -> dict[str, Task]:
    return {
        "fam0": family_task("fam0", PAIRS[:2], 16, seed=0),
        "fam1": family_task("fam1", PAIRS[2:4], 16, seed=1),
        "unseen": family_task("unseen", PAIRS[::3], 24, seed=9),
    }


def records(task: Task, answer: str = "index") -> list[dict]:
    """One row per example: question, choices (a list), label (the gold index, or its text), subject, qid."""
    return [
        {
            "question": ex.input,
            "choices": list(ex.options),
            "label": ex.gold if answer == "index" else ex.answer,
            "subject": task.name,
            "qid": ex.id,
        }
        for ex in task.examples
    ]


def columnar(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}


def content(examples) -> list[tuple]:
    return [(ex.input, ex.options, ex.gold) for ex in examples]


def test_datasets_folder_one_task_per_split_draws_episodes_as_a_whole_task_file(tmp_path):
    source = tasks()
    splits = {name: datasets.Dataset.from_dict(columnar(records(task))) for name, task in source.items()}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "ds"))
    data = read_column_data(tmp_path / "ds", MAPPING)
    assert sorted(data.tasks) == ["fam0", "fam1", "unseen"] and data.sources["unseen"] == "ds[unseen]"
    assert content(data.task("unseen").examples) == content(source["unseen"].examples)
    # the same examples as a {task}.jsonl file give the same support and query sets, seed for seed
    write_metaicl_task(source["unseen"], tmp_path / "metaicl", 24, 100, "train")
    (tmp_path / "metaicl" / "unseen" / "unseen_24_100_train.jsonl").rename(tmp_path / "metaicl/unseen/unseen.jsonl")
    from_columns = load_episodes(data, ["unseen"], 4, SEEDS, 6)["unseen"]
    from_file = load_episodes(tmp_path / "metaicl", ["unseen"], 4, SEEDS, 6)["unseen"]
    for a, b in zip(from_columns, from_file, strict=True):
        assert [ex.id for ex in a.support] == [ex.id for ex in b.support]
        assert [ex.id for ex in a.query] == [ex.id for ex in b.query] and len(a.query) == 6
        assert a.meta["support_source"] == f"4 drawn from ds[unseen] with seed {a.seed}"
    keys = [{example_key("unseen", ex) for ex in ep.query} for ep in from_columns]
    assert not keys[0] & keys[1]
    with pytest.raises(DataError, match=r"no task 'rte' in this data \(its tasks, one per file or split: fam0, fam1"):
        load_episodes(data, ["rte"], 4, SEEDS)

    bad = records(source["unseen"])
    bad[3]["label"] = 5
    datasets.DatasetDict({"unseen": datasets.Dataset.from_dict(columnar(bad))}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError) as info:
        read_column_data(tmp_path / "bad", MAPPING)
    assert str(info.value).startswith(f"{tmp_path / 'bad'}[unseen]: row 3: field 'label': gold index 5 out of range")


def test_parquet_with_a_task_column_and_text_answers(tmp_path):
    source = tasks()
    rows = [row for task in source.values() for row in records(task, answer="text")]
    datasets.Dataset.from_dict(columnar(rows)).to_parquet(str(tmp_path / "all.parquet"))
    mapping = {**MAPPING, "task": "subject"}
    data = read_column_data(tmp_path / "all.parquet", mapping)
    assert {name: len(task) for name, task in data.tasks.items()} == {"fam0": 16, "fam1": 16, "unseen": 24}
    fam0, where = read_training_task(data, "fam0")
    assert where == "rows of all.parquet with subject = 'fam0'"
    assert content(fam0.examples) == content(source["fam0"].examples)
    assert [ex.id for ex in fam0.examples] == [ex.id for ex in source["fam0"].examples]

    with pytest.raises(DataError) as info:
        read_column_data(tmp_path / "all.parquet", {**mapping, "answer": "gold"})
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'all.parquet'}: no column 'gold' (the column mapping's answer column)")
    assert "['question', 'choices', 'label', 'subject', 'qid']" in message
    rows[20]["label"] = "maybe"
    datasets.Dataset.from_dict(columnar(rows)).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet: row 20: field 'label': answer 'maybe' is not one of the"):
        read_column_data(tmp_path / "bad.parquet", mapping)


def test_csv_with_one_column_per_option(tmp_path):
    lines = [
        "question,A,B,C,label",
        "Pick the fruit.,pear,brick,cloud,0",
        '"Pick the tool, please.",river,hammer,,hammer',  # two options: the empty last cell is dropped
        "Pick the colour.,seven,teal,north,2",
        "Pick the number.,NA,None,7,7",  # every cell is text: 'NA' and 'None' are options, '7' an option's text
    ]
    (tmp_path / "quiz.csv").write_text("\n".join(lines) + "\n")
    mapping = parse_column_mapping("input=question,options=A+B+C,answer=label")
    assert mapping == {"input": "question", "options": ["A", "B", "C"], "answer": "label"}
    data = read_column_data(tmp_path / "quiz.csv", mapping)
    quiz = data.task("quiz")
    assert content(quiz.examples) == [
        ("Pick the fruit.", ("pear", "brick", "cloud"), 0),
        ("Pick the tool, please.", ("river", "hammer"), 1),
        ("Pick the colour.", ("seven", "teal", "north"), 2),
        ("Pick the number.", ("NA", "None", "7"), 2),
    ]
    assert [ex.id for ex in quiz.examples] == ["quiz:0", "quiz:1", "quiz:2", "quiz:3"]
    assert data.sources == {"quiz": "quiz.csv"}

    for row, why in [
        ("Pick the pet.,cat,,dog,0", "field 'B': expected an option's text, got an empty cell"),
        ("Pick the pet.,cat,dog,,3", "field 'label': gold index 3 out of range for 2 options"),
    ]:
        (tmp_path / "bad.csv").write_text("\n".join([*lines[:3], row]) + "\n")
        with pytest.raises(DataError) as info:
            read_column_data(tmp_path / "bad.csv", mapping)
        assert str(info.value).startswith(f"{tmp_path / 'bad.csv'}: row 2: {why}")


def test_folder_of_jsonl_files_one_task_per_file(tmp_path):
    source = tasks()
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for name, task in source.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in records(task)))
    data = read_column_data(folder, MAPPING)
    assert sorted(data.tasks) == ["fam0", "fam1", "unseen"] and data.sources["fam1"] == "fam1.jsonl"
    assert content(data.task("fam1").examples) == content(source["fam1"].examples)
    episodes = load_episodes(data, ["unseen"], 4, SEEDS)["unseen"]
    assert [len(ep.support) for ep in episodes] == [4, 4] and all(len(ep.query) >= 8 for ep in episodes)

    rows = records(source["unseen"])
    rows[6]["label"] = 2  # two options: index 2 is outside them
    (folder / "unseen.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    with pytest.raises(DataError) as info:
        read_column_data(folder, MAPPING)
    assert str(info.value).startswith(f"{folder / 'unseen.jsonl'}: line 7: field 'label': gold index 2 out of range")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("input=question,choices", "'choices' is not KEY=COLUMN"),
        ("input=question,answers=label", "unknown key 'answers'"),
        ("input=q,input=p,answer=label", "key 'input' is given twice"),
        ("input=q,options=A++B,answer=label", "an empty name"),
    ],
)
def test_a_bad_column_mapping_is_one_error(text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_column_mapping(text)


# ------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("columns")
    save_tiny(root)
    rows = [row for task in tasks().values() for row in records(task)]
    datasets.Dataset.from_dict(columnar(rows)).to_parquet(str(root / "all.parquet"))
    (root / "setting.json").write_text(json.dumps({"train": ["fam0", "fam1"], "test": ["unseen"]}))
    return root


COLUMNS = "input=question,options=choices,answer=label,task=subject,id=qid"


def test_train_evaluate_and_compare_read_a_parquet_file(env, tmp_path):
    data = ["--data", env / "all.parquet", "--columns", COLUMNS]
    fast = ["--set", "meta.support_size=4", "--set", "meta.query_size=4", "--set", "meta.meta_batch_size=2",
            "--set", "lora.rank=2", "--set", "inner.inner_steps=1"]  # fmt: skip
    result = invoke(
        "train", "--model", env / "tiny", *data, "--tasks", "fam0,fam1", "--steps", 1, *fast,
        "--out", tmp_path / "run", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "meta-training task fam0: 16 examples from rows of all.parquet with subject = 'fam0'" in result.output
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["columns"] == parse_column_mapping(COLUMNS)
    assert recorded["train_files"]["fam1"] == "rows of all.parquet with subject = 'fam1'"

    result = invoke(
        "evaluate", "--checkpoint", tmp_path / "run" / "final", *data, "--tasks", "unseen", "--k", 4,
        "--seeds", "100,13", "--query-size", 6, "--out", tmp_path / "ev", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    drawn = res["query_sets"]["unseen"]
    assert drawn["source"] == "rows of all.parquet with subject = 'unseen'" and drawn["pool"] == 24
    assert [r["support"] for r in drawn["per_seed"]] == [
        f"4 drawn from rows of all.parquet with subject = 'unseen' with seed {s}" for s in (100, 13)
    ]
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    ids = {s: {r["id"] for r in rows if r["seed"] == s} for s in (100, 13)}
    assert len(ids[100]) == len(ids[13]) == 6 and not ids[100] & ids[13]

    result = invoke(
        "compare", "--methods", "zero-shot,lora", "--preset", "smoke", "--model", env / "tiny", *data,
        "--setting", env / "setting.json", "--seeds", 100, "--k", 4, "--out", tmp_path / "cmp", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert sorted(res["methods"]) == ["lora", "zero-shot"] and list(res["methods"]["lora"]["tasks"]) == ["unseen"]
    assert res["columns"] == parse_column_mapping(COLUMNS)
    trained = json.loads((tmp_path / "cmp" / "lora" / "seed-100" / "train" / "config.json").read_text())
    assert trained["tasks"] == ["fam0", "fam1"]


def test_command_line_errors_name_the_file_and_row(env, tmp_path):
    rows = [row for task in tasks().values() for row in records(task)]
    rows[40]["label"] = 9
    datasets.Dataset.from_dict(columnar(rows)).to_parquet(str(tmp_path / "bad.parquet"))
    evaluate = ["evaluate", "--method", "zero-shot", "--model", env / "tiny", "--tasks", "unseen", "--k", 4,
                "--seeds", 100, "--out", tmp_path / "ev", "--device", "cpu"]  # fmt: skip
    line = error_line(invoke(*evaluate, "--data", tmp_path / "bad.parquet", "--columns", COLUMNS))
    assert f"{tmp_path / 'bad.parquet'}: row 40: field 'label': gold index 9 out of range" in line
    assert not (tmp_path / "ev" / "results.json").exists()
    line = error_line(invoke(*evaluate, "--data", env / "all.parquet"))
    assert "is not a folder; it is read with --columns" in line
    line = error_line(invoke(*evaluate, "--data", env / "all.parquet", "--columns", "input=question,label"))
    assert "--columns" in line and "'label' is not KEY=COLUMN" in line
    line = error_line(invoke(*evaluate, "--data", env / "all.parquet", "--columns", "input=question,answer=label"))
    assert "needs 'options'" in line
    line = error_line(
        invoke("compare", "--methods", "zero-shot", "--data", env / "all.parquet", "--columns", COLUMNS,
               "--out", tmp_path / "cmp", "--model", env / "tiny", "--device", "cpu")  # fmt: skip
    )
    assert "name its tasks with --setting or --tasks" in line
