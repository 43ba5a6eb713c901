"""Readers and writers for task files. Every problem in a file raises one :class:`DataError` whose message
names the file, the line (1-based) where there is one, the field, and what was expected.

Layouts
-------
MetaICL / CrossFit JSONL (:func:`read_metaicl_task`)::

    {data_dir}/{task}/{task}_{k}_{seed}_{split}.jsonl   split is train, dev or test
    {data_dir}/{task}/{task}.jsonl                      fallback: the whole task in one file, used when the
                                                        k/seed/split file is absent (sample it with
                                                        make_episode)
    {data_dir}/{task}/config.json                       optional task config, or
    {data_dir}/_configs/{task}.json                     {"options": [...], "kind": "classification"}

  Each line is ``{"task": str, "input": str, "output": str, "options": [str, ...]}`` with an optional
  ``"id"``. A line without options (or with ``[]``) takes the config's options. A task whose lines all
  share one option list is a classification task with those labels, otherwise multiple choice; a config
  ``"kind"`` overrides that.

CrossFit TSV (:func:`read_crossfit_task`, :func:`read_crossfit_tsv`): ``{data_dir}/{task}/{task}_{split}.tsv``
  with lines ``input<TAB>output`` (both stripped). The options are the task config's (as above) or, with no
  config, the sorted set of outputs in the file; the task is classification unless the config says otherwise.

UnifiedQA TSV (:func:`read_unifiedqa_tsv`): lines ``question<TAB>answer`` where the question holds its
  options as ``(A) text (B) text ...`` (or ``(a) ...``). The two-character sequence ``\\n`` separates the
  stem, the options and any trailing context; the example's input is the stem and context joined by newlines.
  The gold option is the one equal to the answer, ignoring case and whitespace.

Column-mapped data (:func:`read_column_data`, :func:`read_columns`): a ``datasets`` folder saved with
  ``save_to_disk`` (a Dataset, or a DatasetDict), a ``.parquet``, ``.csv`` or ``.jsonl`` file, or a folder of
  such files, read through a column mapping ``{"input": col | [cols] (joined by newlines), "options": list col
  | [cols] (one option each), "labels": [texts] (instead of options), "answer": col (an option index from 0,
  or the option's text), "task": col (optional), "id": col (optional)}`` (``gold`` and ``label_names`` are
  older names of ``answer`` and ``labels``). Parquet and CSV are read by ``datasets``; every CSV cell is read
  as its text, so an answer of digits that is not an option's text is an index. With several option columns,
  empty cells at the end are dropped (a row with fewer options). A ClassLabel answer column gives the labels.

Examples get the id ``"{task}:{line}"`` (``"{table}:{row}"`` for a datasets folder, a parquet or CSV file,
rows counted from 0 as in ``dataset[row]``, ``table`` its file name without suffix or its split) unless the
line carries an ``"id"``.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abmll.errors import ConfigError, DataError
from abmll.tasks.data import KINDS, Example, Task, example_key

SPLITS = ("train", "dev", "test")
SETTING_KEYS = ("train", "test", "dev", "valid")
_SPLIT_SUFFIX = re.compile(r"^(?P<name>.+?)_(?:(?P<k>\d+)_(?P<seed>\d+)_)?(?:train|dev|test)$")


# ---------------------------------------------------------------------------------------------- helpers


def _err(path: Path | str, msg: str, line: int | None = None, unit: str = "line") -> DataError:
    return DataError(f"{path}: {unit} {line}: {msg}" if line is not None else f"{path}: {msg}")


_TYPE_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def _tname(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _read_text(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _err(path, "no such file") from None
    except OSError as e:
        raise _err(path, f"cannot read the file ({e.strerror or e})") from None
    except ValueError as e:  # e.g. a NUL character in the path
        raise _err(repr(str(path)), f"invalid file path ({e})") from None


def _lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 file with their 1-based numbers (a BOM and ``\\r`` are dropped)."""
    out = []
    for n, raw in enumerate(_read_text(path).split(b"\n"), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _err(
                path, f"not valid UTF-8 (bad byte {raw[e.start]:#04x} at column {e.start + 1})", n
            ) from None
        text = (text.removeprefix("\ufeff") if n == 1 else text).rstrip("\r")
        if text.strip():
            out.append((n, text))
    return out


def _json_lines(path: Path) -> list[tuple[int, dict]]:
    """The JSON objects of a JSONL file, one per non-blank line, with their line numbers."""
    rows = []
    for n, text in _lines(path):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            why = f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise _err(
                path, f"invalid or truncated JSON ({why}); expected one JSON object per line", n
            ) from None
        if not isinstance(obj, dict):
            raise _err(path, f"expected a JSON object, got {_tname(obj)}", n)
        rows.append((n, obj))
    if not rows:
        raise _err(path, "empty file: expected at least one JSON line")
    return rows


def _read_json(path: Path) -> Any:
    """A whole-file JSON document; decode and syntax errors name the line."""
    data = _read_text(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _err(path, "not valid UTF-8", data[: e.start].count(b"\n") + 1) from None
    if not text.strip():
        raise _err(path, "empty file: expected a JSON document")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _err(path, f"invalid JSON ({e.msg}, column {e.colno})", e.lineno) from None
    except (ValueError, RecursionError) as e:
        raise _err(path, f"invalid JSON ({e})") from None


def _str_field(path: Path, n: int | None, obj: dict, key: str, required: bool = True, unit: str = "line"):
    if key not in obj:
        if required:
            raise _err(path, f"missing field '{key}' (expected a string)", n, unit)
        return None
    if not isinstance(obj[key], str):
        raise _err(path, f"field '{key}': expected a string, got {_tname(obj[key])}", n, unit)
    return obj[key]


def _options(path: Path, n: int | None, field: str, value: Any, unit: str = "line") -> tuple[str, ...]:
    """Validate an option list: a list of at least 2 distinct strings."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(o, str) for o in value):
        got = _tname(value) if not isinstance(value, (list, tuple)) else "a list with non-string items"
        raise _err(path, f"field '{field}': expected a list of strings, got {got}", n, unit)
    if len(value) < 2:
        raise _err(
            path, f"field '{field}': expected at least 2 options, got {len(value)} ({list(value)})", n, unit
        )
    dup = next((o for i, o in enumerate(value) if o in value[:i]), None)
    if dup is not None:
        raise _err(path, f"field '{field}': duplicate option {dup!r} in {list(value)}", n, unit)
    return tuple(value)


def _claim_id(path: Path, n: int, ex_id: str, seen: dict[str, int], unit: str = "line") -> str:
    if ex_id in seen:
        raise _err(path, f"duplicate example id {ex_id!r} (also on {unit} {seen[ex_id]})", n, unit)
    seen[ex_id] = n
    return ex_id


def _line_id(
    path: Path, n: int, obj: dict, key: str | None, name: str, seen: dict[str, int], unit="line"
) -> str:
    """The example id: the ``key`` field when present (a non-empty string or an integer), else name:line."""
    if key is None or key not in obj:
        return _claim_id(path, n, f"{name}:{n}", seen, unit)
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
        raise _err(path, f"field '{key}': expected a non-empty string or an integer id, got {v!r}", n, unit)
    return _claim_id(path, n, str(v), seen, unit)


def _make_task(name: str, examples: list[Example], source: Path | str, kind: str | None = None) -> Task:
    """A Task whose kind is ``kind`` or inferred: classification iff all examples share their options."""
    if not examples:
        raise _err(source, f"empty task '{name}': no examples")
    first = examples[0].options
    kind = kind or ("classification" if all(ex.options == first for ex in examples) else "multiple_choice")
    return Task(name, examples, kind, first if kind == "classification" else None, str(source))


def _name_from_file(path: Path) -> str:
    m = _SPLIT_SUFFIX.match(path.stem)
    return m.group("name") if m else path.stem


def _check_task_name(task: Any, where: Path | str) -> None:
    """A task name is one folder name: a non-empty string without path separators or NUL, not '.' or '..'."""
    if not isinstance(task, str) or task in ("", ".", "..") or any(c in task for c in "/\\\0"):
        raise _err(where, f"invalid task name {task!r}: expected a folder name without '/', '\\' or NUL")


def _task_dir(data_dir: Path | str, task: str) -> Path:
    data_dir = Path(data_dir)
    _check_task_name(task, data_dir)
    if not data_dir.is_dir():
        raise _err(data_dir, "no such data folder")
    task_dir = data_dir / task
    if not task_dir.is_dir():
        have = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
        shown = ", ".join(have[:20]) + (" ..." if len(have) > 20 else "")
        raise _err(
            task_dir, f"no folder for task '{task}' in {data_dir} (task folders there: {shown or 'none'})"
        )
    return task_dir


def _missing_file(path: Path, task: str, what: str, pattern: str) -> DataError:
    have = sorted(p.name for p in path.parent.glob(pattern))
    return _err(path, f"no such file for task '{task}' ({what}); files for this task: {have or 'none'}")


def _config_paths(task_dir: Path, task: str) -> list[Path]:
    return [task_dir / "config.json", task_dir.parent / "_configs" / f"{task}.json"]


def read_task_config(path: Path | str) -> dict:
    """A task config file ``{"options": [...], "kind": ...}`` (both keys optional), validated."""
    path = Path(path)
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise _err(path, f"expected a JSON object with 'options' and/or 'kind', got {_tname(obj)}")
    extra = sorted(set(obj) - {"options", "kind"})
    if extra:
        raise _err(path, f"unexpected keys {extra}; a task config has 'options' and 'kind'")
    options = _options(path, None, "options", obj["options"]) if "options" in obj else None
    kind = obj.get("kind")
    if kind is not None and kind not in KINDS:
        raise _err(path, f"field 'kind': expected one of {list(KINDS)}, got {kind!r}")
    return {"options": options, "kind": kind, "path": path}


def find_task_config(task_dir: Path | str, task: str) -> dict | None:
    """The config of ``task`` from ``{task_dir}/config.json`` or ``{task_dir}/../_configs/{task}.json``."""
    for p in _config_paths(Path(task_dir), task):
        if p.is_file():
            return read_task_config(p)
    return None


# ------------------------------------------------------------------------------------------ MetaICL JSONL


def metaicl_path(data_dir: Path | str, task: str, k: int = 16, seed: int = 100, split: str = "train") -> Path:
    """``{data_dir}/{task}/{task}_{k}_{seed}_{split}.jsonl``."""
    return Path(data_dir) / task / f"{task}_{k}_{seed}_{split}.jsonl"


def read_metaicl_file(path: Path | str, name: str | None = None, config: dict | None = None) -> Task:
    """One MetaICL JSONL file as a Task. ``name`` defaults to the file name less ``_{k}_{seed}_{split}``;
    ``config`` (from :func:`read_task_config`) defaults to the task's config file, if any."""
    path = Path(path)
    name = name or _name_from_file(path)
    if config is None:
        config = find_task_config(path.parent, name)
    examples, seen = [], {}
    for n, obj in _json_lines(path):
        _str_field(path, n, obj, "task", required=False)
        inp = _str_field(path, n, obj, "input")
        out = _str_field(path, n, obj, "output")
        raw = obj.get("options")
        if raw is None or raw == []:
            if config is None or config["options"] is None:
                looked = " or ".join(str(p) for p in _config_paths(path.parent, name))
                raise _err(
                    path,
                    f"no 'options' on this line and no task config with options for task "
                    f"'{name}' (looked for {looked})",
                    n,
                )
            options = config["options"]
        else:
            options = _options(path, n, "options", raw)
        if out not in options:
            raise _err(path, f"field 'output': {out!r} is not one of the options {list(options)}", n)
        examples.append(Example(inp, options, options.index(out), _line_id(path, n, obj, "id", name, seen)))
    return _make_task(name, examples, path, config and config["kind"])


def read_metaicl_task(
    data_dir: Path | str, task: str, k: int = 16, seed: int = 100, split: str = "train"
) -> Task:
    """The task's ``{task}_{k}_{seed}_{split}.jsonl`` file, or ``{task}.jsonl`` when that is absent."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {list(SPLITS)}, got {split!r}")
    task_dir = _task_dir(data_dir, task)
    path = metaicl_path(data_dir, task, k, seed, split)
    if not path.is_file():
        if not (task_dir / f"{task}.jsonl").is_file():
            raise _missing_file(path, task, f"k={k}, seed={seed}, split={split}", "*.jsonl")
        path = task_dir / f"{task}.jsonl"
    return read_metaicl_file(path, name=task)


def read_metaicl_split_files(
    data_dir: Path | str, task: str, k: int = 16, seed: int = 100
) -> dict[str, Task]:
    """Every split file (train/dev/test) of ``task`` at this k and seed, as ``{split: Task}``."""
    task_dir = _task_dir(data_dir, task)
    out = {
        s: read_metaicl_file(p, name=task)
        for s in SPLITS
        if (p := metaicl_path(data_dir, task, k, seed, s)).is_file()
    }
    if not out:
        raise _missing_file(task_dir / f"{task}_{k}_{seed}_*.jsonl", task, f"k={k}, seed={seed}", "*.jsonl")
    return out


def metaicl_files(data_dir: Path | str, task: str) -> dict[tuple[int, int, str], Path]:
    """The task's ``{task}_{k}_{seed}_{split}.jsonl`` files as ``{(k, seed, split): path}``."""
    task_dir = _task_dir(data_dir, task)
    pattern = re.compile(rf"^{re.escape(task)}_(\d+)_(\d+)_(train|dev|test)\.jsonl$")
    out = {}
    for path in sorted(task_dir.iterdir()):
        m = pattern.match(path.name)
        if m and path.is_file():
            out[(int(m.group(1)), int(m.group(2)), m.group(3))] = path
    return out


#: MetaICL's meta-training file: ``{task}_16384_100_train.jsonl``.
TRAIN_FILE_K, TRAIN_FILE_SEED = 16384, 100


def read_training_task(data_dir: Path | str | ColumnData, task: str) -> tuple[Task, str]:
    """A meta-training task and where its examples came from: its 16384-shot file
    ``{task}_16384_100_train.jsonl`` when present, else its whole-task file ``{task}.jsonl``, else the union
    of its k-shot files ``{task}_{k}_{seed}_{split}.jsonl`` (every k, seed and split; an example found in
    several files counted once). For :class:`ColumnData`, the task's examples and their source."""
    if isinstance(data_dir, ColumnData):
        return data_dir.task(task), data_dir.sources[task]
    task_dir = _task_dir(data_dir, task)
    path = metaicl_path(data_dir, task, TRAIN_FILE_K, TRAIN_FILE_SEED, "train")
    if path.is_file():
        return read_metaicl_file(path, name=task), path.name
    if (task_dir / f"{task}.jsonl").is_file():
        return read_metaicl_file(task_dir / f"{task}.jsonl", name=task), f"{task}.jsonl"
    files = list(metaicl_files(data_dir, task).values())
    if not files:
        raise _missing_file(path, task, "meta-training: no 16384-shot file, no whole-task file, no k-shot files", "*")
    return union_of_files(task, files), f"the union of {len(files)} k-shot files ({', '.join(p.name for p in files)})"


def load_training_tasks(data_dir: Path | str | ColumnData, names: Iterable[str]) -> tuple[list[Task], dict[str, str]]:
    """The meta-training tasks ``names`` (:func:`read_training_task`) and, per task, the file(s) read."""
    tasks, sources = [], {}
    for name in names:
        task, sources[name] = read_training_task(data_dir, name)
        tasks.append(task)
    return tasks, sources


def union_of_files(task: str, files: Sequence[Path]) -> Task:
    """The examples of several files of one task, each counted once (by content); an id that two different
    examples carry (e.g. the line-number ids of two files) is prefixed with the file name."""
    seen: set[str] = set()
    ids: set[str] = set()
    examples: list[Example] = []
    kinds = []
    for path in files:
        part = read_metaicl_file(path, name=task)
        kinds.append(part.kind)
        for ex in part.examples:
            key = example_key(task, ex)
            if key in seen:
                continue
            seen.add(key)
            if ex.id in ids:
                ex = Example(ex.input, ex.options, ex.gold, f"{path.name}:{ex.id}")
            ids.add(ex.id)
            examples.append(ex)
    kind = "classification" if all(k == "classification" for k in kinds) else None
    return _make_task(task, examples, files[0].parent, kind)


def load_metaicl_tasks(
    data_dir: Path | str, names: Iterable[str], k: int = 16, seed: int = 100, split: str = "train"
) -> dict[str, Task]:
    """Several tasks by name (e.g. a setting's ``"train"`` list), as ``{name: Task}`` in the given order."""
    names = list(names)
    if not names:
        raise DataError(f"{data_dir}: no task names given")
    return {name: read_metaicl_task(data_dir, name, k, seed, split) for name in names}


def read_setting(path: Path | str) -> dict[str, list[str]]:
    """A MetaICL setting file ``{"train": [...], "test": [...]}`` (optionally "dev"/"valid" too): lists of
    distinct task names, with no task in both train and test. ``"test"`` must name at least one task; the
    other lists may be empty or absent (a setting to evaluate on, with nothing to meta-train on): an absent
    ``"train"`` reads as ``[]``."""
    path = Path(path)
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise _err(
            path, f"expected a JSON object with 'train' and 'test' lists of task names, got {_tname(obj)}"
        )
    extra = sorted(set(obj) - set(SETTING_KEYS))
    if extra:
        raise _err(path, f"unexpected keys {extra}; expected {list(SETTING_KEYS)}")
    if "test" not in obj:
        raise _err(path, "missing key 'test' (expected a list of task names)")
    obj = {"train": [], **obj}
    for key, names in obj.items():
        if (
            not isinstance(names, list)
            or (key == "test" and not names)
            or not all(isinstance(t, str) and t.strip() for t in names)
        ):
            what = "a non-empty list" if key == "test" else "a list (possibly empty)"
            raise _err(path, f"field '{key}': expected {what} of non-empty task-name strings")
        for name in names:
            _check_task_name(name, path)
        dup = sorted({t for i, t in enumerate(names) if t in names[:i]})
        if dup:
            raise _err(path, f"field '{key}': duplicate task names {dup}")
    overlap = sorted(set(obj["train"]) & set(obj["test"]))
    if overlap:
        raise _err(path, f"tasks in both 'train' and 'test' (they must be disjoint): {overlap}")
    return {key: list(names) for key, names in obj.items()}


def write_metaicl_task(
    task: Task, data_dir: Path | str, k: int = 16, seed: int = 100, split: str = "train"
) -> Path:
    """Write ``task`` as ``{data_dir}/{task}/{task}_{k}_{seed}_{split}.jsonl`` (options on every line, the
    example id as ``"id"`` when set); returns the file's path."""
    _check_ids(task)
    path = metaicl_path(data_dir, task.name, k, seed, split)
    lines = [
        {"task": task.name, "input": ex.input, "output": ex.answer, "options": list(ex.options)}
        | ({"id": ex.id} if ex.id else {})
        for ex in task.examples
    ]
    return _write_lines(path, (json.dumps(line, ensure_ascii=False) for line in lines))


def _check_ids(task: Task) -> None:
    ids = [ex.id for ex in task.examples if ex.id]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"task '{task.name}': duplicate example ids {dup}; the file could not be read back")


def _write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------- CrossFit TSV


def _tsv_rows(path: Path) -> list[tuple[int, str, str]]:
    rows = []
    for n, text in _lines(path):
        parts = text.split("\t")
        if len(parts) != 2:
            raise _err(
                path, f"expected 'input<TAB>output' with exactly one tab, found {len(parts) - 1} tabs", n
            )
        a, b = parts[0].strip(), parts[1].strip()
        if not a or not b:
            raise _err(path, f"empty {'input' if not a else 'output'} field; expected 'input<TAB>output'", n)
        rows.append((n, a, b))
    if not rows:
        raise _err(path, "empty file: expected lines 'input<TAB>output'")
    return rows


def read_crossfit_tsv(path: Path | str, name: str | None = None, config: dict | None = None) -> Task:
    """A CrossFit TSV file. Options come from ``config`` or the task's config file, else they are the sorted
    distinct outputs of the file."""
    path = Path(path)
    name = name or _name_from_file(path)
    rows = _tsv_rows(path)
    if config is None:
        config = find_task_config(path.parent, name)
    options = (
        config["options"] if config and config["options"] else tuple(sorted({out for _, _, out in rows}))
    )
    if len(options) < 2:
        looked = " or ".join(str(p) for p in _config_paths(path.parent, name))
        raise _err(
            path,
            f"task '{name}' has one distinct output {options[0]!r} and no task config with options "
            f"(looked for {looked}); a classification task needs at least 2 labels",
        )
    examples, seen = [], {}
    for n, inp, out in rows:
        if out not in options:
            src = config["path"] if config else "the outputs"
            raise _err(path, f"output {out!r} is not one of the options {list(options)} (from {src})", n)
        examples.append(Example(inp, options, options.index(out), _claim_id(path, n, f"{name}:{n}", seen)))
    return _make_task(name, examples, path, (config and config["kind"]) or "classification")


def read_crossfit_task(data_dir: Path | str, task: str, split: str = "train") -> Task:
    """``{data_dir}/{task}/{task}_{split}.tsv`` as a Task."""
    task_dir = _task_dir(data_dir, task)
    path = task_dir / f"{task}_{split}.tsv"
    if not path.is_file():
        raise _missing_file(path, task, f"split={split}", "*.tsv")
    return read_crossfit_tsv(path, name=task)


def _check_tsv_text(task: Task, ex: Example, texts: Sequence[str]) -> None:
    for t in texts:
        if "\t" in t or "\n" in t or "\r" in t or t != t.strip() or not t:
            raise DataError(
                f"task '{task.name}' example {ex.id!r}: {t!r} cannot be written to a TSV line "
                "(empty, surrounding whitespace, tab or newline)"
            )


def write_tsv(task: Task, path: Path | str, config: bool = True) -> Path:
    """Write a classification ``task`` as a CrossFit TSV (``input<TAB>output`` lines) and, with ``config``,
    its labels and kind to ``config.json`` beside it (so the label order survives); returns the TSV path."""
    path = Path(path)
    if task.kind != "classification":
        raise DataError(
            f"task '{task.name}': a CrossFit TSV holds classification tasks only, not {task.kind}"
        )
    for ex in task.examples:
        _check_tsv_text(task, ex, [ex.input, ex.answer])
    _write_lines(path, (f"{ex.input}\t{ex.answer}" for ex in task.examples))
    if config:
        cfg = {"options": list(task.labels), "kind": task.kind}
        (path.parent / "config.json").write_text(json.dumps(cfg, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- UnifiedQA TSV

_UQA_SEP = "\\n"  # the literal two characters UnifiedQA uses between the stem, the options and a context
_MARK = re.compile(r"(?:(?<=\s)|(?<=\\n)|^)\(([A-Za-z])\)")


def parse_unifiedqa_question(question: str) -> tuple[str, tuple[str, ...]] | None:
    """Split a UnifiedQA question into (input, options); None when it has no ``(A)``/``(a)`` marker.
    The input is the stem and any text after the options (a context), joined by newlines."""
    first = next((m for m in _MARK.finditer(question) if m.group(1) in "aA"), None)
    if first is None:
        return None
    body, _, context = question[first.start() :].partition(_UQA_SEP)
    upper = first.group(1) == "A"
    marks = []
    for m in _MARK.finditer(body):
        want = chr(ord("a") + len(marks))
        if m.group(1) == (want.upper() if upper else want):
            marks.append(m)
    ends = [m.start() for m in marks[1:]] + [len(body)]
    options = tuple(body[m.end() : end].strip() for m, end in zip(marks, ends, strict=True))
    pieces = question[: first.start()].split(_UQA_SEP) + context.split(_UQA_SEP)
    return "\n".join(p.strip() for p in pieces if p.strip()), options


def read_unifiedqa_tsv(path: Path | str, name: str | None = None) -> Task:
    """A UnifiedQA multiple-choice TSV file (``question<TAB>answer`` lines) as a Task."""
    path = Path(path)
    name = name or _name_from_file(path)
    examples, seen = [], {}

    def norm(s: str) -> str:
        return " ".join(s.split()).casefold()

    for n, question, answer in _tsv_rows(path):
        parsed = parse_unifiedqa_question(question)
        if parsed is None:
            raise _err(
                path,
                "no answer options found in the question; expected '(A) text (B) text ...' "
                "or '(a) text (b) text ...'",
                n,
            )
        inp, options = parsed
        if len(options) < 2:
            raise _err(
                path, f"expected at least 2 options in the question, found {len(options)} {list(options)}", n
            )
        empty = [chr(ord("A") + i) for i, o in enumerate(options) if not o]
        if empty:
            raise _err(path, f"option(s) {empty} have no text", n)
        if not inp:
            raise _err(path, "the question has no text before its options", n)
        hits = [i for i, o in enumerate(options) if norm(o) == norm(answer)]
        if len(hits) != 1:
            why = "is not among" if not hits else "matches more than one of"
            raise _err(path, f"answer {answer!r} {why} the options {list(options)}", n)
        examples.append(Example(inp, options, hits[0], _claim_id(path, n, f"{name}:{n}", seen)))
    return _make_task(name, examples, path)


def write_unifiedqa_tsv(task: Task, path: Path | str) -> Path:
    """Write ``task`` as UnifiedQA TSV lines ``input \\n (A) opt (B) opt ...<TAB>answer``; newlines in the
    input become the literal ``\\n``. Returns the path."""
    path = Path(path)
    lines = []
    for ex in task.examples:
        if len(ex.options) > 26:
            raise DataError(f"task '{task.name}' example {ex.id!r}: more than 26 options")
        parts = ex.input.split("\n")
        _check_tsv_text(task, ex, [*parts, *ex.options])
        opts = " ".join(f"({chr(ord('A') + i)}) {o}" for i, o in enumerate(ex.options))
        lines.append(f"{f' {_UQA_SEP} '.join(parts)} {_UQA_SEP} {opts}\t{ex.answer}")
    return _write_lines(path, lines)


# ---------------------------------------------------------------------------------------- column mappings

#: The keys of a column mapping (module docstring).
COLUMN_KEYS = ("input", "options", "labels", "answer", "task", "id")
_MAPPING_KEYS = (*COLUMN_KEYS, "label_names", "gold")  # the last two: older names of labels and answer
#: The files a column mapping reads, besides a ``datasets`` folder.
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl")


def parse_column_mapping(text: str) -> dict:
    """The column mapping of a ``--columns`` value such as ``input=question,options=choices,answer=label``:
    comma-separated ``KEY=COLUMN`` pairs (keys :data:`COLUMN_KEYS`), where '+' joins several columns
    (``input=premise+hypothesis``, ``options=A+B+C+D``) or, for ``labels``, the option texts (``labels=no+yes``)."""
    mapping: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise ConfigError(
                f"--columns {text!r}: {item.strip()!r} is not KEY=COLUMN; expected e.g. "
                "input=question,options=choices,answer=label"
            )
        if key not in COLUMN_KEYS:
            raise ConfigError(f"--columns {text!r}: unknown key {key!r}; the keys are {list(COLUMN_KEYS)}")
        if key in mapping:
            raise ConfigError(f"--columns {text!r}: key {key!r} is given twice")
        parts = [part.strip() for part in value.split("+")]
        if not all(parts):
            raise ConfigError(f"--columns {text!r}: {key}={value!r} has an empty name between its '+'")
        multiple = key == "labels" or (key in ("input", "options") and len(parts) > 1)
        mapping[key] = parts if multiple else value
    return mapping


def _check_mapping(mapping: Any, where: str) -> dict:
    """A column mapping, checked and normalised to ``{"input": [cols], "options": col | [cols] | None,
    "labels": (texts) | None, "answer": col, "task": col | None, "id": col | None}``."""

    def bad(msg: str) -> DataError:
        return DataError(f"{where}: column mapping: {msg}")

    if not isinstance(mapping, dict):
        raise bad(f"expected a dict with keys {list(COLUMN_KEYS)}, got {_tname(mapping)}")
    extra = sorted(set(mapping) - set(_MAPPING_KEYS), key=repr)
    if extra:
        raise bad(f"unexpected keys {extra}; expected {list(COLUMN_KEYS)}")
    m = dict(mapping)
    for key, old in (("answer", "gold"), ("labels", "label_names")):
        if old in m:
            if key in m:
                raise bad(f"give '{key}' or '{old}' (its older name), not both")
            m[key] = m.pop(old)
    for key in ("input", "answer"):
        if key not in m:
            raise bad(f"missing key '{key}'")
    inputs = [m["input"]] if isinstance(m["input"], str) else m["input"]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(c, str) and c for c in inputs):
        raise bad("'input' must be a column name or a non-empty list of column names")
    options = m.get("options")
    names = [options] if isinstance(options, str) else options
    if options is not None and not (
        isinstance(names, list)
        and len(names) >= (1 if isinstance(options, str) else 2)
        and all(isinstance(c, str) and c for c in names)
        and len(set(names)) == len(names)
    ):
        raise bad(f"'options' must name a list column or at least 2 distinct columns, got {options!r}")
    for key in ("answer", "task", "id"):
        if key in m and not (isinstance(m[key], str) and m[key]):
            raise bad(f"'{key}' must be a column name, got {m[key]!r}")
    if options is not None and "labels" in m:
        raise bad("give either 'options' (columns) or 'labels' (the option texts), not both")
    labels = _options(f"{where}: column mapping", None, "labels", m["labels"]) if "labels" in m else None
    return {
        "input": inputs,
        "options": options,
        "labels": labels,
        "answer": m["answer"],
        "task": m.get("task"),
        "id": m.get("id"),
    }


def is_dataset_folder(path: Path | str) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


@dataclass(eq=False)
class _Table:
    """The rows of one file or split. ``name``: the task of its rows when the mapping has no task column;
    ``source``: the file (or ``folder[split]``) in messages; ``label``: the same, short, in task sources.
    A JSONL file has ``lines`` (line number, object); the others a ``datasets.Dataset``."""

    name: str
    source: str
    label: str
    lines: list[tuple[int, dict]] | None = None
    dataset: Any = None

    @property
    def unit(self) -> str:
        return "line" if self.lines is not None else "row"

    def rows(self, columns: Iterable[str]) -> Iterable[tuple[int, dict]]:
        if self.lines is not None:
            return self.lines
        return enumerate(self.dataset.select_columns(sorted(set(columns))))


@contextmanager
def _datasets() -> Iterator[Any]:
    """The ``datasets`` module with its progress bars and log messages off (the errors raised say what failed)."""
    import datasets

    bars, log = datasets.is_progress_bar_enabled(), logging.getLogger("datasets")
    level = log.level
    datasets.disable_progress_bars()
    log.setLevel(logging.CRITICAL)
    try:
        yield datasets
    finally:
        log.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _saved_dataset_tables(path: Path, split: str | None = None, every_split: bool = False) -> list[_Table]:
    """A ``save_to_disk`` folder: a Dataset, or a DatasetDict's ``split`` (with ``every_split``: each split)."""
    with _datasets() as datasets:
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - any failure here means the folder is not a saved dataset
            raise _err(path, f"not a dataset folder saved with save_to_disk ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if every_split:
                return [_Table(s, f"{path}[{s}]", f"{path.name}[{s}]", dataset=part) for s, part in ds.items()]
            if split not in ds:
                raise _err(path, f"a DatasetDict: pass split= one of {sorted(ds)} (got {split!r})")
            return [_Table(split, f"{path}[{split}]", f"{path.name}[{split}]", dataset=ds[split])]
    if split is not None:
        raise _err(path, f"a single Dataset, not a DatasetDict; it has no split {split!r}")
    return [_Table(path.name, str(path), path.name, dataset=ds)]


def _file_table(path: Path, cache: str) -> _Table:
    """A ``.jsonl`` file (its lines), or a ``.parquet`` or ``.csv`` file read by ``datasets`` into memory
    (``cache``: a folder for its temporary files). Every CSV cell is read as its text."""
    if path.suffix not in (".parquet", ".csv"):
        return _Table(path.stem, str(path), path.name, lines=_json_lines(path))
    kind = path.suffix[1:].replace("csv", "CSV")
    with _datasets() as datasets:
        try:
            if kind == "parquet":
                ds = datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
            else:
                import pandas  # what datasets reads CSV with; here only for the header and the first row

                head = pandas.read_csv(path, nrows=1, dtype=str, na_filter=False, index_col=False)
                if head.empty:
                    raise _err(path, "no rows: expected a header line and at least one row")
                text = datasets.Features({col: datasets.Value("string") for col in head.columns})
                ds = datasets.Dataset.from_csv(
                    str(path), cache_dir=cache, keep_in_memory=True, features=text, na_filter=False, index_col=False
                )
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a pyarrow, pandas or datasets error: the file cannot be read
            cause = e.__cause__ or e  # datasets wraps the reader's error
            why = f"{type(cause).__name__}: {str(cause).strip()}"
            raise _err(path, f"cannot be read as a {kind} file ({why})") from None
    if len(ds) == 0:
        raise _err(path, "no rows")
    return _Table(path.stem, str(path), path.name, dataset=ds)


def _tables(path: Path, cache: str) -> list[_Table]:
    """The tables of a datasets folder (each split), a file, or a folder of files."""
    if path.is_dir():
        if is_dataset_folder(path):
            return _saved_dataset_tables(path, every_split=True)
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TABLE_SUFFIXES)
        if not files:
            raise _err(path, "not a datasets folder (save_to_disk), and it holds no .parquet, .csv or .jsonl file")
        stems = [p.stem for p in files]
        dup = next((s for i, s in enumerate(stems) if s in stems[:i]), None)
        if dup is not None:
            raise _err(path, f"two files named {dup!r}: {[p.name for p in files if p.stem == dup]}; keep one")
        return [_file_table(p, cache) for p in files]
    if not path.is_file():
        raise _err(path, "no such file or folder")
    if path.suffix not in TABLE_SUFFIXES:
        raise _err(
            path,
            "a column mapping reads a datasets folder (save_to_disk), a .parquet, .csv or .jsonl file or a "
            f"folder of them, not a {path.suffix or 'suffix-less'} file",
        )
    return [_file_table(path, cache)]


def _field(table: _Table, n: int, rec: dict, col: str, role: str) -> Any:
    if col not in rec:
        raise _err(
            table.source,
            f"missing field '{col}' (the mapping's {role} column; this {table.unit} has {sorted(rec)})",
            n,
            table.unit,
        )
    return rec[col]


def _option_cells(table: _Table, n: int, rec: dict, cols: list[str]) -> tuple[str, ...]:
    """The options held one per column; empty cells at the end are dropped (a row with fewer options)."""
    values = [_field(table, n, rec, col, "options") for col in cols]
    while values and values[-1] in (None, ""):
        values.pop()
    for col, value in zip(cols, values, strict=False):
        if not isinstance(value, str) or not value:
            got = "an empty cell" if value in (None, "") else _tname(value)
            raise _err(
                table.source,
                f"field '{col}': expected an option's text, got {got} (only the last option columns may be empty)",
                n,
                table.unit,
            )
    return _options(table.source, n, "+".join(cols), values, table.unit)


_DIGITS = re.compile(r"[0-9]+")


def _answer(table: _Table, n: int, rec: dict, col: str, options: tuple[str, ...]) -> int:
    """The gold index: an integer (from 0), the option's text, or digits that are no option's text."""
    value = _field(table, n, rec, col, "answer")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # an integer column with gaps is read as floats
    if value is None or value == "" or value != value:  # value != value: NaN
        raise _err(table.source, f"field '{col}' is empty: expected an option index or an option's text", n, table.unit)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _err(
            table.source,
            f"field '{col}': expected an option index or the answer string, got {_tname(value)}",
            n,
            table.unit,
        )
    if isinstance(value, str):
        if value in options:
            return options.index(value)
        if not _DIGITS.fullmatch(value.strip()):
            why = f"answer {value!r} is not one of the options {list(options)}"
            raise _err(table.source, f"field '{col}': {why}", n, table.unit)
        value = int(value)
    if not 0 <= value < len(options):
        raise _err(
            table.source,
            f"field '{col}': gold index {value} out of range for {len(options)} options {list(options)}",
            n,
            table.unit,
        )
    return value


def _row_id(table: _Table, n: int, rec: dict, col: str | None, seen: dict[str, str]) -> str:
    """The example id: the ``col`` field when the row has one (a non-empty string or an integer), else
    ``{table}:{line or row}``; unique within a task."""
    if col is None or col not in rec:
        ex_id = f"{table.name}:{n}"
    else:
        value = rec[col]
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            why = f"expected a non-empty string or an integer id, got {value!r}"
            raise _err(table.source, f"field '{col}': {why}", n, table.unit)
        ex_id = str(value)
    if ex_id in seen:
        raise _err(table.source, f"duplicate example id {ex_id!r} (also on {seen[ex_id]})", n, table.unit)
    seen[ex_id] = f"{table.unit} {n} of {table.label}"
    return ex_id


def _row_task(table: _Table, n: int, rec: dict, col: str, names: list[str] | None) -> str:
    """The task a row names in its task column (a ClassLabel's index is its name)."""
    value = _field(table, n, rec, col, "task")
    if isinstance(value, int) and not isinstance(value, bool):
        value = names[value] if names is not None and 0 <= value < len(names) else str(value)
    if not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise _err(
            table.source,
            f"field '{col}': {value!r} is not a task name (expected a non-empty string without '/', '\\' or NUL)",
            n,
            table.unit,
        )
    return value


def _class_names(feature: Any) -> list[str] | None:
    return list(feature.names) if type(feature).__name__ == "ClassLabel" else None


def _tasks_from_tables(tables: list[_Table], m: dict) -> tuple[dict[str, Task], dict[str, str]]:
    """The tasks in ``tables`` read through the checked mapping ``m`` and, per task, where its rows came from."""
    options = [m["options"]] if isinstance(m["options"], str) else m["options"] or []
    roles = {col: "input" for col in m["input"]} | {col: "options" for col in options} | {m["answer"]: "answer"}
    roles |= {m[key]: key for key in ("task", "id") if m[key]}
    examples: dict[str, list[Example]] = {}
    seen: dict[str, dict[str, str]] = {}
    came_from: dict[str, list[_Table]] = {}
    for table in tables:
        labels, task_names = m["labels"], None
        if table.dataset is not None:
            missing = next((col for col in roles if col not in table.dataset.column_names), None)
            if missing is not None:
                raise _err(
                    table.source,
                    f"no column '{missing}' (the column mapping's {roles[missing]} column); its columns are "
                    f"{table.dataset.column_names}",
                )
            features = table.dataset.features
            if m["options"] is None and labels is None and _class_names(features[m["answer"]]):
                labels = _options(table.source, None, f"{m['answer']} (ClassLabel names)", features[m["answer"]].names)
            task_names = _class_names(features[m["task"]]) if m["task"] else None
        if m["options"] is None and labels is None:
            raise _err(
                table.source,
                "the column mapping needs 'options' (a list column, or one column per option) or 'labels' "
                "(also 'label_names': the option texts)",
            )
        for n, rec in table.rows(roles):
            task = table.name if m["task"] is None else _row_task(table, n, rec, m["task"], task_names)
            for col in m["input"]:
                _field(table, n, rec, col, "input")
            texts = [_str_field(table.source, n, rec, col, unit=table.unit) for col in m["input"]]
            if labels is not None:
                options = labels
            elif isinstance(m["options"], str):
                value = _field(table, n, rec, m["options"], "options")
                options = _options(table.source, n, m["options"], value, table.unit)
            else:
                options = _option_cells(table, n, rec, m["options"])
            gold = _answer(table, n, rec, m["answer"], options)
            ex_id = _row_id(table, n, rec, m["id"], seen.setdefault(task, {}))
            examples.setdefault(task, []).append(Example("\n".join(texts), options, gold, ex_id))
            if table not in came_from.setdefault(task, []):
                came_from[task].append(table)
    kind = "classification" if m["options"] is None else None  # fixed labels; else inferred
    tasks = {
        name: _make_task(name, exs, ", ".join(t.source for t in came_from[name]), kind)
        for name, exs in examples.items()
    }
    sources = {
        name: f"rows of {', '.join(t.label for t in parts)} with {m['task']} = {name!r}"
        if m["task"]
        else ", ".join(t.label for t in parts)
        for name, parts in came_from.items()
    }
    return tasks, sources


def read_columns(path: Path | str, mapping: dict, name: str | None = None, split: str | None = None) -> Task:
    """One task read through a column mapping (module docstring) from a ``datasets`` folder (``split`` picks a
    DatasetDict's split), a ``.parquet`` or ``.csv`` file, or a JSONL file (any other name). ``name`` defaults
    to the folder's name or the file's name without suffix."""
    path = Path(path)
    m = _check_mapping(mapping, str(path))
    if m["task"] is not None:
        raise _err(path, "column mapping: 'task' splits the rows into several tasks; read them with read_column_data")
    with tempfile.TemporaryDirectory(prefix="abmll-columns-") as cache:
        if path.is_dir():
            (table,) = _saved_dataset_tables(path, split)
        elif split is not None:
            raise _err(path, f"split={split!r} applies to a datasets folder, not a file")
        elif path.suffix in (".parquet", ".csv"):
            table = _file_table(path, cache)
        else:
            table = _Table(path.stem, str(path), path.name, lines=_json_lines(path))
        table.name = name or (path.name if path.is_dir() else path.stem)
        tasks, _ = _tasks_from_tables([table], m)
    return tasks[table.name]


@dataclass
class ColumnData:
    """The tasks of a source read through a column mapping (:func:`read_column_data`), by name, with where
    each task's examples came from (``sources``). :func:`load_training_tasks` and
    :func:`abmll.evaluation.load_episodes` take it in place of a MetaICL folder."""

    path: Path
    mapping: dict
    tasks: dict[str, Task]
    sources: dict[str, str]

    def task(self, name: str) -> Task:
        """The task ``name``; one :class:`DataError` listing the tasks there are when there is none."""
        if name not in self.tasks:
            have = sorted(self.tasks)
            shown = ", ".join(have[:30]) + (f" ... ({len(have)} in all)" if len(have) > 30 else "")
            col = self.mapping.get("task")
            by = f"the values of its column '{col}'" if col else "one per file or split"
            raise DataError(f"{self.path}: no task {name!r} in this data (its tasks, {by}: {shown})")
        return self.tasks[name]


def read_column_data(path: Path | str, mapping: dict) -> ColumnData:
    """Every task of a ``datasets`` folder (a Dataset, or each split of a DatasetDict), a ``.parquet``,
    ``.csv`` or ``.jsonl`` file, or a folder of such files, read through a column mapping (module docstring).
    With a ``task`` column each row belongs to the task it names, over all files and splits; without one each
    file or split is a task, named by the file's name without suffix or by the split."""
    path = Path(path)
    m = _check_mapping(mapping, str(path))
    with tempfile.TemporaryDirectory(prefix="abmll-columns-") as cache:
        tables = _tables(path, cache)
        if m["task"] is None:
            for table in tables:
                _check_task_name(table.name, table.source)
        tasks, sources = _tasks_from_tables(tables, m)
    return ColumnData(path, json.loads(json.dumps(mapping)), tasks, sources)


def write_jsonl(task: Task, path: Path | str) -> Path:
    """Write ``task`` as JSONL lines ``{"id", "input", "options", "gold"}`` (gold an index), readable with
    ``read_columns(path, {"input": "input", "options": "options", "gold": "gold", "id": "id"})``."""
    _check_ids(task)
    lines = (
        {
            "id": ex.id or f"{task.name}:{i + 1}",
            "input": ex.input,
            "options": list(ex.options),
            "gold": ex.gold,
        }
        for i, ex in enumerate(task.examples)
    )
    return _write_lines(Path(path), (json.dumps(line, ensure_ascii=False) for line in lines))
