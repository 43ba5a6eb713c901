"""Settings without meta-training tasks (evaluate, compare --tasks; one clear error for a method that needs
them), where meta-training examples come from (the 16384-shot file, else the whole-task file, else the union
of the k-shot files, stated in the log and config.json), and `--k` below the files' k."""

from __future__ import annotations

import json
import random

import pytest
from conftest import PAIRS, error_line, family_task, invoke, save_tiny, write_families, write_unseen

from abmll.errors import DataError
from abmll.evaluation import load_episodes, support_set
from abmll.tasks.data import Task, example_key
from abmll.tasks.readers import read_setting, read_training_task, write_metaicl_task


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    save_tiny(root)
    data = root / "data"
    write_unseen(data, 8, 24, (100, 13))
    write_families(data, ["fam0"], 24)
    fam1 = family_task("fam1", PAIRS[2:4], 30, seed=1)  # only k-shot files, overlapping
    write_metaicl_task(Task("fam1", fam1.examples[:20]), data, 16, 100, "train")
    write_metaicl_task(Task("fam1", fam1.examples[10:30]), data, 16, 13, "dev")
    (root / "eval-only.json").write_text(json.dumps({"test": ["unseen"]}))
    (root / "empty-train.json").write_text(json.dumps({"train": [], "test": ["unseen"]}))
    return root


def test_a_setting_may_have_no_train_list_but_needs_test(env, tmp_path):
    assert read_setting(env / "eval-only.json") == {"train": [], "test": ["unseen"]}
    assert read_setting(env / "empty-train.json") == {"train": [], "test": ["unseen"]}
    (tmp_path / "s.json").write_text(json.dumps({"train": ["a"], "test": []}))
    with pytest.raises(DataError, match="field 'test': expected a non-empty list"):
        read_setting(tmp_path / "s.json")
    (tmp_path / "s.json").write_text(json.dumps({"train": ["a"]}))
    with pytest.raises(DataError, match="missing key 'test'"):
        read_setting(tmp_path / "s.json")


@pytest.mark.parametrize("setting", ["eval-only.json", "empty-train.json"])
def test_evaluate_accepts_a_setting_without_train_tasks(env, tmp_path, setting):
    result = invoke(
        "evaluate", "--method", "zero-shot", "--model", env / "tiny", "--data", env / "data", "--setting",
        env / setting, "--k", 8, "--seeds", "100,13", "--out", tmp_path / "ev", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert list(json.loads((tmp_path / "ev" / "results.json").read_text())["tasks"]) == ["unseen"]


def compare_args(env, out, *extra):
    return [
        "compare", "--model", env / "tiny", "--data", env / "data", "--preset", "smoke", "--seeds", "100,13",
        "--k", 8, "--out", out, *extra,
    ]  # fmt: skip


def test_compare_with_tasks_and_no_meta_training(env, tmp_path):
    result = invoke(*compare_args(env, tmp_path / "cmp", "--methods", "zero-shot", "--tasks", "unseen"))
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert list(res["methods"]["zero-shot"]["tasks"]) == ["unseen"]
    result = invoke(*compare_args(env, tmp_path / "eo", "--methods", "zero-shot", "--setting", env / "eval-only.json"))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "extra",
    [("--methods", "zero-shot,abmll", "--tasks", "unseen"), ("--methods", "lora", "--setting", "eval-only.json")],
)
def test_a_method_that_meta_trains_on_no_train_tasks_gets_one_error_naming_it(env, tmp_path, extra):
    extra = [str(env / e) if e.endswith(".json") else e for e in extra]
    line = error_line(invoke(*compare_args(env, tmp_path / "cmp", *extra)))
    name = extra[1].split(",")[-1]
    assert f"method(s) {name} meta-train" in line and "zero-shot" not in line.split("but")[0]
    assert not (tmp_path / "cmp" / "results.json").exists()
    line = error_line(
        invoke(
            "train", "--model", env / "tiny", "--data", env / "data", "--setting", env / "eval-only.json",
            "--method", "reptile", "--out", tmp_path / "tr", "--steps", 1, "--device", "cpu",
        )
    )  # fmt: skip
    assert "names no 'train' tasks" in line and "--method reptile" in line
    assert not (tmp_path / "tr" / "final").exists()
    both = error_line(invoke(*compare_args(env, tmp_path / "b", "--tasks", "unseen", "--setting", env / "x.json")))
    assert "--setting or --tasks, not both" in both


def test_training_examples_come_from_the_16384_file_else_the_union_of_k_shot_files(env, tmp_path):
    fam0, source0 = read_training_task(env / "data", "fam0")
    assert source0 == "fam0_16384_100_train.jsonl" and len(fam0) == 24
    fam1, source1 = read_training_task(env / "data", "fam1")
    assert "union of 2 k-shot files" in source1 and "fam1_16_100_train.jsonl" in source1
    assert len(fam1) == 30  # examples 0-19 and 10-29, each counted once
    assert len({example_key("fam1", ex) for ex in fam1.examples}) == 30

    out = tmp_path / "run"
    fast = tmp_path / "fast.json"
    fast.write_text(json.dumps({"inner": {"inner_steps": 1}, "meta": {"meta_batch_size": 2}, "lora": {"rank": 2}}))
    result = invoke(
        "train", "--model", env / "tiny", "--data", env / "data", "--tasks", "fam0,fam1", "--out", out,
        "--steps", 1, "--config", fast, "--set", "meta.support_size=4", "--set", "meta.query_size=4",
        "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "meta-training task fam0: 24 examples from fam0_16384_100_train.jsonl" in result.output
    assert "meta-training task fam1: 30 examples from the union of 2 k-shot files" in result.output
    recorded = json.loads((out / "config.json").read_text())["train_files"]
    assert recorded == {"fam0": source0, "fam1": source1}


def test_k_below_the_files_k_draws_k_of_the_support_examples_with_the_seed(env):
    full = {s: support_set(env / "data", "unseen", 8, s)[0] for s in (100, 13)}
    for seed in (100, 13):
        small, source = support_set(env / "data", "unseen", 3, seed)
        assert source == f"3 of unseen_8_{seed}_train.jsonl, drawn with seed {seed}"
        picked = random.Random(seed).sample(range(8), 3)
        assert [ex.id for ex in small] == [full[seed][i].id for i in picked]
        assert [ex.id for ex in support_set(env / "data", "unseen", 3, seed)[0]] == [ex.id for ex in small]
    episodes = load_episodes(env / "data", ["unseen"], 3, [100, 13])["unseen"]
    assert [len(ep.support) for ep in episodes] == [3, 3]
    assert episodes[0].meta["support_source"].startswith("3 of unseen_8_100_train.jsonl")
    with pytest.raises(DataError, match="no support file for task 'unseen' at k=9"):
        support_set(env / "data", "unseen", 9, 100)
