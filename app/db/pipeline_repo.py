"""Keyword-only query helpers for the pipeline tables. They flush but never commit."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import false, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from adapters_store.models import AuditAction, AuditEvent, Namespace, NamespaceSettings
from app.db.jobs import (
    AdaptationJob,
    Document,
    DocumentState,
    EventKind,
    JobEvent,
    JobKind,
    JobStage,
    JobStatus,
    new_id,
)
from app.db.models import utcnow


async def write_lock(session: AsyncSession) -> None:
    """Takes SQLite's database write lock first, so batching decisions cannot race.

    PostgreSQL needs nothing here: the namespace and queued-job rows are locked FOR UPDATE.
    """
    if session.get_bind().dialect.name == "sqlite":
        await session.execute(
            update(AdaptationJob)
            .where(false())
            .values(progress=AdaptationJob.progress)
            .execution_options(synchronize_session=False)
        )


async def ensure_namespace(session: AsyncSession, *, name: str, actor: str) -> Namespace:
    """The namespace row (row-locked on PostgreSQL), created with its audit row if new."""
    ns = await session.scalar(select(Namespace).where(Namespace.name == name).with_for_update())
    if ns is not None:
        return ns
    ns = Namespace(
        name=name, settings=NamespaceSettings().model_dump(), created_at=utcnow(), created_by=actor
    )
    session.add(ns)
    session.add(
        AuditEvent(
            at=utcnow(),
            actor=actor,
            action=AuditAction.namespace_create,
            namespace=name,
            target=name,
            before=None,
            after={"settings": ns.settings},
            reason="created on first document ingest",
        )
    )
    await session.flush()
    return ns


async def join_or_create_job(
    session: AsyncSession,
    *,
    namespace: Namespace,
    docs: list[Document],
    actor: str,
    max_attempts: int,
) -> tuple[AdaptationJob, bool]:
    """Documents join the namespace's queued, never-started job; a new job only when there
    is none. Returns the job and whether it was created."""
    ns = namespace
    job = await session.scalar(
        select(AdaptationJob)
        .where(
            AdaptationJob.namespace_id == ns.id,
            AdaptationJob.kind == JobKind.adapt,
            AdaptationJob.status == JobStatus.queued,
            AdaptationJob.attempt == 0,  # a retry keeps the documents its attempts trained on
        )
        .order_by(AdaptationJob.id)
        .limit(1)
        .with_for_update()
    )
    created = job is None
    if job is None:
        job = AdaptationJob(
            id=new_id("adj_"),
            namespace_id=ns.id,
            status=JobStatus.queued,
            stage=JobStage.queued,
            progress=0.0,
            attempt=0,
            max_attempts=max_attempts,
            cancel_requested=False,
            reasons=[],
            document_ids=[],
            created_by=actor,
            created_at=utcnow(),
        )
        session.add(job)
    ids = [d.id for d in docs]
    job.document_ids = [*job.document_ids, *(i for i in ids if i not in job.document_ids)]
    for doc in docs:
        doc.job_id = job.id
        doc.state = DocumentState.pending
    await session.flush()
    session.add(
        JobEvent(
            job_id=job.id,
            attempt=job.attempt,
            at=utcnow(),
            kind=EventKind.log,
            message=f"{len(ids)} document(s) added by {actor}",
            data={"document_ids": ids},
        )
    )
    await session.flush()
    return job, created


async def set_document_states(session: AsyncSession, *, job_id: str, state: DocumentState) -> None:
    """Sets the state of the documents that belong to `job_id` (not those moved to a newer job)."""
    await session.execute(
        update(Document)
        .where(Document.job_id == job_id)
        .values(state=state)
        .execution_options(synchronize_session=False)
    )


def documents_in_order(rows: Sequence[Document], ids: Sequence[str]) -> list[Document]:
    by_id = {row.id: row for row in rows}
    return [by_id[i] for i in ids if i in by_id]
