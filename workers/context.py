"""JobContext: the StageContext one attempt runs with (documents, events, progress, fencing)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator
from contextvars import ContextVar, Token
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import pipeline_repo
from app.db.jobs import AdaptationJob, Document, EventKind, JobEvent, JobStage
from app.db.models import utcnow
from app.settings import Settings
from workers.leases import JobCancelled, Lease, Leases, StaleAttempt

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from adapters_store.registry import AdapterRegistry
    from workers.gateway_client import GatewayClient

__all__ = ["STAGE_SPANS", "JobCancelled", "JobContext", "StaleAttempt"]

logger = logging.getLogger(__name__)

STAGE_SPANS: dict[JobStage, tuple[float, float]] = {
    JobStage.queued: (0.0, 0.0),
    JobStage.self_edit: (0.0, 0.25),
    JobStage.probes: (0.25, 0.3),
    JobStage.train: (0.3, 0.8),
    JobStage.evaluate: (0.8, 0.95),
    JobStage.gate: (0.95, 1.0),
    JobStage.done: (1.0, 1.0),
}
"""Where each stage sits in the job's overall 0..1 progress."""


_FENCED: ContextVar[tuple[JobContext, AsyncSession] | None] = ContextVar("_FENCED", default=None)
"""The fenced() block the current task is in: a ContextVar, so concurrent tasks of the same
attempt that are not inside the block never share its session."""


class _Fence:
    """`ctx.fenced()`: an async context manager (also accepted as `async with await ...`)."""

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx
        self._cm: AbstractAsyncContextManager[AsyncSession] | None = None
        self._token: Token[tuple[JobContext, AsyncSession] | None] | None = None

    def __await__(self) -> Generator[Any, None, _Fence]:
        if False:  # pragma: no cover - makes this a generator without suspending
            yield
        return self

    async def __aenter__(self) -> AsyncSession:
        self._cm = self._ctx.leases.fenced(self._ctx.lease)
        session = await self._cm.__aenter__()
        self._token = _FENCED.set((self._ctx, session))
        return session

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if self._token is not None:
            _FENCED.reset(self._token)
        assert self._cm is not None
        return await self._cm.__aexit__(et, e, tb)


class JobContext:
    """One attempt's view of its job; implements workers.pipeline.StageContext.

    `progress(stage, fraction)` takes the fraction *within* the stage and maps it onto the
    job's overall progress with STAGE_SPANS. Registry writes must happen inside `fenced()`.
    """

    def __init__(
        self,
        *,
        lease: Lease,
        leases: Leases,
        settings: Settings,
        artifacts_dir: Path,
        registry_factory: Callable[[], AdapterRegistry],
        gateway_factory: Callable[[], GatewayClient],
    ) -> None:
        self.lease = lease
        self.leases = leases
        self.job_id = lease.job_id
        self.attempt = lease.attempt
        self.namespace = lease.namespace
        self.settings = settings
        self.artifacts_dir = artifacts_dir
        self.sessionmaker: async_sessionmaker[AsyncSession] = leases.sessionmaker
        self.stop_requested = threading.Event()
        """Set when the attempt must stop; training threads should poll it between steps."""
        self.abort_reason: Exception | None = None
        self._registry_factory = registry_factory
        self._gateway_factory = gateway_factory
        self._registry: AdapterRegistry | None = None
        self._gateway: GatewayClient | None = None
        self._stage: JobStage | None = None
        artifacts_dir.mkdir(parents=True, exist_ok=True)

    @property
    def registry(self) -> AdapterRegistry:
        if self._registry is None:
            self._registry = self._registry_factory()
        return self._registry

    @property
    def gateway(self) -> GatewayClient:
        if self._gateway is None:
            self._gateway = self._gateway_factory()
        return self._gateway

    def abort(self, reason: Exception) -> None:
        """Marks the attempt as stopped for `reason` (heartbeat found it stale or cancelled)."""
        self.abort_reason = reason
        self.stop_requested.set()

    async def _writer(self) -> AsyncSession | None:
        """The fenced session when our own job-row and event writes must go through it.

        PostgreSQL: always inside fenced(), whose session row-locks the job (another
        connection would wait for our own lock). SQLite has one writer: only once the fenced
        session holds the write lock; before that it stays lock-free for registry calls.
        """
        current = _FENCED.get()
        fenced = current[1] if current is not None and current[0] is self else None
        if fenced is None or self.leases.uses_row_lock:
            return fenced
        if not fenced.in_transaction():
            return None
        raw = await (await fenced.connection()).get_raw_connection()
        return fenced if getattr(raw.driver_connection, "in_transaction", False) else None

    async def documents(self) -> list[Document]:
        """This job's documents, in the order they were added."""
        async with self.sessionmaker() as session:
            ids = await session.scalar(
                select(AdaptationJob.document_ids).where(AdaptationJob.id == self.job_id)
            )
            ids = list(ids or [])
            rows = (await session.scalars(select(Document).where(Document.id.in_(ids)))).all()
        return pipeline_repo.documents_in_order(rows, ids)

    async def event(self, kind: str, message: str, **data: Any) -> None:
        """Appends a job event (kind: stage|progress|loss|metric|log|error|decision)."""
        row = JobEvent(
            job_id=self.job_id,
            attempt=self.attempt,
            at=utcnow(),
            kind=EventKind(kind),
            message=message,
            data=data,
        )
        if (session := await self._writer()) is not None:
            session.add(row)
            await session.flush()
            return
        async with self.sessionmaker() as session:
            session.add(row)
            await session.commit()

    async def progress(self, stage: str, fraction: float, *, overall: bool = False) -> None:
        """Records stage and progress and renews the lease.

        ``fraction`` is the progress within ``stage``, or with ``overall=True`` the job's
        whole progress (for jobs whose stages repeat, such as ReSTEM rounds).

        Raises:
            StaleAttempt / JobCancelled: the attempt must stop.
        """
        self._raise_if_aborted()
        try:
            current = JobStage(stage)
        except ValueError:
            logger.warning("unknown stage %r; keeping %s", stage, self._stage)
            current = self._stage or JobStage.queued
        start, end = (0.0, 1.0) if overall else STAGE_SPANS[current]
        overall_value = start + (end - start) * min(max(fraction, 0.0), 1.0)
        if current != self._stage:
            self._stage = current
            await self.event("stage", f"stage {current}", stage=str(current))
        await self._write_job(stage=current, progress=overall_value)

    async def _write_job(self, **values: Any) -> None:
        await self.leases.heartbeat(self.lease, session=await self._writer(), **values)

    def _raise_if_aborted(self) -> None:
        if self.abort_reason is not None:
            raise self.abort_reason

    async def check_fence(self) -> None:
        """Raises StaleAttempt (lease lost) or JobCancelled; also renews the lease."""
        self._raise_if_aborted()
        await self.leases.heartbeat(self.lease, session=await self._writer())

    def fenced(self) -> _Fence:
        """`async with ctx.fenced() as session:` commits only while this attempt owns the job.

        Nobody can take the job over while the block runs, so registry calls made inside
        it (`ctx.registry.register_version(..., job_id=ctx.job_id)`, `promote`) cannot come
        from a stale attempt. On SQLite, make registry calls before writing through `session`
        (SQLite has one writer; a pending write in `session` would block the registry's).
        """
        return _Fence(self)

    async def aclose(self) -> None:
        if self._gateway is not None:
            await self._gateway.aclose()
            self._gateway = None
