"""Readers and writers for task files (column-mapped data in :mod:`abmll.tasks.columns`, the shared checks in
:mod:`abmll.tasks.files`). Every problem in a file raises one :class:`DataError` whose message
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

About 470 lines, a tenth of them the layout description and ``__all__``: the three file formats of the paper's
data share their naming rules and fallbacks, which are kept in one place.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from abmll.errors import DataError
from abmll.tasks.columns import (
    TABLE_SUFFIXES,
    ColumnData,
    is_dataset_folder,
    parse_column_mapping,
    read_column_data,
    read_columns,
    write_jsonl,
)
from abmll.tasks.data import Example, Task, example_key
from abmll.tasks.files import (
    SETTING_KEYS,
    SPLITS,
    _check_ids,
    _check_task_name,
    _claim_id,
    _config_paths,
    _err,
    _json_lines,
    _line_id,
    _lines,
    _make_task,
    _missing_file,
    _name_from_file,
    _options,
    _read_json,
    _str_field,
    _task_dir,
    _tname,
    _write_lines,
    find_task_config,
    read_task_config,
)

__all__ = [
    "ColumnData",
    "SETTING_KEYS",
    "SPLITS",
    "TABLE_SUFFIXES",
    "TRAIN_FILE_K",
    "TRAIN_FILE_SEED",
    "find_task_config",
    "is_dataset_folder",
    "load_metaicl_tasks",
    "load_training_tasks",
    "metaicl_files",
    "metaicl_path",
    "parse_column_mapping",
    "parse_unifiedqa_question",
    "read_column_data",
    "read_columns",
    "read_crossfit_task",
    "read_crossfit_tsv",
    "read_metaicl_file",
    "read_metaicl_split_files",
    "read_metaicl_task",
    "read_setting",
    "read_task_config",
    "read_training_task",
    "read_unifiedqa_tsv",
    "union_of_files",
    "write_jsonl",
    "write_metaicl_task",
    "write_tsv",
    "write_unifiedqa_tsv",
]


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
    task: Task, data_dir: Path | str, k: int | None = 16, seed: int = 100, split: str = "train"
) -> Path:
    """Write ``task`` as ``{data_dir}/{task}/{task}_{k}_{seed}_{split}.jsonl``, or as its whole-task file
    ``{data_dir}/{task}/{task}.jsonl`` when ``k`` is None (options on every line, the example id as ``"id"``
    when set); returns the file's path."""
    _check_ids(task)
    whole = Path(data_dir) / task.name / f"{task.name}.jsonl"
    path = metaicl_path(data_dir, task.name, k, seed, split) if k is not None else whole
    lines = [
        {"task": task.name, "input": ex.input, "output": ex.answer, "options": list(ex.options)}
        | ({"id": ex.id} if ex.id else {})
        for ex in task.examples
    ]
    return _write_lines(path, (json.dumps(line, ensure_ascii=False) for line in lines))


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


