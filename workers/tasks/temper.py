"""Temper stage: when a candidate learned its documents but forgot a little too much, register
and evaluate copies of it with the update scaled down (workers/training/temper.py)."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.tasks import promote
from workers.tasks.common import load_artifact
from workers.tasks.train import (
    Candidate,
    job_version,
    merge_part_key,
    merged_adapter,
    register_once,
)

if TYPE_CHECKING:
    from adapters_store.models import NamespaceSettings
    from adapters_store.registry import ResolvedVersion
    from workers.pipeline import StageContext


@dataclass
class Bisection:
    """Where tempering looks for a scale: between ``low`` (small enough: learned nothing, or
    passed, so a larger one may keep more) and ``high`` (too large: forgot too much), halving
    the interval with every copy tried."""

    low: float = 0.0
    high: float = 1.0

    def next_scale(self) -> float:
        return (self.low + self.high) / 2

    def too_large(self, scale: float) -> None:
        self.high = scale

    def too_small(self, scale: float) -> None:
        self.low = scale


def towards_champion(candidate: Candidate) -> bool:
    """An incremental candidate is tempered towards the champion it was trained from, a
    merged one towards the champion it adds to; a fresh or consolidated one (trained from the
    base) towards the base."""
    return candidate.mode.startswith(("incremental", "merge"))


def too_large(
    scores: dict[str, Any], gate: NamespaceSettings, *, candidate: Candidate
) -> str | None:
    """Why a tempered copy of ``candidate`` kept too much of its update, or None.

    Guard answers come back as the scale shrinks either way (champion and base both passed
    the guard). The earlier documents' answers (retention) come back only towards the
    champion, which knew them; towards the base they fade with the rest of the update, so a
    copy that lost them is too small, like one that lost the new documents."""
    if not towards_champion(candidate):
        return promote.guard_broken(scores, gate)
    return promote.forgot(scores, gate)


def too_small(
    scores: dict[str, Any], gate: NamespaceSettings, *, candidate: Candidate, learned: bool
) -> bool:
    """A tempered copy of ``candidate`` kept too little: it lost the new documents (or,
    scaled towards the base, the earlier ones)."""
    if not learned:
        return True
    return not towards_champion(candidate) and promote.retention_broken(scores, gate) is not None


def temper_key(candidate: Candidate, scale: float) -> str:
    """``incremental-x0.6``: the registration key (note prefix) of a tempered copy."""
    return f"{candidate.mode}-x{scale:g}"


async def temper_stage(
    ctx: StageContext, candidate: Candidate, scale: float, *, parent: ResolvedVersion | None
) -> Candidate:
    """Registers ``candidate`` with its update scaled by ``scale`` (once per job and scale).

    An incremental candidate moves towards ``parent`` (the champion it was trained from); a
    merged one keeps the champion's update and adds ``scale`` times its own part's (exactly);
    a fresh or consolidated one (trained from the base) moves towards the base.
    """
    from workers.training.temper import temper_adapter, write_tempered_manifest

    key = temper_key(candidate, scale)
    existing = await job_version(ctx, key)
    if existing is not None:
        await ctx.event("log", f"reusing {existing.name} registered by an earlier attempt")
        return existing
    towards = parent if towards_champion(candidate) else None
    part_key = merge_part_key(candidate.mode)
    if part_key is not None:
        if parent is None:
            raise ValueError(f"{candidate.name} adds to a champion, and there is none")
        part = load_artifact(ctx.artifacts_dir, f"train-{part_key}.json")
        if part is None:
            raise ValueError(f"the part {candidate.name} adds to {parent.name} is gone")
        part_dir = Path(part["adapter_dir"])
        out_dir = await merged_adapter(ctx, parent, part_dir, key=key, weight=scale)
        source = await ctx.registry.resolve(candidate.name)
        source_dir = await asyncio.to_thread(ctx.registry.blobs.path_for, source.blob_sha256)
        write_tempered_manifest(source_dir, out_dir, scale, towards="parent")
    else:
        blobs = ctx.registry.blobs
        source = await ctx.registry.resolve(candidate.name)
        source_dir = await asyncio.to_thread(blobs.path_for, source.blob_sha256)
        parent_dir = None
        if towards is not None:
            parent_dir = await asyncio.to_thread(blobs.path_for, towards.blob_sha256)
        out_dir = ctx.artifacts_dir / f"adapter-{key}"
        shutil.rmtree(out_dir, ignore_errors=True)  # a partial folder from a killed attempt
        await asyncio.to_thread(temper_adapter, source_dir, out_dir, scale, parent_dir=parent_dir)
    tempered = await register_once(
        ctx,
        out_dir,
        key,
        parent_version=parent.version if parent is not None else None,
        detail=f"{candidate.name} tempered x{scale:g}",
    )
    target = towards.name if towards is not None else "the base"
    await ctx.event(
        "log",
        f"registered candidate {tempered.name}: {candidate.name}'s update x{scale:g} "
        f"towards {target}",
        tempered_from=candidate.name,
        scale=scale,
    )
    return tempered
