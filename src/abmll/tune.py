"""``abmll tune``: a hyperparameter search per method on the meta-validation ("dev") tasks of a setting, never
on its test tasks (docs/TUNING.md).

Every method gets the same number of trials and the same budget (a preset of :data:`abmll.compare.BUDGETS`
with ``--set``), and a trial is scored by one number: the mean query NLL over the dev tasks' episodes (one
per task and support-set seed, drawn by :func:`abmll.evaluation.load_episodes`) after the method's
meta-training on the setting's train tasks with the trial's config (none for methods that learn nothing across
tasks). Optuna's TPE sampler, seeded, proposes the values from :data:`SEARCH_SPACE`; each method is one study
(named after it) in ``OUT/tune.db`` (SQLite), so a search continues with ``resume``.

``OUT/tuned.json`` holds each method's best values and the study's record::

    {"schema_version": 1,
     METHOD: {FIELD: VALUE, ...}, ...,
     "study": {"objective", "preset", "model", "data", "setting", "train_tasks", "dev_tasks", "k", "seeds",
               "query_size", "seed", "config", "fixed", "trials", "methods": {METHOD: {"trials", "complete",
               "diverged", "best_trial", "best_nll", "search_space", "wall_s"}}, "skipped", "versions"}}

``abmll compare --tuned OUT/tuned.json`` applies each method's values on top of the comparison's config
(:func:`read_tuned`); a file written by hand needs only the ``METHOD: {FIELD: VALUE}`` entries.

About 530 lines on purpose: the search space, the objective, the study's storage and resume, and the reader
and writer of ``tuned.json`` are the parts of one command that must agree with each other.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abmll.assets import portable_path
from abmll.checkpoint import read_json_object, versions, write_json_atomic
from abmll.config import ABMLLConfig
from abmll.errors import ConfigError, NonFiniteError
from abmll.methods import METHODS, get_method, method_config
from abmll.progress import Reporter
from abmll.tracking import flatten
from abmll.validation import dev_episodes

logger = logging.getLogger("abmll.tune")

TUNED_SCHEMA_VERSION = 1
TUNE_DB = "tune.db"
TUNED_FILE = "tuned.json"
#: Keys of ``tuned.json`` that are not methods.
RESERVED = ("schema_version", "study")
OBJECTIVE = "mean query NLL over the dev tasks' episodes (one per task and support-set seed)"


@dataclass(frozen=True)
class Range:
    """A searched interval ``[low, high]`` of one config field: an integer or a real, on a log scale or not."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def suggest(self, trial: Any, name: str) -> int | float:
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "log": self.log, "integer": self.integer}


# The searched ranges, in one place (docs/TUNING.md gives the reasons).
_TEST_TIME = {  # every method that adapts by gradient steps at test time
    "inner.test_inner_lr": Range(1e-3, 1.0, log=True),  # α at test time
    "inner.test_inner_steps": Range(1, 16, integer=True),  # K_test
}
_INNER_LR = {"inner.inner_lr": Range(1e-3, 1.0, log=True)}  # α during meta-training
_OUTER_LR = {"meta.outer_lr": Range(1e-4, 1e-1, log=True)}  # AdamW on θ's mean factors
_META = {**_INNER_LR, **_OUTER_LR, "inner.inner_steps": Range(1, 5, integer=True)}  # K
_BAYES = {
    "inner.inner_steps": Range(2, 5, integer=True),  # K ≥ 2: the KL's gradient is 0 at φ⁰ = θ (METHOD.md §8)
    "objective.beta": Range(1e-10, 1e-5, log=True),  # β: the paper's 5e-10 and 1e-7, the default 1e-6
    "lora.sigma_init": Range(1e-4, 1e-2, log=True),  # σ_init; the KL's curvature in μφ is β/σθ²
    "inner.sigma_lr": Range(0.1, 100.0, log=True),  # α_σ
    "meta.sigma_lr": Range(1e-4, 1e-1, log=True),  # AdamW on θ's σ factors
    "predict.samples": Range(1, 16, log=True, integer=True),  # S
}
#: Per built-in method, the shared config fields searched and their ranges. A field a method does not read is left
#: out: ``lora`` meta-trains by pooled steps at ``meta.outer_lr`` (no inner loop); Reptile's outer step and K are its
#: own settings (not ``meta.outer_lr``, ``inner.inner_steps``); the deterministic methods predict with the mean ΔW
#: (no β, σ or S). ``zero-shot`` and ``icl`` have nothing to tune. A method's own settings add the ranges their
#: fields declare (:func:`settings_ranges`); :func:`search_space` gives the whole space of any registered method.
SEARCH_SPACE: dict[str, dict[str, Range]] = {
    "zero-shot": {},
    "icl": {},
    "lora-task": {**_TEST_TIME},
    "lora": {**_TEST_TIME, **_OUTER_LR},
    "structured-lora": {**_TEST_TIME, **_META},
    "maml": {**_TEST_TIME, **_META},
    "reptile": {**_TEST_TIME, **_INNER_LR},
    "abmll": {**_TEST_TIME, **_META, **_BAYES},
    "abmll-icl": {**_TEST_TIME, **_META, **_BAYES},
}


def settings_ranges(method: str) -> dict[str, Range]:
    """The searched ranges a method's own settings declare: each field with ``metadata["search"]`` (the keyword
    arguments of :class:`Range`), as ``"{method}.{field}"``."""
    settings = get_method(method).__dict__.get("settings_type")
    if settings is None:
        return {}
    return {
        f"{method}.{f.name}": Range(**f.metadata["search"])
        for f in dataclasses.fields(settings)
        if "search" in f.metadata
    }


def search_space(method: str) -> dict[str, Range]:
    """Every field searched for ``method``: :data:`SEARCH_SPACE`'s entry of a built-in method, or for another
    registered one the template's (the test-time pair, and for a method that meta-learns the inner and outer step
    sizes and K, with the Bayesian fields where it is Bayesian); plus its own settings' ranges."""
    cls = get_method(method)
    if method in SEARCH_SPACE:
        base = SEARCH_SPACE[method]
    elif not cls.meta_learns:
        base = dict(_TEST_TIME) if cls.adapted else {}
    else:
        base = {**_TEST_TIME, **_META, **(_BAYES if cls.bayesian else {})}
    return {**base, **settings_ranges(method)}


@dataclass
class Tuning:
    """What to tune, on which tasks, with which budget."""

    methods: list[str]
    data_dir: Path
    setting: Path
    train_tasks: list[str]
    dev_tasks: list[str]
    seeds: list[int]
    #: The config every trial starts from (the preset's budget with ``--set``).
    config: ABMLLConfig
    trials: int
    k: int = 16
    query_size: int | None = None
    model: str | None = None
    device: str | None = None
    #: Seeds the TPE sampler and every trial's meta-training (θ's initialisation, meta-batches, weight samples).
    seed: int = 0
    preset: str | None = None
    #: Fields held at the config's value (set with ``--set``): left out of the search.
    fixed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from abmll.compare import check_methods

        check_methods(self.methods, self.seeds, "tuning")
        if self.trials < 1:
            raise ConfigError(f"--trials {self.trials} is invalid: expected an integer ≥ 1")
        if self.k < 1:
            raise ConfigError(f"--k {self.k} is invalid: expected an integer ≥ 1")
        learners = [m for m in self.methods if METHODS[m].meta_learns and self.space(m)]
        if learners and not self.train_tasks and self.config.meta.meta_steps > 0:
            others = ", ".join(sorted(m for m, c in METHODS.items() if not c.meta_learns))
            raise ConfigError(
                f"{self.setting}: names no 'train' tasks, but {', '.join(learners)} meta-train on them; tune only "
                f"methods that do not meta-train ({others})"
            )

    def space(self, method: str) -> dict[str, Range]:
        """The method's searched fields, less those held fixed."""
        return {name: r for name, r in search_space(method).items() if name not in self.fixed}

    def setup(self, method: str) -> dict[str, Any]:
        """What a study's trials depend on; a resumed study must have the same."""
        return json.loads(
            json.dumps(
                {
                    "preset": self.preset,
                    "model": self.model or "smollm2-135m",
                    "data": portable_path(self.data_dir),
                    "setting": portable_path(self.setting),
                    "train_tasks": self.train_tasks,
                    "dev_tasks": self.dev_tasks,
                    "k": self.k,
                    "seeds": self.seeds,
                    "query_size": self.query_size,
                    "seed": self.seed,
                    "config": self.config.to_dict(),
                    "fixed": sorted(self.fixed),
                    "search_space": {name: r.to_dict() for name, r in self.space(method).items()},
                }
            )
        )


def from_setting(
    preset: str,
    methods: list[str],
    data_dir: Path,
    setting: Path | None,
    model: str | None,
    trials: int,
    sets: dict[str, Any] | None = None,
    seeds: list[int] | None = None,
    **options: Any,
) -> Tuning:
    """A tuning with a comparison preset's budget (:data:`abmll.compare.BUDGETS`) and ``sets`` on top, on the
    setting's train and dev tasks (default: the preset's setting file in ``data_dir/settings``), with the
    preset's seeds unless ``seeds`` are given; ``options`` are other :class:`Tuning` fields (``k``, ``seed``,
    ``device``). A setting without dev tasks is refused."""
    from abmll.compare import BUDGETS
    from abmll.tasks.readers import read_setting

    if preset not in BUDGETS:
        raise ConfigError(f"--preset {preset!r} is invalid: expected one of {sorted(BUDGETS)}")
    spec = BUDGETS[preset]
    sets = dict(sets or {})
    config = ABMLLConfig().override(spec["config"]).override(sets)
    if setting is None:
        setting = Path(data_dir) / "settings" / spec["setting"]
    elif not setting.is_file() and (Path(data_dir) / "settings" / setting).is_file():
        setting = Path(data_dir) / "settings" / setting
    groups = read_setting(setting)
    dev = groups.get("dev", [])
    if not dev:
        raise ConfigError(
            f"{setting}: has no 'dev' tasks; tuning needs meta-validation tasks (a 'dev' list in the setting) and "
            "never tunes on the 'test' tasks"
        )
    for other in ("test", "train"):
        both = sorted(set(dev) & set(groups.get(other, [])))
        if both:
            raise ConfigError(f"{setting}: tasks in both 'dev' and '{other}' (they must be disjoint): {both}")
    return Tuning(
        methods=methods,
        data_dir=Path(data_dir),
        setting=Path(setting),
        train_tasks=groups["train"],
        dev_tasks=dev,
        seeds=list(spec["seeds"] if seeds is None else seeds),
        config=config,
        trials=trials,
        query_size=spec["query_size"],
        model=model,
        preset=preset,
        fixed=sorted(sets),
        **options,
    )


def trial_config(tuning: Tuning, method: str, values: dict[str, Any]) -> ABMLLConfig:
    """A trial's config: the shared one, the method's own preset (as in a comparison cell), the trial's values
    and the tuning's seed."""
    return method_config(method, tuning.config).override({**values, "seed": tuning.seed})


def objective(tuning: Tuning, method: str, config: ABMLLConfig, train: list, episodes: dict) -> dict[str, Any]:
    """Meta-train ``method`` with ``config`` (methods that learn across tasks), adapt to every dev episode and
    score its query set: ``{"nll"}`` (the mean over episodes of the mean query NLL) with ``{"tasks": {task:
    {"nll", "accuracy"}}}`` (means over seeds)."""
    import torch

    from abmll.build import build
    from abmll.evaluation import evaluate
    from abmll.metrics import accuracy, gold_nll
    from abmll.tasks.data import MetaBatchSampler

    method_obj = None
    try:
        method_obj = build(tuning.model, method, config, device=tuning.device)
        if method_obj.meta_learns and config.meta.meta_steps > 0:
            meta = config.meta
            method_obj.meta_train(
                MetaBatchSampler(train, meta.support_size, meta.query_size, meta.meta_batch_size, seed=config.seed)
            )
        try:
            rows = evaluate(method_obj, episodes)
        except NonFiniteError:  # a test-time adaptation diverged: the trial scores nothing
            rows = [{"probs": [math.nan]}]
    finally:  # the next trial loads its own model
        del method_obj
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not all(math.isfinite(p) for row in rows for p in row["probs"]):  # the adaptation diverged
        return {"nll": math.nan, "tasks": {}}
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["task"], row["seed"]), []).append(row)
    per_task: dict[str, list[tuple[float, float]]] = {}
    for (task, _), cell in cells.items():
        width = max(len(r["probs"]) for r in cell)
        probs = torch.tensor([r["probs"] + [0.0] * (width - len(r["probs"])) for r in cell], dtype=torch.float64)
        gold = [r["gold"] for r in cell]
        per_task.setdefault(task, []).append((gold_nll(probs, gold), accuracy(probs, gold)))
    nlls = [nll for values in per_task.values() for nll, _ in values]
    return {
        "nll": sum(nlls) / len(nlls),
        "tasks": {
            task: {"nll": sum(v[0] for v in values) / len(values), "accuracy": sum(v[1] for v in values) / len(values)}
            for task, values in per_task.items()
        },
    }


def counted(trial: Any) -> bool:
    """A trial that used its budget: complete, or failed because its losses diverged (not one interrupted)."""
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and str(trial.user_attrs.get("outcome", "")).startswith("diverged")
    )


def run_tuning(
    tuning: Tuning,
    out_dir: str | Path,
    resume: bool = False,
    report: Reporter | None = None,
    say: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Run each method's study up to ``tuning.trials`` counted trials (with ``resume``, continuing the studies
    in ``OUT/tune.db``), then write ``OUT/tuned.json`` (atomically) and return it. ``report`` shows one line per
    trial; ``say`` gets the other lines (a method skipped, a study resumed)."""
    import optuna

    from abmll.runner import run_lock
    from abmll.tasks.readers import load_training_tasks

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with run_lock(out_dir) as out:  # a second tuning into the same folder fails at once
        db = out / TUNE_DB
        if db.exists() and not resume:
            raise ConfigError(f"{db} holds a study already; pass --resume to continue it, or choose another --out")
        todo = []
        for method in tuning.methods:
            if tuning.space(method):
                todo.append(method)
            else:
                fields = ", ".join(search_space(method))
                held = f" (its fields are held by --set: {fields})" if fields else ""
                say(f"{method}: nothing to tune{held}; skipped")
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}") if db.exists() else None
        studies = optuna.get_all_study_names(storage) if storage is not None else []
        for method in studies:  # one protocol per folder: tuned.json pools every study in it
            if method not in METHODS:
                continue
            recorded = dict(optuna.load_study(study_name=method, storage=storage).user_attrs.get("setup", {}))
            wanted = tuning.setup(method)
            if method not in todo:  # kept as it is: its search space is not compared
                recorded.pop("search_space", None)
                wanted.pop("search_space")
            # A config field the study's abmll did not know yet is not compared (as a comparison's kept cells).
            ran, now = flatten(recorded.pop("config", {})), flatten(wanted.pop("config"))
            differ = sorted(key for key in set(recorded) | set(wanted) if recorded.get(key) != wanted.get(key))
            differ += sorted(f"config {key}" for key in now if key in ran and ran[key] != now[key])
            if differ:
                raise ConfigError(
                    f"{db}: the study of {method} was run with other {', '.join(differ)}; resume with the same "
                    "options, or choose another --out"
                )
        # The data is read (and checked) before any trial, and before tune.db is created; the test tasks are
        # never read.
        episodes = dev_episodes(tuning.data_dir, tuning.dev_tasks, tuning.k, tuning.seeds, tuning.query_size)
        learners = any(METHODS[m].meta_learns for m in todo) and tuning.config.meta.meta_steps > 0
        train = load_training_tasks(tuning.data_dir, tuning.train_tasks)[0] if learners else []
        storage = storage or optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
        for method in todo:
            _tune_method(tuning, method, storage, episodes, train, report, say)
        tuned = _tuned_record(tuning, storage, [m for m in tuning.methods if m not in todo])
        write_json_atomic(out / TUNED_FILE, tuned)
        return tuned


def _tune_method(tuning: Tuning, method: str, storage: Any, episodes: dict, train: list, report, say) -> None:
    import optuna
    from optuna.trial import TrialState


    study = optuna.create_study(study_name=method, storage=storage, direction="minimize", load_if_exists=True)
    if "setup" not in study.user_attrs:
        study.set_user_attr("setup", tuning.setup(method))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # left by a killed run
        study.tell(stale.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    # Seeded by the study's size, so that a resumed study does not repeat the first session's draws.
    study.sampler = optuna.samplers.TPESampler(seed=tuning.seed + len(trials))
    done = sum(counted(t) for t in trials)
    if done:
        say(f"{method}: resuming its study at {done} of {tuning.trials} trials")
    space = tuning.space(method)
    job = report.add(f"tuning {method}", total=tuning.trials, unit="trial") if report is not None else None
    if report is not None and done >= tuning.trials:
        report.update(job, done, note="finished already")
    while done < tuning.trials:
        trial = study.ask()
        try:
            values = {name: r.suggest(trial, name) for name, r in space.items()}
            config = trial_config(tuning, method, values)
            start = time.perf_counter()
            try:
                result = objective(tuning, method, config, train, episodes)
                finite = math.isfinite(result["nll"])
                outcome = "complete" if finite else "diverged: non-finite probabilities on the dev tasks"
            except (NonFiniteError, FloatingPointError) as exc:
                result, outcome = None, f"diverged: {exc}"
            wall_s = round(time.perf_counter() - start, 3)
            trial.set_user_attr("wall_s", wall_s)
            trial.set_user_attr("outcome", outcome)
            if result is not None:
                trial.set_user_attr("tasks", result["tasks"])
        except BaseException:  # an error or an interrupt: the trial is not counted, and the error goes on
            study.tell(trial, state=TrialState.FAIL)
            raise
        if outcome == "complete":
            study.tell(trial, result["nll"])
        else:
            study.tell(trial, state=TrialState.FAIL)
        done += 1
        if report is not None:
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            best = study.best_value if complete else None
            shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
            value = f"dev NLL {result['nll']:.4f}" if outcome == "complete" else outcome
            best_text = f" (best {best:.4f})" if best is not None else ""
            report.update(job, done, note=f"trial {trial.number}: {value}{best_text}; {shown}")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _tuned_record(tuning: Tuning, storage: Any, skipped: list[str]) -> dict[str, Any]:
    """``tuned.json``: every study in the storage with a complete trial (also those of earlier sittings), its
    best values, and the record of the search."""
    import optuna
    from optuna.trial import TrialState

    best: dict[str, dict[str, Any]] = {}
    record: dict[str, Any] = {}
    order = {m: i for i, m in enumerate(METHODS)}
    for name in sorted(optuna.get_all_study_names(storage), key=lambda n: order.get(n, len(order))):
        if name not in METHODS:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        used = [t for t in trials if counted(t)]
        entry = {
            "trials": len(used),
            "complete": len(complete),
            "diverged": len(used) - len(complete),
            "best_trial": None,
            "best_nll": None,
            "search_space": study.user_attrs.get("setup", {}).get("search_space"),
            "wall_s": round(sum(t.user_attrs.get("wall_s", 0.0) for t in used), 3),
        }
        if complete:
            top = study.best_trial
            best[name] = dict(top.params)
            entry.update(best_trial=top.number, best_nll=top.value, dev_tasks=top.user_attrs.get("tasks"))
        record[name] = entry
    setup = {k: v for k, v in tuning.setup(tuning.methods[0]).items() if k != "search_space"}
    return {
        "schema_version": TUNED_SCHEMA_VERSION,
        **best,
        "study": {
            "objective": OBJECTIVE,
            "storage": TUNE_DB,
            "sampler": f"TPE (optuna), seed {tuning.seed} plus the trials already in the study",
            **setup,
            "trials": tuning.trials,
            "methods": record,
            "skipped": {m: "nothing to tune" for m in skipped},
            "versions": {**versions(), "optuna": optuna.__version__},
        },
    }


def read_tuned(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tuned values of ``tuned.json`` (:mod:`abmll.tune`) as ``{method: {field: value}}``, checked: a method
    that does not exist, a field the method does not tune, or a value its field refuses is one
    :class:`ConfigError` naming the file, the method and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--tuned {path}: no such file (expected the tuned.json of abmll tune)")
    data = read_json_object(path, ConfigError, "a JSON object {method: {field: value}}")
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version > TUNED_SCHEMA_VERSION:
        raise ConfigError(
            f"{path}: schema_version {version!r} is newer than this abmll reads ({TUNED_SCHEMA_VERSION}); upgrade abmll"
        )
    tuned: dict[str, dict[str, Any]] = {}
    for method, values in data.items():
        if method in RESERVED:
            continue
        try:
            get_method(method)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: method {method!r}: expected an object {{field: value}}, got {values!r}")
        for name, value in values.items():
            if name not in search_space(method):
                known = sorted(search_space(method)) or "none"
                try:
                    ABMLLConfig().override({name: value})
                except ConfigError:
                    raise ConfigError(
                        f"{path}: method {method!r}: unknown field {name!r} (the fields {method} tunes: {known})"
                    ) from None
                raise ConfigError(f"{path}: method {method!r}: field {name!r} is not one {method} tunes ({known})")
            try:
                ABMLLConfig().override({name: value})
            except ConfigError as exc:
                raise ConfigError(f"{path}: method {method!r}: {exc}") from None
        tuned[method] = dict(values)
    return tuned


def check_finished(path: str | Path, methods: list[str]) -> None:
    """Refuse a ``tuned.json`` of ``abmll tune`` (one with ``study.methods``) unless every compared method with
    something to tune has a finished study in it (``abmll-icl``: its own or ``abmll``'s), run with the same number
    of trials as the others': a study that ran fewer trials than the study's ``trials``, a method with no study
    (not tuned, or tuned in another folder not merged yet) and unequal trials are each one :class:`ConfigError`.
    A file written by hand (no ``study.methods``) is not checked."""
    study = read_json_object(Path(path), ConfigError, "a JSON object {method: {field: value}}").get("study")
    if not isinstance(study, dict) or not isinstance(study.get("methods"), dict):
        return
    target, studies, skipped = study.get("trials"), study["methods"], study.get("skipped") or {}
    done: dict[str, int] = {}
    for method in methods:
        if method not in METHODS or not search_space(method) or method in skipped:
            continue
        name = method if method in studies else METHODS[method].meta_trained_as or method
        entry = studies.get(name)
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{path}: holds no study of {name}, so {method} would run untuned beside tuned methods; tune it "
                f"into the same folder (abmll tune --methods {name} --resume, with the study's other options), "
                f"or leave {method} out of --methods"
            )
        trials = entry.get("trials")
        if not isinstance(trials, int) or (isinstance(target, int) and trials < target):
            raise ConfigError(
                f"{path}: the study of {name} ran {trials} of its {target} trials; finish it (abmll tune --methods "
                f"{name} --trials {target} --resume, with the study's other options), or leave {method} out of "
                "--methods"
            )
        done[name] = trials
    if len(set(done.values())) > 1:
        counts = ", ".join(f"{name} {n}" for name, n in done.items())
        raise ConfigError(
            f"{path}: the compared methods were tuned with unequal trials ({counts}); resume the smaller studies "
            "(abmll tune --trials N --resume) so that every method has the same number"
        )


def check_tuned(tuned: dict[str, dict[str, Any]], config: ABMLLConfig, source: str) -> None:
    """Each method's tuned values applied to ``config`` (a comparison's): a combination the config refuses is
    one :class:`ConfigError` naming ``source`` and the method."""
    for method, values in tuned.items():
        try:
            method_config(method, config).override(values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: method {method!r}: {exc}") from None


__all__ = [
    "OBJECTIVE",
    "Range",
    "SEARCH_SPACE",
    "Tuning",
    "check_tuned",
    "from_setting",
    "objective",
    "read_tuned",
    "run_tuning",
    "search_space",
    "settings_ranges",
]
