"""Test-only pipelines for the worker: a slow one that registers and promotes through fenced().

Selected in worker subprocesses with
`SELFADAPT_PIPELINE__PIPELINE_FACTORY=tests.support.slow_pipeline:run`; its pace comes from
`SLOW_PIPELINE_STEPS` and `SLOW_PIPELINE_STEP_S`. It writes registry rows directly (a fake
blob, no PEFT files), exactly the way the real pipeline must: keyed by job id, inside fenced().
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from adapters_store.models import (
    CHAMPION,
    AdapterStatus,
    AdapterVersion,
    Alias,
    AuditAction,
    AuditEvent,
    Namespace,
)
from app.db.models import utcnow
from workers.context import JobContext


@dataclass
class Result:
    decision: str
    reasons: list[str] = field(default_factory=list)
    version_id: int | None = None
    scores: dict[str, Any] | None = None


async def _steps(ctx: JobContext, stage: str) -> None:
    steps = int(os.environ.get("SLOW_PIPELINE_STEPS", "5"))
    delay = float(os.environ.get("SLOW_PIPELINE_STEP_S", "0.2"))
    for step in range(steps):
        await ctx.progress(stage, step / steps)
        await ctx.event("loss" if stage == "train" else "metric", f"{stage} step {step}", step=step)
        await asyncio.sleep(delay)


async def _audit(session: AsyncSession, ctx: JobContext, action: str, target: str) -> None:
    session.add(
        AuditEvent(
            at=utcnow(),
            actor="worker",
            action=action,
            namespace=ctx.namespace,
            target=target,
            after={"job_id": ctx.job_id},
        )
    )


async def register_once(session: AsyncSession, ctx: JobContext) -> AdapterVersion:
    """The job's version: the one an earlier attempt committed, else a new one."""
    existing = await session.scalar(
        select(AdapterVersion).where(AdapterVersion.job_id == ctx.job_id)
    )
    if existing is not None:
        return existing
    ns = await session.scalar(select(Namespace).where(Namespace.name == ctx.namespace))
    assert ns is not None
    number = (
        await session.execute(
            update(Namespace)
            .where(Namespace.id == ns.id)
            .values(last_version=Namespace.last_version + 1)
            .returning(Namespace.last_version)
        )
    ).scalar_one()
    row = AdapterVersion(
        namespace_id=ns.id,
        version=number,
        status=AdapterStatus.candidate,
        base_model="test",
        blob_sha256="0" * 64,
        size_bytes=0,
        peft_config={},
        rank=1,
        job_id=ctx.job_id,
        created_at=utcnow(),
        created_by="worker",
    )
    session.add(row)
    await session.flush()
    await _audit(session, ctx, AuditAction.version_create, f"{ctx.namespace}@v{number}")
    return row


async def promote_once(session: AsyncSession, ctx: JobContext, version: AdapterVersion) -> None:
    alias = await session.scalar(
        select(Alias).where(Alias.namespace_id == version.namespace_id, Alias.name == CHAMPION)
    )
    if alias is not None and alias.version_id == version.id:
        return
    if alias is None:
        session.add(
            Alias(
                namespace_id=version.namespace_id,
                name=CHAMPION,
                version_id=version.id,
                pinned=False,
                updated_at=utcnow(),
            )
        )
    else:
        alias.version_id = version.id
    version.status = AdapterStatus.promoted
    await _audit(session, ctx, AuditAction.version_promote, f"{ctx.namespace}@v{version.version}")


async def run(ctx: JobContext) -> Result:
    """self_edit → train (slow) → register → evaluate (slow) → gate → promote."""
    await ctx.progress("self_edit", 0.0)
    assert await ctx.documents(), "a job always has documents"
    await _steps(ctx, "train")
    async with ctx.fenced() as session:
        version = await register_once(session, ctx)
        version_id = version.id
    await _steps(ctx, "evaluate")
    await ctx.progress("gate", 0.0)
    async with ctx.fenced() as session:
        row = await session.get(AdapterVersion, version_id)
        assert row is not None
        await promote_once(session, ctx, row)
    return Result("promoted", ["test pipeline"], version_id, {"candidate": {"f1": 1.0}})


async def fail(ctx: JobContext) -> Result:
    """Always fails (retry tests)."""
    await ctx.progress("self_edit", 0.5)
    raise RuntimeError("boom")


async def wait_forever(ctx: JobContext) -> Result:
    """Never finishes by itself (cancel and takeover tests)."""
    await ctx.progress("train", 0.1)
    await asyncio.Event().wait()
    raise AssertionError("unreachable")
