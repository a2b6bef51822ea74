"""What earlier ReSTEM jobs of a namespace learned, read back from the jobs table."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from adapters_store.models import Namespace
from app.db.jobs import AdaptationJob, JobKind, JobStatus


async def latest_format_stats(session: AsyncSession, namespace: str) -> dict[str, Any] | None:
    """The reward statistics per self-edit format of the namespace's last succeeded ReSTEM job
    (`FormatStats.as_json`), or None when it has none."""
    scores = await session.scalar(
        select(AdaptationJob.scores)
        .join(Namespace, Namespace.id == AdaptationJob.namespace_id)
        .where(
            Namespace.name == namespace,
            AdaptationJob.kind == JobKind.restem,
            AdaptationJob.status == JobStatus.succeeded,
        )
        .order_by(AdaptationJob.id.desc())
        .limit(1)
    )
    stats = (scores or {}).get("format_stats")
    return stats if isinstance(stats, dict) else None
