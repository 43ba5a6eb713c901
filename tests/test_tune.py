"""``abmll tune`` on the tiny Llama: a search per method on the meta-validation ("dev") tasks that never reads
a test task, resumable through its SQLite storage, and ``abmll compare --tuned`` applying and recording each
method's values; the refused inputs each give one line and exit status 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import PAIRS, family_task, invoke, ok, tiny_comparison

from abmll.config import ABMLLConfig
from abmll.methods import METHODS
from abmll.tasks.readers import write_metaicl_task
from abmll.tune import SEARCH_SPACE, read_tuned, search_space


def refused(result, *words: str) -> str:
    """The one error line of a refused command, which names each of ``words``."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict[str, Path]:
    """The tiny model and data of ``tiny_comparison`` (train: fam0, fam1; test: unseen) with a dev task, dev0,
    that has only a training file (as the built-in suite's dev tasks), and a setting naming the three groups."""
    root = tmp_path_factory.mktemp("tune")
    comparison = tiny_comparison(root, ["lora-task"])
    write_metaicl_task(family_task("dev0", PAIRS[1::3], 24, seed=5), comparison.data_dir, 16384, 100, "train")
    setting = root / "setting.json"
    setting.write_text(json.dumps({"train": ["fam0", "fam1"], "dev": ["dev0"], "test": ["unseen"]}))
    return {"data": comparison.data_dir, "setting": setting, "model": Path(comparison.model)}


def tune_args(study: dict[str, Path], out: Path, methods: str, trials: int, data: Path | None = None) -> list:
    return [
        "tune", "--methods", methods, "--trials", trials, "--preset", "smoke", "--data", data or study["data"],
        "--setting", study["setting"], "--model", study["model"], "--k", 4, "--device", "cpu", "--out", out,
    ]  # fmt: skip


def test_tune_writes_each_methods_best_values_and_never_reads_a_test_task(study, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(study["data"], data)
    shutil.rmtree(data / "unseen")  # the setting's test task: any read of it would fail
    out = tmp_path / "tune"
    result = invoke(*tune_args(study, out, "zero-shot,lora-task,structured-lora,abmll", 2, data))
    ok(result)
    assert "zero-shot: nothing to tune; skipped" in result.output

    tuned = json.loads((out / "tuned.json").read_text())
    assert read_tuned(out / "tuned.json") == {m: v for m, v in tuned.items() if m not in ("schema_version", "study")}
    assert tuned["study"]["methods"]["abmll"]["trials"] == 2  # complete or diverged: each trial counts
    tuned.pop("abmll", None)
    assert set(tuned) == {"schema_version", "study", "lora-task", "structured-lora"}
    for method in ("lora-task", "structured-lora"):
        assert set(tuned[method]) == set(search_space(method))
        for name, value in tuned[method].items():
            r = search_space(method)[name]
            assert r.low <= value <= r.high and isinstance(value, int) == r.integer, (method, name, value)
        record = tuned["study"]["methods"][method]
        assert record["trials"] == record["complete"] == 2 and record["best_nll"] > 0
        assert set(record["dev_tasks"]) == {"dev0"}
    assert tuned["study"]["dev_tasks"] == ["dev0"] and tuned["study"]["skipped"] == {"zero-shot": "nothing to tune"}
    assert tuned["study"]["seed"] == 0 and tuned["study"]["config"]["meta"]["meta_steps"] == 2
    assert tuned["study"]["versions"]["optuna"] == optuna.__version__ and "torch" in tuned["study"]["versions"]

    # the best values are those of the study's best trial in tune.db
    storage = f"sqlite:///{out / 'tune.db'}"
    best = optuna.load_study(study_name="structured-lora", storage=storage).best_trial
    assert best.params == tuned["structured-lora"]
    assert best.value == tuned["study"]["methods"]["structured-lora"]["best_nll"]
    log = (out / "progress.log").read_text()
    assert "tuning lora-task: trial 2/2 (100 %), trial 1: dev NLL" in log
    assert "tuning structured-lora: trial 1/2" in log


def test_resume_adds_trials_to_the_same_study(study, tmp_path):
    out = tmp_path / "tune"
    ok(invoke(*tune_args(study, out, "lora-task", 1)))
    first = optuna.load_study(study_name="lora-task", storage=f"sqlite:///{out / 'tune.db'}").trials[0].params

    refused(invoke(*tune_args(study, out, "lora-task", 3)), str(out / "tune.db"), "--resume")
    other = invoke(*tune_args(study, out, "lora-task", 3), "--resume", "--set", "scoring.max_length=64")
    refused(other, "lora-task", "config", "fixed")

    result = invoke(*tune_args(study, out, "lora-task", 3), "--resume")
    ok(result)
    assert "lora-task: resuming its study at 1 of 3 trials" in result.output
    trials = optuna.load_study(study_name="lora-task", storage=f"sqlite:///{out / 'tune.db'}").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert trials[0].params == first  # kept, not run again
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 3  # the resumed draws are new ones
    assert json.loads((out / "tuned.json").read_text())["study"]["methods"]["lora-task"]["trials"] == 3

    # A study written before a config field existed resumes: the field is not compared (as a comparison's cells).
    kept = optuna.load_study(study_name="lora-task", storage=f"sqlite:///{out / 'tune.db'}")
    setup = dict(kept.user_attrs["setup"])
    setup["config"]["lora"].pop("sigma_max")
    kept.set_user_attr("setup", setup)
    ok(invoke(*tune_args(study, out, "lora-task", 4), "--resume"))


def test_a_diverged_trial_counts_and_an_interrupted_one_is_run_again(study, tmp_path, monkeypatch):
    import abmll.tune
    from abmll.errors import NonFiniteError

    real, calls = abmll.tune.objective, []

    def objective(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise NonFiniteError("meta-step 1: the outer loss is nan")
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(abmll.tune, "objective", objective)
    out = tmp_path / "tune"
    assert invoke(*tune_args(study, out, "lora-task", 2)).exit_code == 130  # interrupted in its second trial
    storage = f"sqlite:///{out / 'tune.db'}"
    optuna.load_study(study_name="lora-task", storage=storage).ask()  # a trial left running, as by kill -9
    result = invoke(*tune_args(study, out, "lora-task", 2), "--resume")
    ok(result)
    assert "resuming its study at 1 of 2 trials" in result.output  # the diverged trial counts, the others not
    trials = optuna.load_study(study_name="lora-task", storage=storage).trials
    fail, complete = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE
    assert [t.state for t in trials] == [fail, fail, fail, complete]
    assert trials[0].user_attrs["outcome"].startswith("diverged: meta-step 1")
    record = json.loads((out / "tuned.json").read_text())["study"]["methods"]["lora-task"]
    assert (record["trials"], record["complete"], record["diverged"], record["best_trial"]) == (2, 1, 1, 3)


def _probabilities(cell: Path) -> list[float]:
    rows = [json.loads(line) for line in (cell / "predictions.jsonl").read_text().splitlines()]
    return [p for row in rows for p in row["probs"]]


def test_compare_applies_and_records_each_methods_tuned_values(study, tmp_path):
    values = {
        "lora-task": {"inner.test_inner_lr": 0.5, "inner.test_inner_steps": 3},
        "structured-lora": {"inner.test_inner_lr": 0.01},
    }
    tuned_file = tmp_path / "tuned.json"
    tuned_file.write_text(json.dumps({"schema_version": 1, **values, "study": {"trials": 2}}))
    common = [
        "compare", "--methods", "lora-task,structured-lora", "--preset", "smoke", "--data", study["data"],
        "--setting", study["setting"], "--model", study["model"], "--k", 4, "--device", "cpu",
    ]  # fmt: skip
    ok(invoke(*common, "--out", tmp_path / "plain"))
    ok(invoke(*common, "--out", tmp_path / "tuned", "--tuned", tuned_file))

    pooled = json.loads((tmp_path / "tuned" / "results.json").read_text())
    assert pooled["tuned"] == str(tuned_file)
    report = (tmp_path / "tuned" / "report.md").read_text()
    assert "`lora-task`: `inner.test_inner_lr=0.5`, `inner.test_inner_steps=3`" in report
    assert "`structured-lora`: `inner.test_inner_lr=0.01`" in report
    for method, own in values.items():
        cell = tmp_path / "tuned" / method / "seed-100"
        recorded = json.loads((cell / "results.json").read_text())
        assert recorded["tuned"] == own and pooled["methods"][method]["tuned"] == own
        for name, value in own.items():
            section, key = name.split(".")
            assert recorded["config"][section][key] == value
        plain = tmp_path / "plain" / method / "seed-100"
        assert "tuned" not in json.loads((plain / "results.json").read_text())
        assert _probabilities(cell) != pytest.approx(_probabilities(plain), abs=1e-6)
    train_config = tmp_path / "tuned" / "structured-lora" / "seed-100" / "train" / "config.json"
    assert json.loads(train_config.read_text())["tuned"] == values["structured-lora"]
    # --resume keeps the cells run with these tuned values, and refuses them to a comparison without them
    ok(invoke(*common, "--out", tmp_path / "tuned", "--tuned", tuned_file, "--resume"))
    refused(invoke(*common, "--out", tmp_path / "tuned", "--resume"), "config inner.test_inner_lr=0.5")


def test_abmll_icl_takes_abmlls_tuned_values_and_shares_its_meta_training(study, tmp_path, caplog):
    values = {"objective.beta": 3e-6, "inner.test_inner_lr": 0.02}
    tuned_file = tmp_path / "tuned.json"
    tuned_file.write_text(json.dumps({"abmll": values}))
    out = tmp_path / "cmp"
    ok(invoke(
        "compare", "--methods", "abmll,abmll-icl", "--preset", "smoke", "--data", study["data"], "--setting",
        study["setting"], "--model", study["model"], "--k", 4, "--device", "cpu", "--out", out, "--tuned", tuned_file,
    ))  # fmt: skip
    for method in ("abmll", "abmll-icl"):
        recorded = json.loads((out / method / "seed-100" / "results.json").read_text())
        assert recorded["tuned"] == values and recorded["config"]["objective"]["beta"] == 3e-6
    assert not (out / "abmll-icl" / "seed-100" / "train" / "final").exists()  # θ is abmll's, not its own
    assert "meta-trains its own" not in caplog.text
    # another comparison with the same tuned values takes both θ from this one (--theta-from)
    again = [
        "compare", "--methods", "abmll,abmll-icl", "--preset", "smoke", "--data", study["data"], "--setting",
        study["setting"], "--model", study["model"], "--k", 4, "--device", "cpu", "--tuned", tuned_file,
    ]  # fmt: skip
    ok(invoke(*again, "--out", tmp_path / "taken", "--theta-from", out))
    assert json.loads((tmp_path / "taken" / "results.json").read_text())["theta_from"] == str(out)
    assert not (tmp_path / "taken" / "abmll" / "seed-100" / "train").exists()
    refused(invoke(*again, "--out", tmp_path / "lost", "--theta-from", tmp_path / "nowhere"), "--theta-from",
            str(tmp_path / "nowhere"), "no such comparison folder")  # fmt: skip
    assert not (tmp_path / "lost").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ({"lora-tsk": {"inner.test_inner_lr": 0.1}}, ["unknown method 'lora-tsk'"]),
        ({"lora-task": {"inner.test_inner_lr_": 0.1}}, ["lora-task", "unknown field 'inner.test_inner_lr_'"]),
        ({"lora-task": {"meta.outer_lr": 0.1}}, ["lora-task", "'meta.outer_lr' is not one lora-task tunes"]),
        ({"lora-task": {"inner.test_inner_lr": -1}}, ["lora-task", "inner.test_inner_lr", "-1"]),
    ],
)
def test_compare_refuses_a_tuned_file_naming_an_unknown_method_or_field(study, tmp_path, content, words):
    tuned_file = tmp_path / "tuned.json"
    tuned_file.write_text(json.dumps(content))
    out = tmp_path / "cmp"
    result = invoke(
        "compare", "--methods", "lora-task", "--preset", "smoke", "--data", study["data"], "--setting",
        study["setting"], "--model", study["model"], "--k", 4, "--out", out, "--tuned", tuned_file,
    )  # fmt: skip
    refused(result, str(tuned_file), *words)
    assert not out.exists()


def test_compare_refuses_the_values_of_an_unfinished_study(study, tmp_path):
    """A tuned.json written while a study had run 3 of its 8 trials (abmll tune pools every study of its folder,
    finished or not): comparing that method is refused before anything runs, and so are a method with no study
    and methods tuned with unequal trials; methods whose studies are finished (or share one, as abmll-icl abmll's)
    are not, and a hand-written file without a study record is not checked."""
    record = {"trials": 8, "methods": {"lora-task": {"trials": 8}, "abmll": {"trials": 8}, "maml": {"trials": 3}}}
    values = {"lora-task": {"inner.test_inner_lr": 0.5}, "maml": {"inner.test_inner_lr": 0.1}}
    tuned_file = tmp_path / "tuned.json"
    tuned_file.write_text(json.dumps({"schema_version": 1, **values, "abmll": {}, "study": record}))
    common = [
        "compare", "--preset", "smoke", "--data", study["data"], "--setting", study["setting"], "--model",
        study["model"], "--k", 4, "--device", "cpu", "--tuned", tuned_file,
    ]  # fmt: skip
    out = tmp_path / "cmp"
    refused(invoke(*common, "--methods", "lora-task,maml", "--out", out), str(tuned_file), "study of maml",
            "3 of its 8 trials", "--resume")  # fmt: skip
    assert not out.exists()
    record["methods"]["abmll"]["trials"] = 5
    tuned_file.write_text(json.dumps({"schema_version": 1, **values, "abmll": {}, "study": record}))
    refused(invoke(*common, "--methods", "abmll-icl", "--out", out), "study of abmll", "5 of its 8", "abmll-icl")
    refused(invoke(*common, "--methods", "lora-task,structured-lora", "--out", out), "no study of structured-lora",
            "untuned")  # fmt: skip
    record["methods"]["abmll"]["trials"] = 10  # resumed to 10 trials: more than lora-task's 8
    tuned_file.write_text(json.dumps({"schema_version": 1, **values, "abmll": {}, "study": record}))
    refused(invoke(*common, "--methods", "lora-task,abmll", "--out", out), "unequal trials", "lora-task 8", "abmll 10")
    record["methods"]["maml"]["trials"] = None
    tuned_file.write_text(json.dumps({"schema_version": 1, **values, "abmll": {}, "study": record}))
    refused(invoke(*common, "--methods", "maml", "--out", out), "study of maml ran None of its 8 trials")
    assert not out.exists()
    ok(invoke(*common, "--methods", "zero-shot,lora-task", "--out", out))
    tuned_file.write_text(json.dumps({"schema_version": 1, **values}))  # by hand: no study record
    ok(invoke(*common, "--methods", "maml", "--out", tmp_path / "by-hand"))


def test_tune_refuses_a_setting_without_dev_tasks_or_with_a_test_task_among_them(study, tmp_path):
    no_dev = tmp_path / "no-dev.json"
    no_dev.write_text(json.dumps({"train": ["fam0", "fam1"], "test": ["unseen"]}))
    out = tmp_path / "tune"
    args = tune_args(study, out, "lora-task", 1)
    args[args.index("--setting") + 1] = no_dev
    refused(invoke(*args), str(no_dev), "no 'dev' tasks", "meta-validation")
    leaky = tmp_path / "leaky.json"
    leaky.write_text(json.dumps({"train": ["fam0"], "dev": ["unseen"], "test": ["unseen"]}))
    args[args.index("--setting") + 1] = leaky
    refused(invoke(*args), str(leaky), "'dev' and 'test'", "unseen")
    assert not out.exists()
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"train": ["fam0"], "dev": ["nodev"], "test": ["unseen"]}))
    args[args.index("--setting") + 1] = missing
    refused(invoke(*args), "nodev")
    assert not (out / "tune.db").exists() and not (out / "tuned.json").exists()  # no study was started


def test_the_search_space_covers_every_method_with_ranges_its_config_accepts():
    assert set(SEARCH_SPACE) == set(METHODS)
    spaces = {method: search_space(method) for method in METHODS}
    assert not spaces["zero-shot"] and not spaces["icl"]
    for method, space in spaces.items():
        if METHODS[method].name not in ("zero-shot", "icl"):
            assert {"inner.test_inner_lr", "inner.test_inner_steps"} <= set(space), method
        for name, r in space.items():
            for value in (r.low, r.high):
                ABMLLConfig().override({name: int(value) if r.integer else value})  # a field, and a valid value
    assert {"objective.beta", "lora.sigma_init", "inner.sigma_lr", "predict.samples"} <= set(spaces["abmll"])
    # Reptile's own settings declare their ranges (metadata "search") next to the method
    assert {"reptile.epsilon", "reptile.inner_steps"} <= set(spaces["reptile"]) - set(SEARCH_SPACE["reptile"])
    doc = (Path(__file__).resolve().parent.parent / "docs" / "TUNING.md").read_text(encoding="utf-8")
    for method, space in spaces.items():  # the documented tables name every method and field
        assert f"`{method}`" in doc and all(f"| `{name}` |" in doc for name in space), method


def test_abmll_icl_shares_an_abmll_theta_that_meta_validation_stopped_early(study, tmp_path, caplog):
    out = tmp_path / "cmp"
    ok(invoke(
        "compare", "--methods", "abmll,abmll-icl", "--preset", "smoke", "--data", study["data"], "--setting",
        study["setting"], "--model", study["model"], "--k", 4, "--device", "cpu", "--out", out,
        "--set", "meta.meta_steps=8", "--set", "meta.validate_every=1", "--set", "meta.patience=1",
    ))  # fmt: skip
    log = (out / "abmll" / "seed-100" / "train" / "log.jsonl").read_text().splitlines()
    assert 1 < len(log) < 8  # stopped early by its meta-validation
    assert not (out / "abmll-icl" / "seed-100" / "train").exists()
    shared = json.loads((out / "abmll-icl" / "seed-100" / "results.json").read_text())
    assert shared["meta_trained_by"] == "abmll/seed-100" and "not shared" not in caplog.text
