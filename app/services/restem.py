"""Starting ReSTEM jobs: input checks, the job row (kind `restem`) and its queue message."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters_store.models import Namespace, is_derived_namespace, policy_namespace
from app.db.jobs import (
    AdaptationJob,
    Document,
    EventKind,
    JobEvent,
    JobKind,
    JobStage,
    JobStatus,
    new_id,
)
from app.db.models import utcnow
from app.errors import Conflict, InvalidRequest, NotFound
from app.services.jobs import JobQueue
from app.settings import RestemSettings

logger = logging.getLogger(__name__)

NAME_LIMIT = 63
"""Longest namespace name (adapters_store.models.NAMESPACE_RE)."""


@dataclass(frozen=True)
class RestemRequest:
    """Overrides of settings.restem for one job (None = the setting)."""

    rounds: int | None = None
    docs: int | None = None
    samples: int | None = None
    repeats: int | None = None


class RestemService:
    """Creates ReSTEM jobs; workers run them like adaptation jobs (lease, events, cancel)."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        queue: JobQueue | None,
        settings: RestemSettings,
        *,
        max_attempts: int,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._queue = queue
        self._settings = settings
        self._max_attempts = max_attempts

    def _check_ranges(self, request: RestemRequest) -> None:
        s = self._settings
        limits = {
            "rounds": s.max_rounds,
            "docs": s.max_docs,
            "samples": s.max_samples,
            "repeats": s.max_repeats,
        }
        for name, limit in limits.items():
            value = getattr(request, name)
            if value is not None and not 1 <= value <= limit:
                raise InvalidRequest(
                    f"'{name}' must be between 1 and {limit}, got {value}.",
                    param=name,
                    code=f"{name}_out_of_range",
                )

    async def start(self, namespace: str, request: RestemRequest, *, actor: str) -> str:
        """Queues a ReSTEM job for `namespace`; returns its id.

        Raises:
            InvalidRequest: rounds/N/K/repeats out of range, a policy/trial namespace, or
                no document of the namespace has probes.
            NotFound: unknown namespace.
            Conflict: a ReSTEM job of the namespace is queued or running.
        """
        self._check_ranges(request)
        if is_derived_namespace(namespace) or len(policy_namespace(namespace)) > NAME_LIMIT:
            raise InvalidRequest(
                f"Namespace '{namespace}' cannot have a self-edit policy: it holds another "
                f"namespace's adapters or its name is longer than {NAME_LIMIT - 7} characters.",
                param="namespace",
                code="invalid_namespace",
            )
        async with self._sessionmaker() as session:
            ns = await self._namespace(session, namespace)
            await self._check_ready(session, ns)
            job = AdaptationJob(
                id=new_id("adj_"), namespace_id=ns.id, kind=JobKind.restem,
                params={k: v for k, v in asdict(request).items() if v is not None},
                status=JobStatus.queued, stage=JobStage.queued, progress=0.0, attempt=0,
                max_attempts=self._max_attempts, cancel_requested=False, reasons=[],
                document_ids=[], created_by=actor, created_at=utcnow(),
            )  # fmt: skip
            session.add(job)
            await session.flush()
            event = JobEvent(
                job_id=job.id, attempt=0, at=utcnow(), kind=EventKind.log,
                message=f"ReSTEM job queued by {actor}", data=dict(job.params or {}),
            )  # fmt: skip
            session.add(event)
            await session.commit()
            job_id = job.id
        if self._queue is not None:
            await self._queue.try_enqueue(job_id, attempt=0)
        logger.info("queued ReSTEM job %s for %s", job_id, namespace, extra={"run_id": job_id})
        return job_id

    async def _namespace(self, session: AsyncSession, name: str) -> Namespace:
        ns = await session.scalar(select(Namespace).where(Namespace.name == name))
        if ns is None:
            raise NotFound(
                f"Namespace '{name}' does not exist.", param="namespace", code="namespace_not_found"
            )
        return ns

    async def _check_ready(self, session: AsyncSession, ns: Namespace) -> None:
        query = select(Document.probes).where(Document.namespace_id == ns.id)
        probes = await session.scalars(query)
        if not any(probes):
            raise InvalidRequest(
                f"Namespace '{ns.name}' has no documents with probes: ReSTEM scores self-edits "
                "on them. Ingest documents with probes (or let a job generate them) first.",
                param="namespace",
                code="no_probe_documents",
            )
        active = await session.scalar(
            select(AdaptationJob.id).where(
                AdaptationJob.namespace_id == ns.id,
                AdaptationJob.kind == JobKind.restem,
                AdaptationJob.status.in_([JobStatus.queued, JobStatus.running]),
            )
        )
        if active is not None:
            raise Conflict(
                f"ReSTEM job '{active}' of namespace '{ns.name}' is still queued or running.",
                param="namespace",
                code="restem_job_active",
            )
