"""The README's Python example runs as written, on the built-in suite; only its model-loading line is replaced
by the tiny random Llama, so that it takes seconds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MODEL_LINE = re.compile(r"^model, tokenizer = load_model\(.*$", re.M)


def python_example() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("```python\n", text.index("## Python API")) + len("```python\n")
    return text[start : text.index("\n```\n", start)]


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    from abmll.errors import AssetError
    from abmll.suite import build_suite

    try:
        build_suite()
    except AssetError as exc:
        pytest.skip(f"the built-in suite is absent and could not be fetched: {exc}")
    code = python_example()
    assert len(MODEL_LINE.findall(code)) == 1, "the example loads its model in exactly one line"
    code = MODEL_LINE.sub("from abmll.tiny import tiny_llama\nmodel, tokenizer = tiny_llama(seed=0)", code)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    printed = capsys.readouterr().out
    assert "outer_nll=" in printed and "'accuracy'" in printed and "'ece'" in printed
    assert namespace["method"].step == 3 and (tmp_path / "prior" / "manifest.json").is_file()
