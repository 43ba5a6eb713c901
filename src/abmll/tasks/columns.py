"""Column-mapped task data: a ``datasets`` folder, a parquet, CSV or JSONL file, or a folder of them, read through a
column mapping (``--columns``) into tasks (the layout is described in :mod:`abmll.tasks.readers`).

One module of about 460 lines on purpose: one column mapping, its checks, and the table readers of the four
sources (``datasets`` folder, parquet, CSV, JSONL) that every error message must name alike.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abmll.errors import ConfigError, DataError
from abmll.tasks.data import Example, Task
from abmll.tasks.files import (
    _check_ids,
    _check_task_name,
    _err,
    _json_lines,
    _make_task,
    _options,
    _str_field,
    _tname,
    _write_lines,
)

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
