"""Summing LoRA updates: one adapter whose update is exactly the sum of several adapters'.

A LoRA update is ``s * B @ A`` per target module (``s`` = ``lora_alpha / r``). Stacking the
factors, ``A' = [A1; A2]`` and ``B' = [s1 / s * B1, s2 / s * B2]`` with ``r' = r1 + r2`` and
``lora_alpha' = s * r'`` (so the scaling stays the first adapter's ``s = s1``), gives
``s * B' @ A' = s1 * B1 @ A1 + s2 * B2 @ A2``: the sum of both updates, with no
approximation, and adapters of the same scaling keep their factors as they were (so training
on from the sum moves at the pace training moved them). The rank grows with every adapter
summed; with ``max_rank`` (the engine serves adapters up to its ``max_lora_rank``) a larger
sum is cut to its best approximation of that rank (truncated SVD of each module's update,
computed from the factors, Eckart-Young), which keeps the directions the updates share and
drops the weakest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.training.adapter_files import CONFIG, WEIGHTS, atomic_dir

if TYPE_CHECKING:
    import torch


def lora_scaling(config: dict[str, Any]) -> float:
    """``lora_alpha / r`` of a PEFT LoRA config (one rank and alpha for every module).

    Raises:
        ValueError: rsLoRA, or per-module ranks or alphas (not summed here).
    """
    if config.get("use_rslora"):
        raise ValueError("rsLoRA adapters are not summed")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("adapters with per-module ranks or alphas are not summed")
    return float(config["lora_alpha"]) / int(config["r"])


def exact_sum_refusal(config: dict[str, Any], rank: int, max_rank: int) -> str | None:
    """Why an adapter of ``config`` plus a rank-``rank`` one cannot be summed exactly within
    ``max_rank`` (the sum would not be written, or be cut by SVD), or None when it can."""
    try:
        lora_scaling(config)
    except ValueError as e:
        return str(e)
    total = int(config["r"]) + rank
    if total > max_rank:
        return f"rank {config['r']} + {rank} > {max_rank} (the sum would be cut by SVD)"
    return None


def low_rank(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(B', A')`` of rank ``rank`` whose product is the best rank-``rank``
    approximation of ``b @ a`` (exact when ``b @ a`` has no larger rank), without forming it."""
    import torch

    qb, rb = torch.linalg.qr(b.double())  # b = qb rb, qb: (out, R)
    qa, ra = torch.linalg.qr(a.double().T)  # a = ra^T qa^T, qa: (in, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # b @ a = qb u diag(s) vh qa^T
    k = min(rank, s.numel())
    root = s[:k].sqrt()  # the singular values split evenly between the factors
    new_b = (qb @ u[:, :k]) * root
    new_a = root[:, None] * (vh[:k] @ qa.T)
    return new_b.to(b.dtype), new_a.to(a.dtype)


def sum_adapters(
    adapter_dirs: Sequence[Path],
    out_dir: Path,
    *,
    weights: Sequence[float] | None = None,
    max_rank: int | None = None,
) -> Path:
    """Writes the adapter whose update is the sum of ``adapter_dirs``' updates, each times its
    ``weights`` entry (1.0 each by default), to ``out_dir``, of rank ``max_rank`` at most (see
    the module's docstring).

    The first adapter's config is kept, with ``r`` set to the rank written and ``lora_alpha``
    to keep the first adapter's scaling.

    Raises:
        ValueError: fewer than two adapters, or adapters of other target modules, shapes or
            scaling rules.
        FileExistsError: ``out_dir`` exists.
    """
    from safetensors.torch import load_file

    if len(adapter_dirs) < 2:
        raise ValueError("summing needs at least two adapters")
    if weights is not None and len(weights) != len(adapter_dirs):
        raise ValueError(f"{len(weights)} weights for {len(adapter_dirs)} adapters")
    if out_dir.exists():
        raise FileExistsError(f"adapter directory {out_dir} already exists")
    configs = [json.loads((d / CONFIG).read_text()) for d in adapter_dirs]
    factors = list(weights) if weights is not None else [1.0] * len(configs)
    scaling = lora_scaling(configs[0])  # the sum's: each B is rescaled to it
    scales = [lora_scaling(c) * w / scaling for c, w in zip(configs, factors, strict=True)]
    tensors = [load_file(str(d / WEIGHTS)) for d in adapter_dirs]
    for d, t in zip(adapter_dirs[1:], tensors[1:], strict=True):
        if set(t) != set(tensors[0]):
            raise ValueError(f"adapter {d.name} targets other modules than {adapter_dirs[0].name}")
    summed = _stacked(tensors, scales)
    rank = sum(int(c["r"]) for c in configs)
    if max_rank is not None and rank > max_rank:
        for a_key in [k for k in summed if ".lora_A." in k]:
            b_key = a_key.replace(".lora_A.", ".lora_B.")
            summed[b_key], summed[a_key] = low_rank(summed[b_key], summed[a_key], max_rank)
        rank = max_rank
    alpha = scaling * rank
    config = {**configs[0], "r": rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha}
    _write(out_dir, config, summed)
    return out_dir


def _stacked(
    tensors: Sequence[dict[str, torch.Tensor]], scales: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Every module's A factors stacked by rows, its B factors (times their scale) by columns."""
    import torch

    summed: dict[str, torch.Tensor] = {}
    for key in sorted(tensors[0]):
        parts = [t[key] for t in tensors]
        if ".lora_A." in key:
            summed[key] = torch.cat(parts, dim=0)
        elif ".lora_B." in key:
            summed[key] = torch.cat([p * s for p, s in zip(parts, scales, strict=True)], dim=1)
        else:
            raise ValueError(f"not a LoRA factor: {key} (modules_to_save are not summed)")
    return summed


def _write(out_dir: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_dir(out_dir, mode=0o755) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
