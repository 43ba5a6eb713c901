"""Query sets of an evaluation are disjoint across its seeds, never hold a seed's own support examples, are a
pure function of the data, the seed list and the cap (not of which cells ran), and a pool too small for them
is said: a warning naming the task, its pool and what each seed gets, recorded in results.json and results.md."""

from __future__ import annotations

import json
import random

import pytest
from conftest import PAIRS, family_task
from typer.testing import CliRunner

from abmll.cli import app
from abmll.errors import DataError
from abmll.evaluation import load_episodes, query_sets, query_warnings
from abmll.tasks.data import Task, example_key
from abmll.tasks.readers import write_metaicl_task
from abmll.tiny import tiny_llama

SEEDS = [100, 13, 21]


def keys(examples) -> set[str]:
    return {example_key("unseen", ex) for ex in examples}


@pytest.fixture
def overlapping(tmp_path):
    """MetaICL-style per-seed files whose test files overlap heavily (each 30 of the same 40 examples) and
    overlap the other seeds' support sets."""
    task = family_task("unseen", PAIRS[::3], 40, seed=9)
    for seed in SEEDS:
        chosen = random.Random(seed).sample(task.examples, 34)
        write_metaicl_task(Task("unseen", chosen[:4]), tmp_path, 4, seed, "train")
        write_metaicl_task(Task("unseen", chosen[4:]), tmp_path, 4, seed, "test")
    return tmp_path


@pytest.fixture
def whole(tmp_path):
    """One whole-task file: supports are drawn from it, so they lie inside the query pool."""
    task = family_task("unseen", PAIRS[::3], 60, seed=9)
    write_metaicl_task(task, tmp_path, 4, 100, "test")
    (tmp_path / "unseen" / "unseen_4_100_test.jsonl").rename(tmp_path / "unseen" / "unseen.jsonl")
    return tmp_path


@pytest.mark.parametrize("layout", ["overlapping", "whole"])
def test_query_sets_are_disjoint_across_seeds_and_from_their_own_support(layout, request):
    data = request.getfixturevalue(layout)
    episodes = load_episodes(data, ["unseen"], 4, SEEDS)["unseen"]
    queries = [keys(ep.query) for ep in episodes]
    for i in range(len(queries)):
        for j in range(i + 1, len(queries)):
            assert not queries[i] & queries[j], (SEEDS[i], SEEDS[j])
    for ep in episodes:
        assert len(ep.support) == 4 and not keys(ep.support) & keys(ep.query)
    # every example of the pool is used by one seed or is that seed's own support example
    pool = episodes[0].meta["pool"]
    assert pool - 3 * 4 <= sum(len(q) for q in queries) <= pool


def test_a_seeds_query_set_does_not_depend_on_which_cells_run_nor_on_line_order(whole):
    all_at_once = {ep.seed: ep for ep in load_episodes(whole, ["unseen"], 4, SEEDS, 10)["unseen"]}
    (alone,) = load_episodes(whole, ["unseen"], 4, [13], 10, all_seeds=SEEDS)["unseen"]
    assert [ex.id for ex in alone.query] == [ex.id for ex in all_at_once[13].query]
    assert [ex.id for ex in alone.support] == [ex.id for ex in all_at_once[13].support]
    again = load_episodes(whole, ["unseen"], 4, SEEDS, 10)["unseen"]
    assert [[ex.id for ex in ep.query] for ep in again] == [[ex.id for ex in all_at_once[s].query] for s in SEEDS]
    with pytest.raises(DataError, match="not one of the evaluation's seeds"):
        load_episodes(whole, ["unseen"], 4, [7], 10, all_seeds=SEEDS)
    with pytest.raises(DataError, match="repeat"):
        load_episodes(whole, ["unseen"], 4, [13, 13], 10)


def test_the_shuffle_is_by_content_not_line_order(overlapping):
    before = {ep.seed: keys(ep.query) for ep in load_episodes(overlapping, ["unseen"], 4, SEEDS, 8)["unseen"]}
    for seed in SEEDS:
        path = overlapping / "unseen" / f"unseen_4_{seed}_test.jsonl"
        lines = path.read_text().splitlines()
        random.Random(seed).shuffle(lines)
        path.write_text("\n".join(lines) + "\n")
    after = {ep.seed: keys(ep.query) for ep in load_episodes(overlapping, ["unseen"], 4, SEEDS, 8)["unseen"]}
    assert after == before and all(len(q) == 8 for q in after.values())


def test_a_small_pool_is_warned_about_and_recorded(whole):
    episodes = load_episodes(whole, ["unseen"], 4, SEEDS, 30)  # 60 examples: parts of 20 less the support
    record = query_sets(episodes, 30)["unseen"]
    assert record["pool"] == 60 and record["parts"] == 3 and record["requested"] == 30 and record["disjoint"]
    assert not record["enough"] and [r["seed"] for r in record["per_seed"]] == SEEDS
    assert all(r["query"] < 30 for r in record["per_seed"])
    (line,) = query_warnings({"unseen": record})
    assert "task 'unseen'" in line and "60 examples" in line and "3 disjoint query sets of 30" in line
    for r in record["per_seed"]:
        assert f"seed {r['seed']}: {r['query']}" in line
    enough = query_sets(load_episodes(whole, ["unseen"], 4, SEEDS, 10), 10)
    assert enough["unseen"]["enough"] and query_warnings(enough) == []
    with pytest.raises(DataError, match="leaves seed .* no query example"):
        load_episodes(whole, ["unseen"], 4, list(range(40)), 5)  # 40 parts of 1 or 2: some hold only support


def test_evaluate_warns_and_records_the_query_sets(whole, tmp_path):
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "ev"
    argv = [
        "evaluate", "--method", "zero-shot", "--model", tmp_path / "tiny", "--data", whole, "--tasks", "unseen",
        "--k", 4, "--seeds", "100,13,21", "--query-size", 30, "--out", out, "--device", "cpu",
    ]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "task 'unseen'" in warning[0] and "60 examples" in warning[0]
    res = json.loads((out / "results.json").read_text())
    assert res["query_size"] == 30 and res["query_sets"]["unseen"]["enough"] is False
    per_seed = {r["seed"]: r["query"] for r in res["query_sets"]["unseen"]["per_seed"]}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for seed, n in per_seed.items():
        assert len([r for r in rows if r["seed"] == seed]) == n
    ids = {seed: {r["id"] for r in rows if r["seed"] == seed} for seed in SEEDS}
    assert not ids[100] & ids[13] and not ids[100] & ids[21] and not ids[13] & ids[21]
    text = (out / "results.md").read_text()
    assert "disjoint across the 3 seed(s)" in text and "too few for 3 disjoint query sets of 30" in text


def test_compare_cells_take_their_part_of_the_full_seed_list(whole, tmp_path):
    from conftest import tiny_comparison

    from abmll.compare import run_comparison

    comparison = tiny_comparison(tmp_path, ["zero-shot"])
    comparison.data_dir, comparison.test_tasks = whole, ["unseen"]
    comparison.seeds, comparison.query_size = [100, 13], 8
    out = tmp_path / "cmp"
    results = run_comparison(comparison, out)
    episodes = load_episodes(whole, ["unseen"], 4, [100, 13], 8)["unseen"]
    expected = {ep.seed: [ex.id for ex in ep.query] for ep in episodes}
    for seed in (100, 13):
        rows = [json.loads(line) for line in (out / "zero-shot" / f"seed-{seed}" / "predictions.jsonl").open()]
        assert [r["id"] for r in rows] == expected[seed]
    assert not set(expected[100]) & set(expected[13])
    record = results["query_sets"]["unseen"]
    assert record["enough"] and [r["seed"] for r in record["per_seed"]] == [100, 13]
    assert "disjoint across the 2 seed(s)" in (out / "report.md").read_text()
