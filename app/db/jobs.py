"""Pipeline tables: documents, adaptation jobs (lease, attempt), job events and self-edits."""

from __future__ import annotations

import secrets
import time
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base
from app.db.models import UTCDateTime, utcnow


def new_id(prefix: str) -> str:
    """A sortable id: millisecond time then randomness, so `ORDER BY id` is creation order."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class DocumentState(StrEnum):
    """Where a document stands in its adaptation."""

    pending = "pending"  # stored, waiting for its job to start
    adapting = "adapting"  # its job is running (or its candidate awaits review)
    learned = "learned"  # a promoted version was trained on it
    rejected = "rejected"  # the gate refused the candidate trained on it
    failed = "failed"  # its job failed or was cancelled; re-ingest with force to retry


class JobStatus(StrEnum):
    """Lifecycle of an adaptation job (OpenAI fine-tuning job statuses, simplified)."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_JOB_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class JobKind(StrEnum):
    """What a job does: adapt documents (the pipeline) or learn the self-edit policy."""

    adapt = "adapt"
    restem = "restem"


class JobStage(StrEnum):
    """Pipeline stage a job is in; `done` once it has a decision."""

    queued = "queued"
    self_edit = "self_edit"
    probes = "probes"
    train = "train"
    evaluate = "evaluate"
    gate = "gate"
    done = "done"


class Decision(StrEnum):
    """What the gate decided about a job's candidate."""

    promoted = "promoted"
    rejected = "rejected"
    pending_review = "pending_review"


class EventKind(StrEnum):
    stage = "stage"
    progress = "progress"
    loss = "loss"
    metric = "metric"
    log = "log"
    error = "error"
    decision = "decision"


def _str_enum(enum: type[StrEnum], length: int) -> Enum:
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda members: [m.value for m in members],
    )


class Document(Base):
    """One ingested text; unique per namespace by the sha256 of its normalised text."""

    __tablename__ = "document"
    __table_args__ = (
        UniqueConstraint("namespace_id", "sha256"),
        Index("ix_document_job_id", "job_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespace.id"))
    sha256: Mapped[str] = mapped_column(String(64))
    title: Mapped[str | None] = mapped_column(String(500))
    text: Mapped[str] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    probes: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    """[{question, answer, source: "given" | "generated"}]"""
    state: Mapped[DocumentState] = mapped_column(_str_enum(DocumentState, 16))
    job_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))

    def __repr__(self) -> str:
        return f"Document(id={self.id!r}, state={self.state!r}, job_id={self.job_id!r})"


class AdaptationJob(Base):
    """One adaptation run over a batch of documents. The row is the source of truth.

    A worker owns it only while it holds the lease (`lease_owner`, `lease_expires_at`) for
    the current `attempt`; every write of an attempt is conditional on both (fencing).
    """

    __tablename__ = "adaptation_job"
    __table_args__ = (Index("ix_adaptation_job_namespace_status", "namespace_id", "status"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespace.id"))
    kind: Mapped[JobKind] = mapped_column(
        _str_enum(JobKind, 16), default=JobKind.adapt, server_default=JobKind.adapt.value
    )
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    """Job-specific parameters (ReSTEM: rounds, docs, samples, repeats)."""
    status: Mapped[JobStatus] = mapped_column(_str_enum(JobStatus, 16))
    stage: Mapped[JobStage] = mapped_column(_str_enum(JobStage, 16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    decision: Mapped[Decision | None] = mapped_column(_str_enum(Decision, 16))
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    result_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapter_version.id", ondelete="SET NULL")
    )
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    error: Mapped[str | None] = mapped_column(Text)
    document_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_JOB_STATUSES

    def __repr__(self) -> str:
        return f"AdaptationJob(id={self.id!r}, status={self.status!r}, attempt={self.attempt!r})"


class JobEvent(Base):
    """A stage change, progress step, loss, metric, log line, error or decision of a job."""

    __tablename__ = "job_event"
    __table_args__ = (Index("ix_job_event_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("adaptation_job.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    kind: Mapped[EventKind] = mapped_column(_str_enum(EventKind, 16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class SelfEdit(Base):
    """One generated self-edit of a document, kept or filtered, with its reward when scored."""

    __tablename__ = "self_edit"
    __table_args__ = (Index("ix_self_edit_job_id", "job_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("adaptation_job.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    document_id: Mapped[str] = mapped_column(ForeignKey("document.id", ondelete="CASCADE"))
    format: Mapped[str] = mapped_column(String(40))
    text: Mapped[str] = mapped_column(Text)
    kept: Mapped[bool] = mapped_column(Boolean, default=True)
    reward: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
