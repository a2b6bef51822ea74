"""The engine's dtype: bfloat16 only where the hardware computes it natively."""

from __future__ import annotations

from pathlib import Path

from app.engine.dtype import cpu_flags, engine_dtype


def test_auto_picks_float32_on_a_cpu_without_native_bf16() -> None:
    avx2 = frozenset({"sse4_2", "avx2", "fma"})
    assert engine_dtype("auto", on_cpu=True, flags=avx2) == "float32"
    assert engine_dtype("auto", on_cpu=True, flags=avx2 | {"avx512f", "avx512_bf16"}) == "bfloat16"
    assert engine_dtype("auto", on_cpu=True, flags=avx2 | {"amx_bf16"}) == "bfloat16"
    assert engine_dtype("auto", on_cpu=False, flags=avx2) == "bfloat16"
    assert engine_dtype("float16", on_cpu=True, flags=avx2) == "float16"  # explicit wins


def test_cpu_flags_reads_the_first_cpu(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert isinstance(cpu_flags(), frozenset)  # this machine's, whatever it is
