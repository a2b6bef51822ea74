"""Admin wire models: API keys and the adapter registry."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters_store.models import NAMESPACE_RE, AdapterStatus, NamespaceSettings
from app.db.models import Role


class ApiKeyCreate(BaseModel):
    """Body of POST /v1/admin/keys. Unknown fields are refused: a typo must not mint a key."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="who or what uses the key")
    role: Role = Field(Role.user, description="user < operator < admin")


class ApiKeyPublic(BaseModel):
    """An API key as listed: never the key itself nor its hash."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    object: Literal["api_key"] = "api_key"
    name: str
    prefix: str = Field(description="first characters of the key, to recognise it")
    role: Role
    created_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="the plaintext key; shown only in this response")


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyPublic]


# --- adapter registry -------------------------------------------------------------------------


class NamespaceCreate(BaseModel):
    """Body of POST /v1/admin/namespaces."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAMESPACE_RE.pattern, description="lowercase, e.g. 'acme'")
    settings: NamespaceSettings | None = Field(None, description="gate thresholds")


class NamespacePublic(BaseModel):
    id: int
    object: Literal["namespace"] = "namespace"
    name: str
    settings: NamespaceSettings
    champion: str | None = Field(None, description="the version `name` serves, e.g. 'acme@v7'")
    created_at: datetime
    created_by: str


class NamespaceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[NamespacePublic]


class VersionPublic(BaseModel):
    """One immutable adapter version, with its lineage and the aliases pointing at it."""

    id: int = Field(description="global id; also the engine's LoRA id")
    object: Literal["adapter_version"] = "adapter_version"
    name: str = Field(description="the model name that pins it, e.g. 'acme@v7'")
    namespace: str
    version: int
    status: AdapterStatus
    aliases: list[str] = Field(default_factory=list, description="e.g. ['champion']")
    parent: str | None = Field(None, description="the version it was trained from")
    base_model: str
    blob_sha256: str
    size_bytes: int
    rank: int
    peft_config: dict[str, Any]
    job_id: str | None = None
    scores: dict[str, Any] | None = None
    note: str | None = None
    created_at: datetime
    created_by: str


class VersionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VersionPublic]


class PromoteRequest(BaseModel):
    """Body of POST .../versions/{v}/promote (optional)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=2000, description="kept in the audit trail")


class RollbackRequest(BaseModel):
    """Body of POST .../rollback (optional): to the previous champion unless `to_version`."""

    model_config = ConfigDict(extra="forbid")

    to_version: int | None = Field(None, ge=1, description="a version number; default: previous")
    reason: str | None = Field(None, max_length=2000, description="kept in the audit trail")


class ChampionChange(BaseModel):
    """What a promotion or rollback did."""

    object: Literal["champion_change"] = "champion_change"
    namespace: str
    champion: VersionPublic
    previous: str | None = Field(None, description="the champion before, e.g. 'acme@v6'")


class VersionDeleted(BaseModel):
    id: int
    object: Literal["adapter_version"] = "adapter_version"
    name: str
    deleted: bool = True


class AuditEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    object: Literal["audit_event"] = "audit_event"
    at: datetime
    actor: str
    action: str
    namespace: str | None = None
    target: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    reason: str | None = None


class AuditList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEventPublic]
    next_before_id: int | None = Field(None, description="pass as before_id for older events")
