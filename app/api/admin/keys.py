"""Admin routes for API keys: create, list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.auth import Role, create_key, revoke_key
from app.db import repo
from app.deps import AuthenticatorDep, SessionDep, require
from app.protocol.admin import ApiKeyCreate, ApiKeyCreated, ApiKeyList, ApiKeyPublic

router = APIRouter(
    prefix="/v1/admin/keys", tags=["admin"], dependencies=[Depends(require(Role.admin))]
)


@router.post("", response_model=ApiKeyCreated, status_code=201)
async def create_api_key(body: ApiKeyCreate, session: SessionDep) -> ApiKeyCreated:
    """Create an API key; the plaintext key is returned only in this response."""
    row, plaintext = await create_key(session, name=body.name, role=body.role)
    await session.commit()
    public = ApiKeyPublic.model_validate(row, from_attributes=True)
    return ApiKeyCreated(**public.model_dump(), key=plaintext)


@router.get("", response_model=ApiKeyList)
async def list_api_keys(session: SessionDep) -> ApiKeyList:
    """List API keys, revoked ones included."""
    rows = await repo.list_api_keys(session)
    return ApiKeyList(data=[ApiKeyPublic.model_validate(r, from_attributes=True) for r in rows])


@router.delete("/{key_id}", response_model=ApiKeyPublic)
async def revoke_api_key(
    key_id: int, session: SessionDep, authenticator: AuthenticatorDep
) -> ApiKeyPublic:
    """Revoke an API key; it stops working at once here and within the auth cache TTL elsewhere."""
    row = await revoke_key(session, key_id=key_id)
    await session.commit()
    authenticator.invalidate()
    return ApiKeyPublic.model_validate(row, from_attributes=True)
