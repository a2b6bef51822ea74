"""One adaptation attempt: claim the lease, heartbeat it, run the pipeline, write the outcome."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import pipeline_repo
from app.db.jobs import (
    AdaptationJob,
    Decision,
    DocumentState,
    EventKind,
    JobEvent,
    JobKind,
    JobStage,
    JobStatus,
)
from app.db.models import utcnow
from app.services.jobs import JobQueue
from app.settings import Settings
from workers.context import JobContext
from workers.leases import JobCancelled, Lease, Leases, StaleAttempt

if TYPE_CHECKING:
    from adapters_store.registry import AdapterRegistry
    from workers.gateway_client import GatewayClient

logger = logging.getLogger(__name__)

Pipeline = Callable[[JobContext], Coroutine[Any, Any, Any]]
"""`async def run_pipeline(ctx) -> PipelineResult(decision, reasons, version_id, scores)`."""

DOC_STATE = {
    Decision.promoted: DocumentState.learned,
    Decision.rejected: DocumentState.rejected,
    Decision.pending_review: DocumentState.adapting,  # until an admin decides
}


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _event(lease: Lease, kind: EventKind, message: str, **data: Any) -> JobEvent:
    return JobEvent(
        job_id=lease.job_id,
        attempt=lease.attempt,
        at=utcnow(),
        kind=kind,
        message=message,
        data=data,
    )


class JobRunner:
    """Runs attempts of adaptation jobs for one worker (one at a time)."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        queue: JobQueue | None,
        pipeline: Pipeline,
        registry_factory: Callable[[], AdapterRegistry],
        gateway_factory: Callable[[], GatewayClient],
        owner: str | None = None,
        restem: Pipeline | None = None,
    ) -> None:
        """`pipeline` runs adaptation jobs; `restem` runs ReSTEM jobs (default:
        workers.restem.job.run_restem_job)."""
        self.settings = settings
        self.leases = Leases(sessionmaker, lease_s=settings.pipeline.lease_s)
        self.queue = queue
        self.pipeline = pipeline
        self.restem = restem
        self.owner = owner or worker_id()
        self._registry_factory = registry_factory
        self._gateway_factory = gateway_factory

    async def run(self, job_id: str) -> dict[str, Any]:
        """Claims and runs `job_id` once; returns a JSON-safe summary for SAQ."""
        lease = await self.leases.claim(job_id, self.owner)
        if lease is None:
            logger.info("job %s is not claimable (running elsewhere or finished)", job_id)
            return {"job_id": job_id, "outcome": "skipped"}
        logger.info("claimed job %s attempt %d", job_id, lease.attempt, extra={"run_id": job_id})
        try:
            refused = await self._start(lease)
            if refused is not None:
                return {"job_id": job_id, "attempt": lease.attempt, "outcome": refused}
            ctx = JobContext(
                lease=lease,
                leases=self.leases,
                settings=self.settings,
                artifacts_dir=self.settings.data_dir / "jobs" / job_id / f"attempt-{lease.attempt}",
                registry_factory=self._registry_factory,
                gateway_factory=self._gateway_factory,
            )
            try:
                outcome = await self._attempt(ctx)
            finally:
                await ctx.aclose()
        except StaleAttempt as e:
            logger.warning("job %s attempt %d is stale: %s", job_id, lease.attempt, e)
            outcome = "stale"
        return {"job_id": job_id, "attempt": lease.attempt, "outcome": outcome}

    async def _start(self, lease: Lease) -> str | None:
        """Marks the attempt started; finishes the job instead when cancelled or out of tries."""
        async with self.leases.fenced(lease, allow_cancelled=True) as s:
            job = await s.get(AdaptationJob, lease.job_id, populate_existing=True)
            assert job is not None
            now = utcnow()
            if job.cancel_requested or job.attempt > job.max_attempts:
                cancelled = job.cancel_requested
                job.status = JobStatus.cancelled if cancelled else JobStatus.failed
                job.finished_at, job.lease_expires_at = now, None
                if not cancelled:
                    job.error = f"gave up after {job.max_attempts} attempts (lease expired)"
                await pipeline_repo.set_document_states(
                    s, job_id=job.id, state=DocumentState.failed
                )
                s.add(_event(lease, EventKind.error, f"job {job.status}", status=str(job.status)))
                return str(job.status)
            job.started_at = job.started_at or now
            job.stage, job.progress = JobStage.queued, 0.0
            await pipeline_repo.set_document_states(s, job_id=job.id, state=DocumentState.adapting)
            s.add(
                _event(
                    lease,
                    EventKind.stage,
                    f"attempt {lease.attempt} started",
                    owner=lease.owner,
                    stage="queued",
                )
            )
        return None

    async def _pipeline_for(self, job_id: str) -> Pipeline:
        async with self.leases.sessionmaker() as session:
            kind = await session.scalar(
                select(AdaptationJob.kind).where(AdaptationJob.id == job_id)
            )
        if kind != JobKind.restem:
            return self.pipeline
        if self.restem is None:
            from workers.restem.job import run_restem_job

            self.restem = run_restem_job
        return self.restem

    async def _attempt(self, ctx: JobContext) -> str:
        task = asyncio.create_task((await self._pipeline_for(ctx.job_id))(ctx))
        beat = asyncio.create_task(self._heartbeat(ctx, task))
        try:
            result = await task
        except asyncio.CancelledError:
            if ctx.abort_reason is None:  # the worker itself is stopping
                task.cancel()
                await asyncio.shield(self._release(ctx.lease))
                raise
            error: BaseException = ctx.abort_reason
        except Exception as e:
            error = ctx.abort_reason or e
        else:
            await self._complete(ctx.lease, result)
            return "succeeded"
        finally:
            beat.cancel()
        if isinstance(error, StaleAttempt):
            raise error
        if isinstance(error, JobCancelled):
            await self._cancelled(ctx.lease)
            return "cancelled"
        return await self._failed(ctx.lease, error)

    async def _heartbeat(self, ctx: JobContext, task: asyncio.Task[Any]) -> None:
        while not task.done():
            await asyncio.sleep(self.settings.pipeline.heartbeat_s)
            try:
                await self.leases.heartbeat(ctx.lease)
            except (StaleAttempt, JobCancelled) as e:
                logger.warning("job %s: %s; stopping the attempt", ctx.job_id, e)
                ctx.abort(e)
                task.cancel()
                return
            except Exception:  # a database hiccup: the lease outlives a few missed beats
                logger.warning("heartbeat of job %s failed", ctx.job_id, exc_info=True)

    async def _complete(self, lease: Lease, result: Any) -> None:
        decision = Decision(str(getattr(result, "decision", Decision.pending_review)))
        async with self.leases.fenced(lease, allow_cancelled=True) as s:
            job = await s.get(AdaptationJob, lease.job_id, populate_existing=True)
            assert job is not None
            job.status, job.stage, job.progress = JobStatus.succeeded, JobStage.done, 1.0
            job.decision = decision
            job.reasons = [str(r) for r in getattr(result, "reasons", None) or []]
            job.result_version_id = getattr(result, "version_id", None)
            job.scores = getattr(result, "scores", None)
            job.finished_at, job.lease_expires_at, job.error = utcnow(), None, None
            await pipeline_repo.set_document_states(s, job_id=job.id, state=DOC_STATE[decision])
            s.add(
                _event(
                    lease,
                    EventKind.decision,
                    f"decision: {decision}",
                    decision=str(decision),
                    reasons=job.reasons,
                    version_id=job.result_version_id,
                )
            )
        logger.info("job %s succeeded: %s", lease.job_id, decision, extra={"run_id": lease.job_id})

    async def _cancelled(self, lease: Lease) -> None:
        async with self.leases.fenced(lease, allow_cancelled=True) as s:
            job = await s.get(AdaptationJob, lease.job_id, populate_existing=True)
            assert job is not None
            job.status, job.finished_at, job.lease_expires_at = JobStatus.cancelled, utcnow(), None
            await pipeline_repo.set_document_states(s, job_id=job.id, state=DocumentState.failed)
            s.add(_event(lease, EventKind.stage, "job cancelled", status="cancelled"))
        logger.info("job %s cancelled", lease.job_id, extra={"run_id": lease.job_id})

    async def _failed(self, lease: Lease, error: BaseException) -> str:
        """Records the failure; re-queues the job while attempts remain."""
        message = f"{type(error).__name__}: {error}"
        logger.error(
            "job %s attempt %d failed: %s",
            lease.job_id,
            lease.attempt,
            message,
            exc_info=error,
            extra={"run_id": lease.job_id},
        )
        async with self.leases.fenced(lease, allow_cancelled=True) as s:
            job = await s.get(AdaptationJob, lease.job_id, populate_existing=True)
            assert job is not None
            retry = job.attempt < job.max_attempts and not job.cancel_requested
            job.error, job.lease_owner, job.lease_expires_at = message, None, None
            if retry:
                job.status, job.stage = JobStatus.queued, JobStage.queued
            else:
                job.status, job.finished_at = JobStatus.failed, utcnow()
                await pipeline_repo.set_document_states(
                    s, job_id=job.id, state=DocumentState.failed
                )
            s.add(
                _event(
                    lease,
                    EventKind.error,
                    f"attempt {lease.attempt} failed: {message}",
                    retry=retry,
                )
            )
        if retry and self.queue is not None:
            delay = self.settings.pipeline.retry_backoff_s * 2 ** (lease.attempt - 1)
            await self.queue.try_enqueue(lease.job_id, attempt=lease.attempt, delay_s=delay)
        return "retrying" if retry else "failed"

    async def _release(self, lease: Lease) -> None:
        """Gives the job back on shutdown (the attempt it used is refunded via max_attempts)."""
        try:
            async with self.leases.fenced(lease, allow_cancelled=True) as s:
                job = await s.get(AdaptationJob, lease.job_id, populate_existing=True)
                assert job is not None
                job.status, job.stage = JobStatus.queued, JobStage.queued
                job.lease_owner, job.lease_expires_at = None, None
                job.max_attempts += 1
                s.add(_event(lease, EventKind.log, "worker stopping; job released"))
            if self.queue is not None:
                await self.queue.try_enqueue(lease.job_id, attempt=lease.attempt)
        except Exception:
            logger.warning(
                "could not release job %s; its lease will expire", lease.job_id, exc_info=True
            )
