"""The engine's dtype: float32 on a CPU (answers that do not depend on the batch), bf16 on a GPU."""

from __future__ import annotations

from app.engine.dtype import engine_dtype, resolve_dtype


def test_auto_picks_float32_on_a_cpu_and_bfloat16_on_a_gpu() -> None:
    assert engine_dtype("auto", on_cpu=True) == "float32"
    assert engine_dtype("auto", on_cpu=False) == "bfloat16"


def test_an_explicit_dtype_wins() -> None:
    assert engine_dtype("bfloat16", on_cpu=True) == "bfloat16"
    assert engine_dtype("float16", on_cpu=False) == "float16"
    assert resolve_dtype("float32") == "float32"
