"""Registry tables: namespaces, immutable adapter versions, movable aliases and the audit trail."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base
from app.db.models import UTCDateTime, utcnow

NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9-]{1,62}$")
RESERVED_NAMESPACES = frozenset({"base"})
POLICY_SUFFIX = "-policy"
"""`<ns>-policy` holds namespace ns's self-edit policy adapters (ReSTEM)."""
TRIAL_SUFFIX = "-trial"
"""`<ns>-trial` holds ReSTEM's temporary inner-loop adapters while they are scored."""
DERIVED_SUFFIXES = (POLICY_SUFFIX, TRIAL_SUFFIX)
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"
"""Alias kept by promote/rollback: where a plain rollback goes next."""


def policy_namespace(namespace: str) -> str:
    return f"{namespace}{POLICY_SUFFIX}"


def trial_namespace(namespace: str) -> str:
    return f"{namespace}{TRIAL_SUFFIX}"


def is_derived_namespace(name: str) -> bool:
    """A namespace the system keeps for another one (policy or trial adapters)."""
    return name.endswith(DERIVED_SUFFIXES)


class AdapterStatus(StrEnum):
    """Lifecycle of one adapter version. `promoted` = has been champion at some point."""

    candidate = "candidate"
    promoted = "promoted"
    archived = "archived"
    rejected = "rejected"
    failed = "failed"


ACTIVE_STATUSES = frozenset({AdapterStatus.candidate, AdapterStatus.promoted})
TERMINAL_STATUSES = frozenset(
    {AdapterStatus.archived, AdapterStatus.rejected, AdapterStatus.failed}
)
PROMOTABLE_STATUSES = frozenset(
    {AdapterStatus.candidate, AdapterStatus.promoted, AdapterStatus.rejected}
)
"""An admin may override the gate (rejected), but archived and failed versions stay retired."""


class AuditAction(StrEnum):
    """What an audit row records; the values are stored as-is."""

    namespace_create = "namespace.create"
    namespace_update = "namespace.update"
    version_create = "version.create"
    version_import = "version.import"
    version_promote = "version.promote"
    version_rollback = "version.rollback"
    version_archive = "version.archive"
    version_delete = "version.delete"
    alias_set = "alias.set"


class NamespaceSettings(BaseModel):
    """Per-namespace gate thresholds, stored as JSON on the namespace row."""

    model_config = ConfigDict(extra="forbid")

    min_gain: float = Field(0.0, description="new-knowledge score gain a candidate must show")
    max_forgetting: float = Field(
        0.05, ge=0, description="retention/guard drop allowed against the champion"
    )
    max_guard_drift: float = Field(
        0.1,
        ge=0,
        description="guard drop allowed against the base model, over all of the namespace's "
        "versions (each may lose at most max_forgetting more than its champion)",
    )
    auto_promote: bool = Field(True, description="promote candidates that pass the gate")


def _default_settings() -> dict[str, Any]:
    return NamespaceSettings().model_dump()


def _str_enum(enum: type[StrEnum], length: int) -> Enum:
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda members: [m.value for m in members],
    )


class Namespace(Base):
    """A tenant's adapter line: its versions, aliases and gate settings."""

    __tablename__ = "namespace"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=_default_settings)
    last_version: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    """Highest version number ever given out, so deleted numbers are never reused."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))

    @property
    def gate(self) -> NamespaceSettings:
        return NamespaceSettings.model_validate(self.settings or {})

    def __repr__(self) -> str:
        return f"Namespace(id={self.id!r}, name={self.name!r})"


class AdapterVersion(Base):
    """One immutable adapter: its blob never changes; only status, scores and note do."""

    __tablename__ = "adapter_version"
    # AUTOINCREMENT: the id is also the engine's LoRA id, so SQLite must never reuse a deleted one.
    __table_args__ = (
        UniqueConstraint("namespace_id", "version"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespace.id"))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[AdapterStatus] = mapped_column(
        _str_enum(AdapterStatus, 16), default=AdapterStatus.candidate
    )
    base_model: Mapped[str] = mapped_column(String(200))
    blob_sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    peft_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    rank: Mapped[int] = mapped_column(Integer)
    parent_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapter_version.id", ondelete="SET NULL")
    )
    job_id: Mapped[str | None] = mapped_column(String(100))
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    note: Mapped[str | None] = mapped_column(Text)

    namespace: Mapped[Namespace] = relationship(lazy="joined", innerjoin=True)

    @property
    def namespace_name(self) -> str:
        return self.namespace.name

    @property
    def name(self) -> str:
        """The model name that pins this version, e.g. `acme@v7`."""
        return f"{self.namespace.name}@v{self.version}"

    def snapshot(self) -> dict[str, Any]:
        """The JSON an audit row keeps of this version."""
        return {
            "name": self.name,
            "version_id": self.id,
            "version": self.version,
            "status": str(self.status),
            "blob_sha256": self.blob_sha256,
        }

    def __repr__(self) -> str:
        return f"AdapterVersion(id={self.id!r}, version={self.version!r}, status={self.status!r})"


class Alias(Base):
    """A movable name (`champion`, ...) for one version of its namespace."""

    __tablename__ = "alias"
    __table_args__ = (UniqueConstraint("namespace_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespace.id"))
    name: Mapped[str] = mapped_column(String(63))
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_version.id"), index=True)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    def __repr__(self) -> str:
        return f"Alias(name={self.name!r}, version_id={self.version_id!r}, pinned={self.pinned!r})"


class AuditEvent(Base):
    """One registry change, written in the same transaction as the change itself."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(40))
    namespace: Mapped[str | None] = mapped_column(String(63), index=True)
    target: Mapped[str] = mapped_column(String(200))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    reason: Mapped[str | None] = mapped_column(Text)

    def __repr__(self) -> str:
        return f"AuditEvent(id={self.id!r}, action={self.action!r}, target={self.target!r})"
