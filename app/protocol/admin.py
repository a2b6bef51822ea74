"""Admin wire models: API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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
