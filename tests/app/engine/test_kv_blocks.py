"""The engine's KV block size: 32 on CPU so a shared chat-template prefix is cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engine.kv_blocks import CPU_BLOCK_SIZE, engine_block_size
from app.engine.local import LocalEngine
from app.settings import EngineSettings


def test_unset_is_32_on_cpu_and_vllms_default_on_a_gpu() -> None:
    assert engine_block_size(None, on_cpu=True) == CPU_BLOCK_SIZE == 32
    assert engine_block_size(None, on_cpu=False) is None
    assert engine_block_size(128, on_cpu=True) == 128  # explicit wins
    assert engine_block_size(16, on_cpu=False) == 16


def test_engine_args_carry_the_block_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm")
    monkeypatch.setattr("app.engine.local._device_is_cpu", lambda: True)
    default = LocalEngine(tmp_path, EngineSettings())._engine_args()
    assert default.block_size == 32
    chosen = LocalEngine(tmp_path, EngineSettings(block_size=64))._engine_args()
    assert chosen.block_size == 64
    monkeypatch.setattr("app.engine.local._device_is_cpu", lambda: False)
    assert LocalEngine(tmp_path, EngineSettings())._engine_args().block_size is None


def test_block_size_setting_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings

    monkeypatch.setenv("SELFADAPT_ENGINE__BLOCK_SIZE", "64")
    assert Settings().engine.block_size == 64
    monkeypatch.setenv("SELFADAPT_ENGINE__BLOCK_SIZE", "0")
    with pytest.raises(ValueError, match="block_size"):
        Settings()
