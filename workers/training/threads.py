"""CPU threads for training on a machine whose cores the engine shares."""

from __future__ import annotations

import os


def cpu_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads() -> int | None:
    """All cores but one on CPU (the engine's worker keeps one busy while it serves; an
    oversubscribed OpenMP pool slowed training ~10x on 2 cores), torch's default on CUDA.

    Measured 2026-11-25 on the 2-vCPU box: even with the engine idle, 2 threads trained no
    faster than 1 (121.9 s vs 110.2 s for the same 100 steps), so the default does not try to
    take the engine's core back when it is idle.
    """
    import torch

    if torch.cuda.is_available():
        return None
    return max(1, cpu_cores() - 1)
