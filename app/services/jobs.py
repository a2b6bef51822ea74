"""Adaptation jobs for the API: the SAQ queue handle, listing, events and cancellation."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from adapters_store.models import AdapterVersion, Namespace
from app.db import pipeline_repo
from app.db.jobs import (
    AdaptationJob,
    DocumentState,
    EventKind,
    JobEvent,
    JobStatus,
)
from app.db.models import utcnow
from app.errors import Conflict, NotFound
from app.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

ADAPT_TASK = "adapt_documents"
"""Name of the SAQ task a worker registers; the gateway enqueues it by name only."""


class JobQueue:
    """Enqueues adaptation jobs on SAQ. A message only says "look at job X"; SQL decides.

    The SAQ key is `<job_id>:<attempt>` (the attempt the job is at when enqueued, so the
    message that starts attempt n is `<job_id>:<n-1>`): while a message is queued or active,
    enqueuing the same key again is a no-op, so the reaper may re-enqueue as often as it likes.
    """

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    @classmethod
    def from_settings(cls, settings: Settings, url: str | None = None) -> JobQueue:
        """The queue on `url` (default settings.redis_url) named settings.pipeline.queue_name."""
        from saq import Queue

        url = url or settings.redis_url
        if not url:
            raise RuntimeError("no Redis: set SELFADAPT_REDIS_URL (or use `selfadapt up`)")
        return cls(Queue.from_url(url, name=settings.pipeline.queue_name))

    async def enqueue(self, job_id: str, *, attempt: int, delay_s: float = 0.0) -> bool:
        """Asks a worker to (re)run `job_id`; False when that attempt is already enqueued."""
        # SAQ schedules in whole seconds: round up, so a batch window is never cut short.
        scheduled = math.ceil(time.time() + delay_s) if delay_s > 0 else 0
        job = await self.queue.enqueue(
            ADAPT_TASK,
            key=f"{job_id}:{attempt}",
            job_id=job_id,
            scheduled=scheduled,
            timeout=0,  # training may take long; the SQL lease bounds an attempt instead
            heartbeat=0,
            retries=1,  # retries are decided from the SQL row, not by SAQ
        )
        return job is not None

    async def retire(self, job_id: str, *, attempt: int) -> bool:
        """Marks the message that started `attempt` aborted if it is still active (its worker
        died), so it leaves SAQ's active list; True when it did."""
        from saq.job import Status

        message = await self.queue.job(f"{job_id}:{attempt - 1}")
        if message is None or message.status != Status.ACTIVE:
            return False
        await self.queue.finish(message, Status.ABORTED, error="lease expired")
        return True

    async def try_enqueue(self, job_id: str, *, attempt: int, delay_s: float = 0.0) -> bool:
        """`enqueue`, but a Redis outage is logged, not raised: the reaper enqueues later."""
        try:
            return await self.enqueue(job_id, attempt=attempt, delay_s=delay_s)
        except Exception:
            logger.warning("could not enqueue %s; a worker's reaper will", job_id, exc_info=True)
            return False

    async def close(self) -> None:
        await self.queue.disconnect()


@dataclass
class JobView:
    """A job with the names the API shows beside it."""

    job: AdaptationJob
    namespace: str
    result_version: str | None


@dataclass
class Page(Generic[T]):
    data: list[T]
    has_more: bool


_VERSION_NS = aliased(Namespace)
"""The result version's namespace: a ReSTEM job's version lives in `<ns>-policy`."""


def _view_query() -> Select[AdaptationJob, str, int, str]:
    return (
        select(AdaptationJob, Namespace.name, AdapterVersion.version, _VERSION_NS.name)
        .join(Namespace, Namespace.id == AdaptationJob.namespace_id)
        .outerjoin(AdapterVersion, AdapterVersion.id == AdaptationJob.result_version_id)
        .outerjoin(_VERSION_NS, _VERSION_NS.id == AdapterVersion.namespace_id)
    )


def _view(row: Any) -> JobView:
    job, ns, version, version_ns = row
    name = f"{version_ns}@v{version}" if version else None
    return JobView(job=job, namespace=ns, result_version=name)


class JobService:
    """Reads and cancels jobs. Every query runs in its own short session."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    async def list_jobs(
        self,
        *,
        namespace: str | None = None,
        status: JobStatus | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> Page[JobView]:
        """Newest first; `after` is the last id of the previous page (OpenAI's cursor)."""
        stmt = _view_query().order_by(AdaptationJob.id.desc()).limit(limit + 1)
        if namespace is not None:
            stmt = stmt.where(Namespace.name == namespace)
        if status is not None:
            stmt = stmt.where(AdaptationJob.status == status)
        if after is not None:
            stmt = stmt.where(AdaptationJob.id < after)
        async with self._sessionmaker() as session:
            rows = (await session.execute(stmt)).all()
        return Page([_view(r) for r in rows[:limit]], has_more=len(rows) > limit)

    async def get(self, job_id: str) -> JobView:
        async with self._sessionmaker() as session:
            return await self._get(session, job_id)

    async def _get(self, session: AsyncSession, job_id: str) -> JobView:
        row = (await session.execute(_view_query().where(AdaptationJob.id == job_id))).first()
        if row is None:
            raise NotFound(
                f"No adaptation job with id '{job_id}'.", param="job_id", code="job_not_found"
            )
        return _view(row)

    async def events(
        self, job_id: str, *, after: int | None = None, limit: int = 20
    ) -> Page[JobEvent]:
        """Newest first; `after` is the last event id of the previous page."""
        await self.get(job_id)
        stmt = (
            select(JobEvent)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id.desc())
            .limit(limit + 1)
        )
        if after is not None:
            stmt = stmt.where(JobEvent.id < after)
        async with self._sessionmaker() as session:
            rows: Sequence[JobEvent] = (await session.scalars(stmt)).all()
        return Page(list(rows[:limit]), has_more=len(rows) > limit)

    async def cancel(self, job_id: str, *, actor: str) -> JobView:
        """Cancels a queued job at once; a running one stops at its next fence check.

        Raises:
            NotFound: no such job.
            Conflict: the job already succeeded or failed.
        """
        async with self._sessionmaker() as session:
            view = await self._get(session, job_id)
            job = view.job
            if job.status == JobStatus.queued and await _cancel_queued(session, job, actor):
                await session.commit()
                return await self._get(session, job_id)
            if job.status in (JobStatus.queued, JobStatus.running):  # a worker claimed it meanwhile
                await _request_cancel(session, job, actor)
                await session.commit()
                return await self._get(session, job_id)
            if job.status == JobStatus.cancelled:
                return view
            raise Conflict(
                f"Job '{job_id}' already {job.status}; only queued or running jobs can be "
                "cancelled.",
                param="job_id",
                code="job_not_cancellable",
            )


async def _cancel_queued(session: AsyncSession, job: AdaptationJob, actor: str) -> bool:
    now = utcnow()
    result = await session.execute(
        update(AdaptationJob)
        .where(AdaptationJob.id == job.id, AdaptationJob.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, cancel_requested=True, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    await pipeline_repo.set_document_states(session, job_id=job.id, state=DocumentState.failed)
    session.add(
        JobEvent(
            job_id=job.id,
            attempt=job.attempt,
            at=now,
            kind=EventKind.stage,
            message=f"cancelled by {actor}",
            data={"status": "cancelled"},
        )
    )
    await session.flush()
    session.expire_all()
    return True


async def _request_cancel(session: AsyncSession, job: AdaptationJob, actor: str) -> None:
    await session.execute(
        update(AdaptationJob)
        .where(AdaptationJob.id == job.id, AdaptationJob.status == JobStatus.running)
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    session.add(
        JobEvent(
            job_id=job.id,
            attempt=job.attempt,
            at=utcnow(),
            kind=EventKind.log,
            message=f"cancellation requested by {actor}",
            data={},
        )
    )
    await session.flush()
    session.expire_all()
