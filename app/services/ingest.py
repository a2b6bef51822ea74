"""Document ingest: validation, sha256 de-duplication, namespace-on-first-use and job batching."""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters_store.models import (
    NAMESPACE_RE,
    RESERVED_NAMESPACES,
    Namespace,
    is_derived_namespace,
)
from app.db import pipeline_repo
from app.db.jobs import (
    AdaptationJob,
    Document,
    DocumentState,
    JobStatus,
    new_id,
)
from app.db.models import utcnow
from app.errors import InvalidRequest, PayloadTooLarge
from app.services.jobs import JobQueue, Page
from app.settings import PipelineSettings

logger = logging.getLogger(__name__)


@dataclass
class DocumentInput:
    """One document to ingest, before validation. `param` names it in error messages."""

    text: str
    param: str
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    probes: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class IngestedDocument:
    id: str
    sha256: str
    state: DocumentState
    job_id: str | None
    duplicate: bool


@dataclass
class IngestResult:
    namespace: str
    job_id: str | None
    job_created: bool
    documents: list[IngestedDocument]

    @property
    def accepted(self) -> bool:
        """True when some document was (re)queued for adaptation."""
        return any(not d.duplicate for d in self.documents)


@dataclass
class DocumentView:
    """A stored document with its namespace name and its job's status."""

    document: Document
    namespace: str
    job_status: JobStatus | None


@dataclass
class _Clean:
    text: str
    sha256: str
    title: str | None
    metadata: dict[str, Any]
    probes: list[dict[str, str]]


def normalise_text(text: str) -> str:
    """NFC, LF line ends, no surrounding whitespace: what is stored and hashed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).strip()


def validate_namespace(name: str) -> None:
    if not NAMESPACE_RE.fullmatch(name) or name in RESERVED_NAMESPACES:
        raise InvalidRequest(
            f"Invalid namespace name '{name}': use 2-63 characters, a lowercase letter first, "
            "then lowercase letters, digits or '-'; 'base' is reserved.",
            param="namespace",
            code="invalid_namespace",
        )
    if is_derived_namespace(name):
        raise InvalidRequest(
            f"Namespace '{name}' is reserved: names ending in '-policy' or '-trial' hold "
            "another namespace's self-edit policy (ReSTEM) adapters.",
            param="namespace",
            code="reserved_namespace",
        )


class IngestService:
    """Stores documents and queues adaptation, all in one transaction per request."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        queue: JobQueue | None,
        settings: PipelineSettings,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._queue = queue
        self._settings = settings

    def _clean(self, docs: Sequence[DocumentInput]) -> list[_Clean]:
        limit = self._settings.max_documents_per_request
        if not docs:
            raise InvalidRequest("No documents given.", param="documents", code="no_documents")
        if len(docs) > limit:
            raise InvalidRequest(
                f"{len(docs)} documents in one request; the limit is {limit}.",
                param="documents",
                code="too_many_documents",
            )
        return [self._clean_one(d) for d in docs]

    def _clean_one(self, doc: DocumentInput) -> _Clean:
        text = normalise_text(doc.text)
        if not text:
            raise InvalidRequest(
                "Document text is empty.", param=f"{doc.param}.text", code="empty_document"
            )
        size = len(text.encode())
        if size > self._settings.max_document_bytes:
            raise PayloadTooLarge(
                f"Document is {size} bytes; the limit is {self._settings.max_document_bytes}.",
                param=f"{doc.param}.text",
                code="document_too_large",
            )
        probes = []
        for i, (question, answer) in enumerate(doc.probes):
            for part, value in (("question", question), ("answer", answer)):
                if not value.strip():
                    raise InvalidRequest(
                        f"Probe {i} has an empty {part}.",
                        param=f"{doc.param}.probes.{i}.{part}",
                        code="invalid_probe",
                    )
            probes.append(
                {"question": question.strip(), "answer": answer.strip(), "source": "given"}
            )
        sha = hashlib.sha256(text.encode()).hexdigest()
        title = doc.title.strip() if doc.title and doc.title.strip() else None
        return _Clean(text, sha, title, dict(doc.metadata), probes)

    async def ingest(
        self, *, namespace: str, documents: Sequence[DocumentInput], actor: str, force: bool
    ) -> IngestResult:
        """Validates everything, then stores documents and joins or creates the queued job.

        Raises:
            InvalidRequest / PayloadTooLarge: bad input; nothing was stored.
        """
        validate_namespace(namespace)
        clean = self._clean(documents)
        for attempt in range(2):
            try:
                async with self._sessionmaker() as session:
                    result = await self._store(session, namespace, clean, actor, force)
                    await session.commit()
                break
            except IntegrityError:  # a concurrent request created the namespace or document
                if attempt:
                    raise
                logger.info("ingest into %s raced another request; retrying", namespace)
        if result.job_created and self._queue is not None and result.job_id is not None:
            await self._queue.try_enqueue(
                result.job_id, attempt=0, delay_s=self._settings.batch_window_s
            )
        return result

    async def _store(
        self,
        session: AsyncSession,
        name: str,
        docs: list[_Clean],
        actor: str,
        force: bool,
    ) -> IngestResult:
        await pipeline_repo.write_lock(session)
        ns = await pipeline_repo.ensure_namespace(session, name=name, actor=actor)
        out: list[IngestedDocument] = []
        fresh: list[Document] = []
        seen: dict[str, IngestedDocument] = {}
        for doc in docs:
            if doc.sha256 in seen:  # the same text twice in one request
                out.append(seen[doc.sha256])
                continue
            row = await session.scalar(
                select(Document).where(
                    Document.namespace_id == ns.id, Document.sha256 == doc.sha256
                )
            )
            duplicate = row is not None and not force
            if row is None:
                row = Document(
                    id=new_id("doc_"),
                    namespace_id=ns.id,
                    sha256=doc.sha256,
                    title=doc.title,
                    text=doc.text,
                    metadata_=doc.metadata,
                    probes=doc.probes,
                    state=DocumentState.pending,
                    created_at=utcnow(),
                    created_by=actor,
                )
                session.add(row)
            if not duplicate:
                fresh.append(row)
            item = IngestedDocument(row.id, row.sha256, row.state, row.job_id, duplicate)
            seen[doc.sha256] = item
            out.append(item)
        job, created = (None, False)
        if fresh:
            job, created = await pipeline_repo.join_or_create_job(
                session,
                namespace=ns,
                docs=fresh,
                actor=actor,
                max_attempts=self._settings.max_attempts,
            )
            for item in out:
                if not item.duplicate:
                    item.job_id, item.state = job.id, DocumentState.pending
        job_id = job.id if job else next((d.job_id for d in out if d.job_id), None)
        return IngestResult(name, job_id, created, out)

    async def list_documents(
        self,
        *,
        namespace: str | None = None,
        state: DocumentState | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> Page[DocumentView]:
        """Newest first; `after` is the last id of the previous page."""
        stmt = (
            select(Document, Namespace.name, AdaptationJob.status)
            .join(Namespace, Namespace.id == Document.namespace_id)
            .outerjoin(AdaptationJob, AdaptationJob.id == Document.job_id)
            .order_by(Document.id.desc())
            .limit(limit + 1)
        )
        if namespace is not None:
            stmt = stmt.where(Namespace.name == namespace)
        if state is not None:
            stmt = stmt.where(Document.state == state)
        if after is not None:
            stmt = stmt.where(Document.id < after)
        async with self._sessionmaker() as session:
            rows = (await session.execute(stmt)).all()
        views = [DocumentView(doc, ns, status) for doc, ns, status in rows[:limit]]
        return Page(views, has_more=len(rows) > limit)
