"""The paired comparison of the report: ABMLL minus each baseline on the same support sets."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_comparison

from abmll.comparison_report import _paired_markdown, paired_differences, paired_mean_differences
from abmll.errors import ConfigError
from abmll.methods.icl import SEPARATOR


def _results(per_seed: dict[str, list[tuple[int, float, float]]]) -> dict:
    return {
        "tasks": {
            task: {"per_seed": [{"seed": s, "accuracy": a, "ece": e} for s, a, e in rows]}
            for task, rows in per_seed.items()
        }
    }


def test_paired_differences_pair_by_seed_and_give_a_t_interval():
    results = {
        "lora": _results({"rte": [(100, 0.50, 0.20), (13, 0.60, 0.10), (21, 0.55, 0.15)]}),
        "abmll": _results({"rte": [(13, 0.70, 0.05), (100, 0.55, 0.10), (21, 0.60, 0.05)]}),
    }
    paired = paired_differences(results)
    acc = paired["lora"]["rte"]["accuracy"]
    # differences by seed: 100 → 0.05, 13 → 0.10, 21 → 0.05 (the order of the lists must not matter)
    assert acc["mean"] == pytest.approx(0.2 / 3)
    assert acc["n"] == 3 and acc["low"] < acc["mean"] < acc["high"]
    assert paired["lora"]["rte"]["ece"]["mean"] == pytest.approx((-0.10 - 0.05 - 0.10) / 3)
    table = _paired_markdown(paired, paired_mean_differences(results))
    assert "| lora | rte | +0.067 [" in table


def test_the_paired_mean_differences_the_macro_averages_seed_by_seed():
    results = {
        "lora": _results({"rte": [(100, 0.50, 0.20), (13, 0.60, 0.10)], "cb": [(100, 0.30, 0.30), (13, 0.40, 0.2)]}),
        "abmll": _results({"rte": [(13, 0.70, 0.05), (100, 0.55, 0.10)], "cb": [(100, 0.40, 0.10), (13, 0.40, 0.2)]}),
    }
    mean = paired_mean_differences(results)["lora"]
    # seed 100: ((0.55 - 0.50) + (0.40 - 0.30)) / 2 = 0.075; seed 13: ((0.70 - 0.60) + 0) / 2 = 0.05
    by_seed = {r["seed"]: r["difference"] for r in mean["accuracy"]["per_seed"]}
    assert by_seed == pytest.approx({100: 0.075, 13: 0.05})
    assert mean["accuracy"]["mean"] == pytest.approx(0.0625) and mean["accuracy"]["n"] == 2
    assert {r["seed"]: r["difference"] for r in mean["ece"]["per_seed"]} == pytest.approx({100: -0.15, 13: -0.025})
    table = _paired_markdown(paired_differences(results), paired_mean_differences(results))
    assert table.index("| lora | **mean** | +0.06") < table.index("| lora | rte |")
    assert paired_mean_differences({"lora": results["lora"]}) == {}


def test_paired_differences_cover_nll_brier_f1_and_auroc_where_defined():
    def cell(seed, nll, auroc):
        return {"seed": seed, "accuracy": 0.5, "macro_f1": 0.4, "ece": 0.1, "nll": nll, "brier": 0.3, "auroc": auroc}

    results = {
        "lora": {"tasks": {"rte": {"per_seed": [cell(100, 0.90, 0.60), cell(13, 0.80, 0.70)]},
                           "cb": {"per_seed": [cell(100, 1.20, 0.50), cell(13, 1.00, None)]}}},
        "abmll": {"tasks": {"rte": {"per_seed": [cell(100, 0.70, 0.65), cell(13, 0.70, None)]},
                            "cb": {"per_seed": [cell(100, 1.00, 0.70), cell(13, 1.10, 0.60)]}}},
    }  # fmt: skip
    paired = paired_differences(results)["lora"]
    assert paired["rte"]["nll"]["mean"] == pytest.approx((-0.2 - 0.1) / 2)
    assert paired["rte"]["auroc"]["n"] == 1 and paired["rte"]["auroc"]["mean"] == pytest.approx(0.05)  # seed 13: none
    assert paired["cb"]["auroc"]["n"] == 1 and paired["cb"]["auroc"]["mean"] == pytest.approx(0.2)
    assert paired["rte"]["brier"]["mean"] == pytest.approx(0.0)
    mean = paired_mean_differences(results)["lora"]
    # seed 100: ((0.7 - 0.9) + (1.0 - 1.2)) / 2 = -0.2; seed 13: ((0.7 - 0.8) + (1.1 - 1.0)) / 2 = 0
    assert {r["seed"]: r["difference"] for r in mean["nll"]["per_seed"]} == pytest.approx({100: -0.2, 13: 0.0})
    # AUROC: seed 100 over both tasks ((0.05 + 0.2) / 2); seed 13 has it on neither task for both methods
    assert {r["seed"]: r["difference"] for r in mean["auroc"]["per_seed"]} == pytest.approx({100: 0.125})
    table = _paired_markdown(paired_differences(results), paired_mean_differences(results))
    assert "| baseline | task | Δ accuracy | Δ macro-F1 | Δ ECE % | Δ NLL | Δ Brier | Δ AUROC |" in table
    assert "| lora | **mean** | +0.000 [" in table and "| +0.125 |" in table


def test_the_ablation_table_gives_each_variants_means_and_the_tuned_minus_it_by_seed():
    from abmll.comparison_report import ablation_markdown

    def results(acc: dict[int, float]) -> dict:
        rows = [{"seed": s, "accuracy": a, "ece": 0.1, "nll": 1.0 - a} for s, a in acc.items()]
        mean = sum(acc.values()) / len(acc)
        means = {"accuracy": mean, "ece": 0.1, "nll": 1.0 - mean, "auroc": None}
        return {"mean": means, "tasks": {"rte": {"per_seed": rows}}}

    tuned = results({100: 0.6, 13: 0.7})
    variants = {"beta-off": results({100: 0.5, 13: 0.6}), "samples-1": results({100: 0.6, 13: 0.7})}
    text = ablation_markdown(tuned, variants)
    assert "| tuned | 0.650 | 10.0 | 0.350 | — |" in text and "| beta-off | 0.550 | 10.0 | 0.450 | — |" in text
    assert "| beta-off | **mean** | +0.100 [+0.100, +0.100] |" in text  # tuned − beta-off, seed by seed
    assert "| samples-1 | **mean** | +0.000 [" in text and "tuned minus each baseline" in text


def test_the_summary_names_the_best_method_and_whom_abmll_beats_loses_to_or_ties_on_each_metric():
    from abmll.comparison_report import headline_markdown
    from abmll.metrics import mean_interval

    def results(acc: list[float], nll: list[float]) -> dict:
        rows = [{"seed": s, "accuracy": a, "nll": n} for s, a, n in zip((100, 13, 21), acc, nll, strict=True)]
        interval = {"accuracy": mean_interval(acc), "nll": mean_interval(nll)}
        return {"mean": {"accuracy": sum(acc) / 3, "nll": sum(nll) / 3, "auroc": None, "interval": interval},
                "tasks": {"rte": {"per_seed": rows}}}  # fmt: skip

    methods = {
        "zero-shot": results([0.40, 0.42, 0.41], [0.90, 0.91, 0.92]),  # abmll ahead on both
        "lora": results([0.58, 0.63, 0.60], [0.60, 0.61, 0.59]),  # level in accuracy, ahead of abmll in NLL
        "abmll": results([0.60, 0.61, 0.62], [0.70, 0.70, 0.70]),
    }
    text = headline_markdown({"methods": methods, "paired_mean": paired_mean_differences(methods)})
    assert "| abmll | 0.610 ± 0.025 | — | — | 0.700 ± 0.000 | — | — |" in text
    accuracy = "- **accuracy**: best mean `abmll`; `abmll` is ahead of `zero-shot`; not distinguishable from `lora`."
    assert accuracy in text
    assert "- **NLL**: best mean `lora`; `abmll` is ahead of `zero-shot`; behind `lora`." in text
    assert "AUROC" not in text.split("\n\n")[1]  # no line for a metric no method has
    assert "differences of the macro-averages over 3 seeds" in text
    first = {m: {**r, "tasks": {"rte": {"per_seed": r["tasks"]["rte"]["per_seed"][:1]}}} for m, r in methods.items()}
    one = headline_markdown({"methods": first, "paired_mean": paired_mean_differences(first)})
    assert "- **accuracy**: best mean `abmll`." in one and "One seed: no interval" in one  # no verdict
    alone = headline_markdown({"methods": {"lora": methods["lora"]}})  # without abmll: the best means only
    assert "- **accuracy**: best mean `lora`." in alone


def test_no_paired_section_without_abmll():
    assert paired_differences({"lora": _results({"rte": [(100, 0.5, 0.2)]})}) == {}


def _probabilities(folder) -> list[float]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return [p for row in rows for p in row["probs"]]


def test_abmll_icl_reuses_the_abmll_cell_and_predicts_as_if_it_had_trained_itself(tmp_path, caplog):
    from abmll.compare import run_comparison, shared_meta_training

    both = tmp_path / "both"
    run_comparison(tiny_comparison(tmp_path, ["abmll", "abmll-icl"]), both)
    cell = both / "abmll-icl" / "seed-100"
    assert not (cell / "train").exists()  # no second meta-training
    assert json.loads((cell / "results.json").read_text())["meta_trained_by"] == "abmll/seed-100"

    alone = tmp_path / "alone"  # no abmll cell to share: abmll-icl meta-trains its own θ
    run_comparison(tiny_comparison(tmp_path, ["abmll-icl"]), alone)
    assert (alone / "abmll-icl" / "seed-100" / "train" / "final").is_dir()
    assert "meta_trained_by" not in json.loads((alone / "abmll-icl" / "seed-100" / "results.json").read_text())
    assert _probabilities(cell) == pytest.approx(_probabilities(alone / "abmll-icl" / "seed-100"), abs=1e-6)

    comparison = tiny_comparison(tmp_path, ["abmll-icl"])
    same = comparison.config.override({"seed": 100})
    assert shared_meta_training(comparison, "abmll-icl", same, cell) == both / "abmll" / "seed-100" / "train" / "final"
    assert shared_meta_training(comparison, "lora", same, cell) is None  # lora shares no one's training
    other = comparison.config.override({"seed": 100, "objective.beta": 0.5})  # not how the abmll cell was trained
    with caplog.at_level("WARNING", logger="abmll.compare"):
        assert shared_meta_training(comparison, "abmll-icl", other, cell) is None
        assert shared_meta_training(comparison, "abmll-icl", same.override({"meta.meta_steps": 3}), cell) is None
        comparison.train_tasks = ["fam0"]
        assert shared_meta_training(comparison, "abmll-icl", same, cell) is None
        comparison.train_tasks, comparison.model = ["fam0", "fam1"], str(tmp_path / "another")
        assert shared_meta_training(comparison, "abmll-icl", same, cell) is None
    assert "differ" in caplog.text and all(w in caplog.text for w in ("config", "steps", "tasks", "model"))
    comparison.model = str(tmp_path / "tiny")
    caplog.clear()
    config_file = both / "abmll" / "seed-100" / "train" / "final" / "abmll_config.json"
    config_file.write_text(config_file.read_text().replace("abmll", "abmlx"))  # altered after training
    with caplog.at_level("WARNING", logger="abmll.compare"):
        assert shared_meta_training(comparison, "abmll-icl", same, cell) is None
    assert "checksum mismatch" in caplog.text and "abmll-icl meta-trains its own" in caplog.text


def test_theta_from_another_comparison_replaces_meta_training_and_predicts_as_training_would(tmp_path):
    """A study at another k (test time only) loads the θ of the same (method, seed) cells: no second meta-training,
    the same predictions as a comparison at that k that meta-trains its own; test-time fields may differ; a θ
    trained otherwise, or none, is an error that names it, before any cell runs."""
    from conftest import PAIRS, family_task

    from abmll.compare import run_comparison
    from abmll.tasks.data import Task
    from abmll.tasks.readers import write_metaicl_task

    methods = ["zero-shot", "abmll", "abmll-icl"]
    run_comparison(tiny_comparison(tmp_path, methods), tmp_path / "k4")
    unseen = family_task("unseen", PAIRS[::3], 12, seed=9).examples  # the same task at k = 2
    write_metaicl_task(Task("unseen", unseen[:2]), tmp_path / "data", 2, 100, "train")
    write_metaicl_task(Task("unseen", unseen[4:]), tmp_path / "data", 2, 100, "test")

    def at_k2(theta_from=None, **overrides):
        comparison = tiny_comparison(tmp_path, methods)
        comparison.k, comparison.theta_from = 2, theta_from
        comparison.config = comparison.config.override(overrides)
        return comparison

    run_comparison(at_k2(tmp_path / "k4"), tmp_path / "taken")
    run_comparison(at_k2(), tmp_path / "own")
    for method in ("abmll", "abmll-icl"):
        cell = tmp_path / "taken" / method / "seed-100"
        assert not (cell / "train").exists()  # θ loaded, not meta-trained again
        assert json.loads((cell / "results.json").read_text())["meta_trained_by"] == str(tmp_path / "k4" / "abmll"
                                                                                           / "seed-100")  # fmt: skip
        assert _probabilities(cell) == pytest.approx(_probabilities(tmp_path / "own" / method / "seed-100"), abs=1e-6)
    assert (tmp_path / "own" / "abmll" / "seed-100" / "train" / "final").is_dir()
    # test-time fields (K_test, S, the predictive's mode) may differ: an ablation of them shares the θ
    run_comparison(at_k2(tmp_path / "k4", **{"predict.samples": 3, "inner.test_inner_steps": 2}), tmp_path / "s3")
    assert not (tmp_path / "s3" / "abmll" / "seed-100" / "train").exists()
    assert _probabilities(tmp_path / "s3" / "abmll" / "seed-100") != pytest.approx(
        _probabilities(tmp_path / "taken" / "abmll" / "seed-100"), abs=1e-6
    )

    with pytest.raises(ConfigError, match=r"abmll/seed-100/train/final was not .*\['config'\] differ"):
        run_comparison(at_k2(tmp_path / "k4", **{"objective.beta": 0.5}), tmp_path / "other")
    with pytest.raises(ConfigError, match="holds no finished θ; run that comparison's abmll seed 100 cell first"):
        run_comparison(at_k2(tmp_path / "own" / "zero-shot"), tmp_path / "none")
    assert not any((tmp_path / "other").glob("*/seed-100/*")) and not any((tmp_path / "none").glob("*/seed-100/*"))


def test_cell_times_survive_resumed_sittings(tmp_path):
    from abmll.compare import run_comparison

    out = tmp_path / "out"
    first = run_comparison(tiny_comparison(tmp_path, ["zero-shot"]), out)
    (recorded,) = first["timings_s"].values()
    assert recorded == json.loads((out / "zero-shot" / "seed-100" / "results.json").read_text())["wall_s"] >= 0
    second = run_comparison(tiny_comparison(tmp_path, ["zero-shot", "icl"]), out, resume=True)
    assert second["timings_s"]["zero-shot/seed-100"] == recorded  # kept from the first sitting
    assert set(second["timings_s"]) == {"zero-shot/seed-100", "icl/seed-100"}
    assert "| icl/seed-100 |" in (out / "report.md").read_text()
    third = run_comparison(tiny_comparison(tmp_path, ["icl"]), out, resume=True)  # a subset keeps the others
    assert third["timings_s"] == second["timings_s"]
    cell = out / "zero-shot" / "seed-100" / "results.json"  # a cell from before cells recorded their time
    cell.write_text(json.dumps({k: v for k, v in json.loads(cell.read_text()).items() if k != "wall_s"}))
    fourth = run_comparison(tiny_comparison(tmp_path, ["zero-shot", "icl"]), out, resume=True)
    assert fourth["timings_s"] == second["timings_s"]  # from the previous report
    assert not (out / ".previous-results.json").exists()


def test_resume_refuses_a_kept_cell_that_was_run_with_another_config(tmp_path):
    """A finished cell is kept by --resume only when it was run with this comparison's config, k, query-set
    cap, model and test tasks; otherwise one error names the cell and each field, and nothing is rewritten."""
    from abmll.compare import run_comparison

    out = tmp_path / "out"
    run_comparison(tiny_comparison(tmp_path, ["zero-shot"]), out)
    before = (out / "results.json").read_bytes()
    changed = tiny_comparison(tmp_path, ["zero-shot", "icl"])
    changed.config = changed.config.override({"scoring.max_length": 64})
    changed.k = 3
    with pytest.raises(ConfigError) as info:
        run_comparison(changed, out, resume=True)
    message = str(info.value)
    assert message.startswith(f"{out / 'zero-shot' / 'seed-100'}: this finished cell was run with")
    assert "config scoring.max_length=128" in message and "config scoring.max_length=64" in message
    assert "k=4" in message and "k=3" in message and "remove that cell's folder" in message
    assert (out / "results.json").read_bytes() == before and not (out / "icl").exists()

    # A cell written before a config field existed is not refused for that field.
    cell = out / "zero-shot" / "seed-100" / "results.json"
    recorded = json.loads(cell.read_text())
    del recorded["config"]["scoring"]["max_length"]
    cell.write_text(json.dumps(recorded))
    again = tiny_comparison(tmp_path, ["zero-shot"])
    again.config = again.config.override({"scoring.max_length": 64})
    assert "zero-shot" in run_comparison(again, out, resume=True)["methods"]


def test_the_report_counts_the_demonstrations_that_fit(tmp_path):
    from abmll.compare import run_comparison
    from abmll.comparison_report import demonstrations_kept
    from abmll.evaluation import load_episodes
    from abmll.methods.icl import demonstrate
    from abmll.scoring import Scorer
    from abmll.tiny import tiny_llama

    comparison = tiny_comparison(tmp_path, ["zero-shot", "icl"])
    results = run_comparison(comparison, tmp_path / "out")
    (episode,) = load_episodes(comparison.data_dir, ["unseen"], 4, [100], 8)["unseen"]
    scorer = Scorer(tiny_llama()[1], comparison.config.scoring)
    prompts = demonstrate(episode.support, episode.query, scorer)
    counts = [p.input.count(SEPARATOR) for p in prompts]  # one separator before the query per demonstration
    assert results["demonstrations"]["unseen"] == {"mean": sum(counts) / 8, "min": min(counts), "max": max(counts)}
    assert "## Demonstrations in the prompt" in (tmp_path / "out" / "report.md").read_text()
    short = tiny_comparison(tmp_path, ["icl"])
    short.config = short.config.override({"scoring.max_length": 8})  # room for the query alone, if that
    assert demonstrations_kept(short)["unseen"] == {"mean": 0, "min": 0, "max": 0}
    assert run_comparison(tiny_comparison(tmp_path, ["zero-shot"]), tmp_path / "zs")["demonstrations"] == {}


def test_resumed_comparisons_into_one_folder_share_its_cells_out(tmp_path, caplog):
    """Two ``compare --resume`` runs into one folder are two workers: each runs the cells the other does not hold,
    abmll-icl waits for the abmll θ it shares, and only the run that finds every cell finished writes the report,
    the same one a single run writes. A comparison that is not resumed still refuses a folder in use."""
    import fcntl

    from abmll.compare import run_comparison
    from abmll.errors import RunLockedError

    methods = ["lora-task", "abmll", "abmll-icl"]
    alone = tmp_path / "alone"
    run_comparison(tiny_comparison(tmp_path, methods), alone)
    out = tmp_path / "shared"
    held = out / "abmll" / "seed-100"  # the other worker is meta-training abmll
    held.mkdir(parents=True)
    with open(held / ".lock", "w") as lock, caplog.at_level("WARNING", logger="abmll.compare"):
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_comparison(tiny_comparison(tmp_path, methods), out, resume=True) is None
        with open(out / ".lock") as folder:  # a worker holds the folder shared
            fcntl.flock(folder, fcntl.LOCK_SH | fcntl.LOCK_NB)
            with pytest.raises(RunLockedError):
                run_comparison(tiny_comparison(tmp_path, methods), tmp_path / "shared")
    assert (out / "lora-task" / "seed-100" / "results.json").is_file()
    assert not (held / "results.json").exists() and not (held / "train").exists()  # left to the other worker
    assert not (out / "abmll-icl" / "seed-100").exists()  # waits for abmll's θ rather than training its own
    assert not (out / "results.json").exists() and not (out / "report.md").exists()
    assert "abmll/seed-100, abmll-icl/seed-100" in caplog.text

    report = run_comparison(tiny_comparison(tmp_path, methods), out, resume=True)  # the lock is free: the rest
    assert report is not None and (out / "report.md").is_file()
    shared = json.loads((out / "abmll-icl" / "seed-100" / "results.json").read_text())
    assert shared["meta_trained_by"] == "abmll/seed-100"
    for method in methods:
        assert _probabilities(out / method / "seed-100") == _probabilities(alone / method / "seed-100")
