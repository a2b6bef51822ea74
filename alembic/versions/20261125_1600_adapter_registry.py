"""adapter registry

Revision ID: 0002_adapter_registry
Revises: 0001_api_keys
Create Date: 2026-11-25 16:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_adapter_registry"
down_revision: str | None = "0001_api_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _namespace() -> None:
    op.create_table(
        "namespace",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("last_version", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_namespace")),
        sa.UniqueConstraint("name", name=op.f("uq_namespace_name")),
    )


def _adapter_version() -> None:
    op.create_table(
        "adapter_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("peft_config", sa.JSON(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("parent_version_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.String(length=100), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["namespace_id"],
            ["namespace.id"],
            name=op.f("fk_adapter_version_namespace_id_namespace"),
        ),
        sa.ForeignKeyConstraint(
            ["parent_version_id"],
            ["adapter_version.id"],
            name=op.f("fk_adapter_version_parent_version_id_adapter_version"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_version")),
        sa.UniqueConstraint(
            "namespace_id", "version", name=op.f("uq_adapter_version_namespace_id")
        ),
        # The id is the engine's LoRA id: SQLite must never hand out a deleted one again.
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_adapter_version_blob_sha256"), "adapter_version", ["blob_sha256"], unique=False
    )


def _alias() -> None:
    op.create_table(
        "alias",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("pinned", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["namespace_id"], ["namespace.id"], name=op.f("fk_alias_namespace_id_namespace")
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["adapter_version.id"],
            name=op.f("fk_alias_version_id_adapter_version"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias")),
        sa.UniqueConstraint("namespace_id", "name", name=op.f("uq_alias_namespace_id")),
    )
    op.create_index(op.f("ix_alias_version_id"), "alias", ["version_id"], unique=False)


def _audit_event() -> None:
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("namespace", sa.String(length=63), nullable=True),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_event")),
    )
    op.create_index(op.f("ix_audit_event_namespace"), "audit_event", ["namespace"], unique=False)


def upgrade() -> None:
    _namespace()
    _adapter_version()
    _alias()
    _audit_event()


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_event_namespace"), table_name="audit_event")
    op.drop_table("audit_event")
    op.drop_index(op.f("ix_alias_version_id"), table_name="alias")
    op.drop_table("alias")
    op.drop_index(op.f("ix_adapter_version_blob_sha256"), table_name="adapter_version")
    op.drop_table("adapter_version")
    op.drop_table("namespace")
