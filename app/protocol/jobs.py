"""Wire models for documents and adaptation jobs (shaped like OpenAI's fine-tuning jobs)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.db.jobs import (
    Decision,
    DocumentState,
    EventKind,
    JobEvent,
    JobKind,
    JobStage,
    JobStatus,
)
from app.services.ingest import DocumentInput, IngestResult
from app.services.jobs import JobView
from app.services.restem import RestemRequest


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


class ProbeIn(BaseModel):
    """A held-out question about the document and its expected answer."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=2000)
    answer: str = Field(min_length=1, max_length=2000)


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="the document, UTF-8 text")
    title: str | None = Field(None, max_length=500)
    metadata: dict[str, Any] | None = None
    probes: list[ProbeIn] | None = Field(
        None, max_length=100, description="evaluation questions; generated when omitted"
    )

    def to_input(self, index: int) -> DocumentInput:
        return DocumentInput(
            text=self.text,
            param=f"documents.{index}",
            title=self.title,
            metadata=self.metadata or {},
            probes=[(p.question, p.answer) for p in self.probes or []],
        )


class DocumentsCreate(BaseModel):
    """JSON body of POST /v1/documents. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    namespace: str = Field(description="created on first use, e.g. 'acme'")
    documents: list[DocumentIn] = Field(description="one or more documents")
    force: bool = Field(False, description="re-adapt documents that were ingested before")


class IngestedDocumentPublic(BaseModel):
    id: str
    object: Literal["document"] = "document"
    sha256: str
    state: DocumentState
    job_id: str | None
    duplicate: bool = Field(description="the same text was ingested before; nothing re-queued")


class IngestResponse(BaseModel):
    object: Literal["document.ingest"] = "document.ingest"
    namespace: str
    job_id: str | None = Field(description="the adaptation job the documents joined")
    job_created: bool
    documents: list[IngestedDocumentPublic]

    @classmethod
    def of(cls, result: IngestResult) -> IngestResponse:
        docs = [
            IngestedDocumentPublic(
                id=d.id, sha256=d.sha256, state=d.state, job_id=d.job_id, duplicate=d.duplicate
            )
            for d in result.documents
        ]
        return cls(
            namespace=result.namespace,
            job_id=result.job_id,
            job_created=result.job_created,
            documents=docs,
        )


class DocumentPublic(BaseModel):
    """A stored document and where its adaptation stands (text omitted)."""

    id: str
    object: Literal["document"] = "document"
    namespace: str
    title: str | None
    sha256: str
    bytes: int
    state: DocumentState
    job_id: str | None
    job_status: JobStatus | None
    probes: int = Field(description="number of probe questions")
    metadata: dict[str, Any]
    created_at: int
    created_by: str


class DocumentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DocumentPublic]
    has_more: bool


class AdaptationJobPublic(BaseModel):
    id: str
    object: Literal["adaptation.job"] = "adaptation.job"
    namespace: str
    kind: JobKind = Field(description="adapt (documents) or restem (self-edit policy)")
    params: dict[str, Any] | None = Field(description="job parameters (ReSTEM: rounds, ...)")
    status: JobStatus
    stage: JobStage
    progress: float = Field(description="0..1 over all stages")
    attempt: int
    max_attempts: int
    cancel_requested: bool
    decision: Decision | None
    reasons: list[str]
    result_version: str | None = Field(description="the candidate it produced, e.g. 'acme@v7'")
    result_version_id: int | None
    scores: dict[str, Any] | None
    error: str | None
    document_ids: list[str]
    created_by: str
    created_at: int
    started_at: int | None
    finished_at: int | None

    @classmethod
    def of(cls, view: JobView) -> AdaptationJobPublic:
        job = view.job
        return cls(
            id=job.id,
            namespace=view.namespace,
            kind=job.kind,
            params=job.params,
            status=job.status,
            stage=job.stage,
            progress=round(job.progress, 4),
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            decision=job.decision,
            reasons=list(job.reasons or []),
            result_version=view.result_version,
            result_version_id=job.result_version_id,
            scores=job.scores,
            error=job.error,
            document_ids=list(job.document_ids or []),
            created_by=job.created_by,
            created_at=int(job.created_at.timestamp()),
            started_at=_ts(job.started_at),
            finished_at=_ts(job.finished_at),
        )


class AdaptationJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdaptationJobPublic]
    has_more: bool


class JobEventPublic(BaseModel):
    id: int
    object: Literal["adaptation.job.event"] = "adaptation.job.event"
    job_id: str
    attempt: int
    created_at: float = Field(description="unix seconds")
    level: Literal["info", "error"]
    type: EventKind
    message: str
    data: dict[str, Any]

    @classmethod
    def of(cls, event: JobEvent) -> JobEventPublic:
        return cls(
            id=event.id,
            job_id=event.job_id,
            attempt=event.attempt,
            created_at=round(event.at.timestamp(), 3),
            level="error" if event.kind == EventKind.error else "info",
            type=event.kind,
            message=event.message,
            data=event.data or {},
        )


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventPublic]
    has_more: bool


class RestemJobCreate(BaseModel):
    """Body of POST /v1/admin/namespaces/{namespace}/restem; omitted fields use the settings."""

    model_config = ConfigDict(extra="forbid")

    rounds: int | None = Field(None, description="ReSTEM rounds (settings.restem.rounds)")
    docs: int | None = Field(None, description="documents per round, N")
    samples: int | None = Field(None, description="self-edits sampled per document, K")
    repeats: int | None = Field(None, description="trainings averaged per self-edit reward")

    def to_request(self) -> RestemRequest:
        return RestemRequest(self.rounds, self.docs, self.samples, self.repeats)
