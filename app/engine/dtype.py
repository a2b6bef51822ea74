"""The engine's compute dtype: float32 on a CPU, bfloat16 on a GPU.

On a CPU float32 is the default even where bf16 is native (AVX-512 BF16, AMX): there a bf16
engine's greedy answers from an adapter depended on the batch a request ran in (2026-11-27:
a promoted champion answered 2 of its 4 probes right in a batch of 8 and neither alone; PEFT
and a float32 engine gave the batched answers both ways), so the gate's evaluation, ~80
requests in flight, did not predict what a lone user gets. Its cost there, measured with
`bench.serving` (16 streams x 64 tokens, bundled model): base 138.0 vs 137.6 tokens/s, four
adapters 60.3 vs 71.1 tokens/s. On an AVX2-only CPU bf16 is emulated and slow (20.6 vs 88.4
tokens/s, 2026-11-25). Set ``SELFADAPT_ENGINE__DTYPE=bfloat16`` to trade that for speed.
"""

from __future__ import annotations


def engine_dtype(setting: str, *, on_cpu: bool) -> str:
    """``setting`` unless it is ``auto``: then float32 on a CPU, bfloat16 on a GPU."""
    if setting != "auto":
        return setting
    return "float32" if on_cpu else "bfloat16"


def resolve_dtype(setting: str) -> str:
    """``engine_dtype`` for this machine (CPU unless torch sees CUDA)."""
    import torch

    return engine_dtype(setting, on_cpu=not torch.cuda.is_available())
