"""A table of bad inputs to the ``abmll`` command line, across config values, command-line flags, data files,
model paths and checkpoints. Each must give a non-zero exit status, one clear line ``error: ...``
naming the thing at fault, no traceback and nothing that looks like a finished output (no ``results.json``, no
``final/``). It extends the 37 cases of ``tests/test_cli.py`` (whose fixtures and helpers it reuses) with
different ones."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_cli import (  # noqa: F401 - env and trained are fixtures
    QUERY100,
    SUPPORT13,
    TRAIN0,
    TRAIN_TASKS,
    Ctx,
    _edit_jsonl,
    _file,
    _raw,
    _set,
    env,
    invoke,
    trained,
)

from abmll.checkpoint import CONFIG_FILE, MANIFEST, PRIOR_FILE, TRAINER_JSON, sha256

CATEGORIES = ("config", "flag", "data", "model", "checkpoint")


# --------------------------------------------------------------------------------------------------- helpers


def _bytes(name: str, blob: bytes) -> Callable[[Ctx], Path]:
    def make(c: Ctx) -> Path:
        (c.tmp / name).write_bytes(blob)
        return c.tmp / name

    return make


def _folder(name: str, files: dict[str, bytes | str]) -> Callable[[Ctx], Path]:
    def make(c: Ctx) -> Path:
        folder = c.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        for rel, content in files.items():
            (folder / rel).write_bytes(content.encode() if isinstance(content, str) else content)
        return folder

    return make


def _model_copy(c: Ctx, drop: tuple[str, ...] = (), add: dict[str, str] | None = None) -> Path:
    folder = c.tmp / "model"
    shutil.copytree(c.env.model, folder)
    for pattern in drop:
        for path in folder.glob(pattern):
            path.unlink()
    for name, text in (add or {}).items():
        (folder / name).write_text(text)
    return folder


def remanifest(folder: Path) -> None:
    """Rewrite the manifest to match the files as they are (a checkpoint altered 'consistently')."""
    files = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    (folder / MANIFEST).write_text(json.dumps({"files": {n: sha256(folder / n) for n in files}}))


def _ckpt(edit: Callable[[Path], None], fix_manifest: bool = False) -> Callable[[Ctx], Path]:
    """A copy of the trained run's final checkpoint, altered by ``edit``."""

    def make(c: Ctx) -> Path:
        folder = c.tmp / "ckpt"
        shutil.copytree(c.run / "final", folder)
        edit(folder)
        if fix_manifest:
            remanifest(folder)
        return folder

    return make


def _edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))

    return edit


def _write(name: str, content: bytes | str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)

    return edit


def _run_copy(c: Ctx, edit: Callable[[Path], None] | None = None) -> Path:
    """A copy of the trained run in --out without its final θ (so it can be resumed), altered by ``edit``."""
    out = c.tmp / "out"
    shutil.copytree(c.run, out)
    shutil.rmtree(out / "final")
    if edit is not None:
        edit(out)
    return out


def _flip(rel: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        blob = bytearray((folder / rel).read_bytes())
        blob[len(blob) // 2] ^= 0x01
        (folder / rel).write_bytes(bytes(blob))

    return edit


def _sets(*pairs: str) -> Callable[[Ctx], list]:
    return lambda c: c.train(*[a for p in pairs for a in ("--set", p)])


def _config(name: str, content: bytes | str) -> Callable[[Ctx], list]:
    return lambda c: c.train("--config", _bytes(name, content.encode() if isinstance(content, str) else content)(c))


def _train_no_config(c: Ctx, *extra) -> list:
    return [
        "train", "--model", c.env.model, "--data", c.data, "--setting", c.env.setting, "--out", c.tmp / "out",
        "--steps", 2, "--device", "cpu", *extra,
    ]  # fmt: skip


def _eval_model(c: Ctx, model: Path | str) -> list:
    return c.evaluate("--model", model, "--tasks", "small", "--k", 4, "--seeds", "100")


TASK_CONFIG = f"{TRAIN_TASKS[0]}/config.json"
#: A valid data line, for lines added to a task file.
LINE = {"task": "unseen", "input": "the cat", "output": "yes", "options": ["yes", "no"], "id": "extra-1"}

# (id, category, alteration of the data copy or None, args(ctx), substrings of the one error line)
CASES = [
    # --- config values (--set, --seed, --config files) ------------------------------------------------------
    ("alpha-negative", "config", None, _sets("lora.alpha=-1"), ["'lora.alpha' = -1 is invalid", "> 0"]),
    ("alpha-string", "config", None, _sets("lora.alpha=big"), ["'lora.alpha' = 'big' is invalid", "number"]),
    ("rank-bool", "config", None, _sets("lora.rank=true"), ["'lora.rank' = True is invalid", "integer ≥ 1"]),
    ("rank-float", "config", None, _sets("lora.rank=2.5"), ["'lora.rank' = 2.5 is invalid"]),
    ("sigma-transform", "config", None, _sets("lora.sigma_transform=relu"),
     ["'lora.sigma_transform' = 'relu'", "'abs'"]),
    ("sigma-floor-zero", "config", None, _sets("lora.sigma_floor=0"), ["'lora.sigma_floor' = 0 is invalid"]),
    ("sigma-init-below-floor", "config", None, _sets("lora.sigma_init=0"),
     ["'lora.sigma_init' = 0 is invalid", "sigma_floor"]),
    ("targets-empty", "config", None, _sets("lora.targets=[]"), ["'lora.targets' = [] is invalid", "non-empty list"]),
    ("targets-bare-string", "config", None, _sets("lora.targets=q_proj"),
     ["'lora.targets' = 'q_proj'", "'all-linear'"]),
    ("targets-bad-regex", "config", None, _sets("lora.targets=re:("),
     ["'lora.targets' = 're:('", "regular expression"]),
    ("beta-nan", "config", None, _sets("objective.beta=NaN"), ["'objective.beta' = nan is invalid", "finite"]),
    ("gamma-negative", "config", None, _sets("objective.gamma=-1"), ["'objective.gamma' = -1 is invalid"]),
    ("gamma-a0-zero", "config", None, _sets("objective.gamma_a0=0"), ["'objective.gamma_a0' = 0 is invalid"]),
    ("gamma-b0-infinite", "config", None, _sets("objective.gamma_b0=Infinity"),
     ["'objective.gamma_b0' = inf", "finite"]),
    ("mean-prior-std-zero", "config", None, _sets("objective.mean_prior_std=0"), ["'objective.mean_prior_std' = 0"]),
    ("inner-steps-negative", "config", None, _sets("inner.inner_steps=-1"), ["'inner.inner_steps' = -1", "≥ 0"]),
    ("inner-steps-float", "config", None, _sets("inner.inner_steps=1.5"), ["'inner.inner_steps' = 1.5"]),
    ("inner-lr-zero", "config", None, _sets("inner.inner_lr=0"), ["'inner.inner_lr' = 0 is invalid"]),
    ("inner-samples-zero", "config", None, _sets("inner.inner_samples=0"), ["'inner.inner_samples' = 0", "≥ 1"]),
    ("meta-batch-zero", "config", None, _sets("meta.meta_batch_size=0"), ["'meta.meta_batch_size' = 0"]),
    ("outer-lr-negative", "config", None, _sets("meta.outer_lr=-0.1"), ["'meta.outer_lr' = -0.1 is invalid"]),
    ("weight-decay-negative", "config", None, _sets("meta.weight_decay=-1"), ["'meta.weight_decay' = -1"]),
    ("max-grad-norm-zero", "config", None, _sets("meta.max_grad_norm=0"), ["'meta.max_grad_norm' = 0", "or null"]),
    ("micro-batch-zero", "config", None, _sets("meta.micro_batch_size=0"), ["'meta.micro_batch_size' = 0"]),
    ("query-size-negative", "config", None, _sets("meta.query_size=-1"), ["'meta.query_size' = -1"]),
    ("checkpoint-every-zero", "config", None, _sets("meta.checkpoint_every=0"), ["'meta.checkpoint_every' = 0"]),
    ("nonfinite-unknown", "config", None, _sets("meta.nonfinite=ignore"), ["'meta.nonfinite' = 'ignore'", "'skip'"]),
    ("length-norm-unknown", "config", None, _sets("scoring.length_norm=word"), ["'scoring.length_norm' = 'word'"]),
    ("max-length-small", "config", None, _sets("scoring.max_length=4"), ["'scoring.max_length' = 4", "≥ 8"]),
    ("predict-mode-unknown", "config", None, _sets("predict.mode=median"), ["'predict.mode' = 'median'"]),
    ("seed-negative", "config", None, lambda c: c.train("--seed", -1), ["'seed' = -1 is invalid"]),
    ("seed-string", "config", None, _sets("seed=abc"), ["'seed' = 'abc' is invalid"]),
    ("set-section-scalar", "config", None, _sets("meta=1"), ["config field 'meta' is a section", "'meta.meta_steps'"]),
    ("set-too-deep", "config", None, _sets("lora.rank.x=1"), ["unknown config field 'lora.rank.x'"]),
    ("yaml-unparsable", "config", None, _config("c.yaml", "meta: [1,\n"), ["c.yaml", "could not be parsed"]),
    ("yaml-top-level-list", "config", None, _config("c.yaml", "- 1\n- 2\n"), ["c.yaml", "expected a mapping", "list"]),
    ("yaml-bad-value", "config", None, _config("c.yaml", "inner:\n  inner_lr: fast\n"),
     ["c.yaml", "'inner.inner_lr' = 'fast' is invalid"]),
    ("config-section-not-mapping", "config", None, _config("c.json", '{"meta": 5}'),
     ["c.json", "config section 'meta' must be a mapping"]),
    ("config-not-utf8", "config", None, _config("c.json", b'{"seed": "\xff"}'), ["c.json", "could not be parsed"]),
    ("config-is-a-folder", "config", None, lambda c: c.train("--config", c.tmp), ["does not exist or is not a file"]),
    # --- command-line flags ---------------------------------------------------------------------------------
    ("preset-unknown", "flag", None, lambda c: _train_no_config(c, "--preset", "paper-v9"),
     ["--preset", "'paper-v9' is not one of", "'paper-v1'"]),
    ("train-method-not-meta-learning", "flag", None, lambda c: c.train("--method", "zero-shot"),
     ["--method zero-shot learns nothing across tasks", "abmll train takes one of", "'abmll'"]),
    ("out-is-a-file", "flag", None, lambda c: [*c.train()[:-2], "--out", _bytes("f.txt", b"x")(c), "--device", "cpu"],
     ["--out", "f.txt", "is a file, not a folder"]),
    ("tasks-only-commas", "flag", None, lambda c: c.train("--tasks", ",,"), ["--tasks ',,' names no tasks"]),
    ("tasks-path-escape", "flag", None, lambda c: c.train("--tasks", "../fam0"), ["invalid task name '../fam0'"]),
    ("device-bad-index", "flag", None, lambda c: c.train("--device", "cuda:x"), ["--device 'cuda:x' is invalid"]),
    ("device-absent-gpu", "flag", None, lambda c: c.train("--device", "cuda:99"),
     ["--device 'cuda:99' is not available"]),
    ("query-size-zero", "flag", None, lambda c: c.evaluate("--query-size", 0), ["--query-size 0 is invalid", "≥ 1"]),
    ("samples-zero", "flag", None, lambda c: c.ckpt("--samples", 0), ["'predict.samples' = 0 is invalid"]),
    ("mode-unknown", "flag", None, lambda c: c.ckpt("--mode", "vote"), ["--mode", "'vote' is not one of 'sample'"]),
    ("inner-steps-negative-flag", "flag", None, lambda c: c.ckpt("--inner-steps", -1),
     ["'inner.test_inner_steps' = -1 is invalid"]),
    ("setting-missing-file", "flag", None, lambda c: c.train("--setting", c.tmp / "none.json"),
     ["none.json", "no such file"]),
    ("lora-without-checkpoint", "flag", None, lambda c: c.evaluate(method="lora"),
     ["--method lora needs --checkpoint"]),
    # --- data files -----------------------------------------------------------------------------------------
    ("options-a-string", "data", _edit_jsonl(TRAIN0, _set(1, options="yes,no")), lambda c: c.train(),
     ["line 2", "field 'options': expected a list of strings, got a string"]),
    ("options-one", "data", _edit_jsonl(TRAIN0, _set(0, options=["yes"], output="yes")), lambda c: c.train(),
     ["line 1", "expected at least 2 options"]),
    ("options-duplicate", "data", _edit_jsonl(TRAIN0, _set(3, options=["yes", "yes"], output="yes")),
     lambda c: c.train(), ["line 4", "duplicate option 'yes'"]),
    ("input-null", "data", _edit_jsonl(SUPPORT13, _set(0, input=None)), lambda c: c.evaluate(),
     [SUPPORT13.split("/")[1], "line 1", "field 'input': expected a string, got null"]),
    ("id-empty", "data", _edit_jsonl(TRAIN0, _set(2, id="")), lambda c: c.train(),
     ["line 3", "expected a non-empty string or an integer id"]),
    ("line-a-string", "data", _raw(QUERY100, lambda b: b'"just text"\n' + b), lambda c: c.evaluate(),
     [QUERY100.split("/")[1], "line 1", "expected a JSON object, got a string"]),
    ("bom-and-blank-lines", "data", _raw(QUERY100, lambda b: b"\xef\xbb\xbf\n  \n"), lambda c: c.evaluate(),
     [QUERY100.split("/")[1], "empty file"]),
    ("deeply-nested-line", "data", _raw(TRAIN0, lambda b: b"[" * 100000 + b"]" * 100000 + b"\n" + b),
     lambda c: c.train(), ["line 1", "invalid or truncated JSON"]),
    ("task-config-bad-kind", "data", lambda d: (d / TASK_CONFIG).write_text('{"kind": "regression"}'),
     lambda c: c.train(), ["config.json", "field 'kind': expected one of", "'regression'"]),
    ("task-config-unknown-key", "data", lambda d: (d / TASK_CONFIG).write_text('{"labels": ["a", "b"]}'),
     lambda c: c.train(), ["config.json", "unexpected keys ['labels']"]),
    ("task-config-not-json", "data", lambda d: (d / TASK_CONFIG).write_text('{"options": ['),
     lambda c: c.train(), ["config.json", "invalid JSON"]),
    ("task-folder-empty", "data", lambda d: (d / "hollow").mkdir(), lambda c: c.train("--tasks", "fam0,hollow"),
     ["no such file for task 'hollow'", "none"]),
    ("support-wrong-size", "data", _raw(SUPPORT13, lambda b: b + json.dumps(LINE).encode() + b"\n"),
     lambda c: c.evaluate(), [SUPPORT13.split("/")[1], "holds 9 examples, expected k = 8"]),
    ("setting-overlap", "data", None,
     lambda c: c.train("--setting", _file("s.json", json.dumps({"train": ["fam0"], "test": ["fam0"]}))(c)),
     ["s.json", "tasks in both 'train' and 'test'", "fam0"]),
    ("setting-duplicates", "data", None,
     lambda c: c.train("--setting", _file("s.json", json.dumps({"train": ["fam0", "fam0"], "test": ["x"]}))(c)),
     ["s.json", "duplicate task names ['fam0']"]),
    ("setting-a-list", "data", None, lambda c: c.train("--setting", _file("s.json", '["fam0"]')(c)),
     ["s.json", "expected a JSON object", "got a list"]),
    ("setting-unknown-key", "data", None,
     lambda c: c.train("--setting", _file("s.json", json.dumps({"train": ["a"], "test": ["b"], "extra": ["c"]}))(c)),
     ["s.json", "unexpected keys ['extra']"]),
    ("setting-path-escape", "data", None,
     lambda c: c.train("--setting", _file("s.json", json.dumps({"train": ["../etc"], "test": ["b"]}))(c)),
     ["s.json", "invalid task name '../etc'"]),
    # --- model paths ----------------------------------------------------------------------------------------
    ("model-not-gguf-file", "model", None, lambda c: _eval_model(c, _bytes("weights.bin", b"\0" * 64)(c)),
     ["weights.bin", "it is a file but not a .gguf file"]),
    ("model-folder-without-config", "model", None, lambda c: _eval_model(c, _folder("empty-model", {})(c)),
     ["empty-model", "has no config.json"]),
    ("model-two-ggufs", "model", None,
     lambda c: _eval_model(c, _folder("two", {"a.gguf": b"x", "b.gguf": b"x"})(c)), ["two", "2 .gguf files"]),
    ("model-garbage-gguf", "model", None, lambda c: _eval_model(c, _bytes("junk.gguf", b"GGUFxxxx" * 8)(c)),
     ["cannot load model", "junk.gguf"]),
    ("model-config-not-json", "model", None, lambda c: _eval_model(c, _model_copy(c, add={"config.json": "{no"})),
     ["cannot load model", "model", "config"]),
    ("model-unknown-architecture", "model", None,
     lambda c: _eval_model(c, _model_copy(c, add={"config.json": '{"model_type": "bogus"}'})),
     ["cannot load model", "bogus"]),
    ("model-without-weights", "model", None, lambda c: _eval_model(c, _model_copy(c, drop=("*.safetensors",))),
     ["cannot load model", "model.safetensors"]),
    ("model-looks-like-path", "model", None, lambda c: c.train("--model", "no/such/model"),
     ["cannot load model 'no/such/model'", "no such file or folder"]),
    # --- checkpoints ----------------------------------------------------------------------------------------
    ("ckpt-is-a-file", "checkpoint", None,
     lambda c: c.evaluate("--checkpoint", _bytes("ck.safetensors", b"x")(c), method=None),
     ["ck.safetensors", "does not exist or is not a folder"]),
    ("ckpt-no-manifest", "checkpoint", None,
     lambda c: c.evaluate("--checkpoint", _ckpt(lambda f: (f / MANIFEST).unlink())(c), method=None),
     ["ckpt", "not a complete abmll checkpoint", MANIFEST]),
    ("ckpt-manifest-garbage", "checkpoint", None,
     lambda c: c.evaluate("--checkpoint", _ckpt(_write(MANIFEST, "{"))(c), method=None),
     [MANIFEST, "unreadable manifest"]),
    ("ckpt-manifest-list", "checkpoint", None,
     lambda c: c.evaluate("--checkpoint", _ckpt(_write(MANIFEST, '{"files": []}'))(c), method=None),
     [MANIFEST, "unreadable manifest"]),
    ("ckpt-file-missing", "checkpoint", None,
     lambda c: c.evaluate("--checkpoint", _ckpt(lambda f: (f / TRAINER_JSON).unlink())(c), method=None),
     [f"file {TRAINER_JSON} listed in the manifest is missing"]),
    ("ckpt-prior-unlisted", "checkpoint", None,
     lambda c: c.evaluate("--checkpoint", _ckpt(_edit_json(MANIFEST, lambda m: m["files"].pop(PRIOR_FILE)))(c),
                          method=None),
     [f"file {PRIOR_FILE} is not listed in the manifest"]),
    ("ckpt-config-altered", "checkpoint", None,
     lambda c: c.evaluate("--checkpoint", _ckpt(_flip(CONFIG_FILE))(c), method=None),
     [CONFIG_FILE, "checksum mismatch"]),
    ("ckpt-config-not-json", "checkpoint", None,
     lambda c: c.evaluate("--checkpoint", _ckpt(_write(CONFIG_FILE, "{"), fix_manifest=True)(c), method=None),
     ["ckpt", "could not be read"]),
    ("ckpt-prior-is-a-pickle", "checkpoint", None,
     lambda c: c.evaluate(
         "--checkpoint",
         _ckpt(lambda f: torch.save({"x": torch.zeros(1)}, f / PRIOR_FILE), fix_manifest=True)(c),
         method=None),
     ["ckpt", "could not be read"]),
    ("ckpt-config-invalid", "checkpoint", None,
     lambda c: c.evaluate(
         "--checkpoint",
         _ckpt(_edit_json(CONFIG_FILE, lambda d: d["config"]["lora"].update(rank=0)), fix_manifest=True)(c),
         method=None),
     [CONFIG_FILE, "'lora.rank' = 0 is invalid"]),
    ("ckpt-method-unknown", "checkpoint", None,
     lambda c: c.evaluate(
         "--checkpoint", _ckpt(_edit_json(CONFIG_FILE, lambda d: d.update(method="bogus")), fix_manifest=True)(c),
         method=None),
     ["unknown method 'bogus'"]),
    ("resume-every-checkpoint-corrupt", "checkpoint", None,
     lambda c: c.train("--resume", "--out", _run_copy(c, _flip(f"checkpoints/step-000003/{PRIOR_FILE}"))),
     ["no valid checkpoint to resume from"]),
    ("resume-other-sampler", "checkpoint", None, lambda c: c.train("--resume", "--out", _run_copy(c), "--seed", 5),
     ["step-000003", "was trained with", "seed=0", "seed=5"]),
    ("resume-misfit", "checkpoint", None,
     lambda c: c.train("--resume", "--out", _run_copy(c), "--set", "lora.rank=3"),
     ["step-000003", "has shape", "in the checkpoint but"]),
    ("run-already-in-folder", "checkpoint", None, lambda c: c.train("--out", _run_copy(c)),
     ["already holds a run", "--resume"]),
]  # fmt: skip


def test_the_table_spans_every_category_with_at_least_fifty_distinct_cases():
    ids = [case[0] for case in CASES]
    assert len(ids) >= 50 and len(set(ids)) == len(ids)
    counts = {cat: sum(case[1] == cat for case in CASES) for cat in CATEGORIES}
    assert set(case[1] for case in CASES) == set(CATEGORIES) and min(counts.values()) >= 8, counts


@pytest.mark.parametrize(("alter", "args", "needles"), [c[2:] for c in CASES], ids=[f"{c[1]}-{c[0]}" for c in CASES])
def test_bad_input_gives_one_clear_error_and_no_finished_output(env, trained, tmp_path, alter, args, needles):  # noqa: F811
    data = env.data
    if alter is not None:
        data = tmp_path / "data"
        shutil.copytree(env.data, data)
        alter(data)
    ctx = Ctx(env, data, tmp_path, trained)
    result = invoke(*args(ctx))  # an option given again (--out, --data, ...) overrides the earlier one
    assert result.exit_code != 0 and result.exit_code == 2, f"exit {result.exit_code}\n{result.output}"
    assert isinstance(result.exception, SystemExit)  # no other exception escaped
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.output
    # Nothing else but progress bars: one message.
    assert all(line.startswith(("meta-training", "evaluating")) for line in lines if line != errors[0]), lines
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    out = tmp_path / "out"
    assert not (out / "results.json").exists() and not (out / "final").exists()
