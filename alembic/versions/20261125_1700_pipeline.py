"""pipeline: documents, adaptation jobs, job events, self-edits

Revision ID: 0003_pipeline
Revises: 0002_adapter_registry
Create Date: 2026-11-25 17:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_pipeline"
down_revision: str | None = "0002_adapter_registry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _document() -> None:
    op.create_table(
        "document",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("namespace_id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=500), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("probes", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["namespace_id"], ["namespace.id"], name=op.f("fk_document_namespace_id_namespace")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_document")),
        sa.UniqueConstraint("namespace_id", "sha256", name=op.f("uq_document_namespace_id")),
    )
    op.create_index("ix_document_job_id", "document", ["job_id"], unique=False)


def _adaptation_job() -> None:
    op.create_table(
        "adaptation_job",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("namespace_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("result_version_id", sa.Integer(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("document_ids", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["namespace_id"],
            ["namespace.id"],
            name=op.f("fk_adaptation_job_namespace_id_namespace"),
        ),
        sa.ForeignKeyConstraint(
            ["result_version_id"],
            ["adapter_version.id"],
            name=op.f("fk_adaptation_job_result_version_id_adapter_version"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adaptation_job")),
    )
    op.create_index(
        "ix_adaptation_job_namespace_status",
        "adaptation_job",
        ["namespace_id", "status"],
        unique=False,
    )


def _job_event() -> None:
    op.create_table(
        "job_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["adaptation_job.id"],
            name=op.f("fk_job_event_job_id_adaptation_job"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_event")),
    )
    op.create_index("ix_job_event_job_id_id", "job_event", ["job_id", "id"], unique=False)


def _self_edit() -> None:
    op.create_table(
        "self_edit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("document_id", sa.String(length=40), nullable=False),
        sa.Column("format", sa.String(length=40), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("kept", sa.Boolean(), nullable=False),
        sa.Column("reward", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["adaptation_job.id"],
            name=op.f("fk_self_edit_job_id_adaptation_job"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["document.id"],
            name=op.f("fk_self_edit_document_id_document"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_self_edit")),
    )
    op.create_index("ix_self_edit_job_id", "self_edit", ["job_id"], unique=False)


def upgrade() -> None:
    _document()
    _adaptation_job()
    _job_event()
    _self_edit()


def downgrade() -> None:
    op.drop_index("ix_self_edit_job_id", table_name="self_edit")
    op.drop_table("self_edit")
    op.drop_index("ix_job_event_job_id_id", table_name="job_event")
    op.drop_table("job_event")
    op.drop_index("ix_adaptation_job_namespace_status", table_name="adaptation_job")
    op.drop_table("adaptation_job")
    op.drop_index("ix_document_job_id", table_name="document")
    op.drop_table("document")
