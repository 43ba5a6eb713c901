"""What the task-file readers share: one :class:`DataError` naming the file, line and field; reading text,
JSON lines and JSON files; checking fields, option lists, ids and task names; task configs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from abmll.errors import DataError
from abmll.tasks.data import KINDS, Example, Task

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




def _check_ids(task: Task) -> None:
    ids = [ex.id for ex in task.examples if ex.id]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"task '{task.name}': duplicate example ids {dup}; the file could not be read back")


def _write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


