"""Keyword-only query helpers. They flush but never commit: the caller owns the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import ApiKey, Role, utcnow


async def create_api_key(
    session: AsyncSession, *, name: str, role: Role, key_hash: str, prefix: str
) -> ApiKey:
    row = ApiKey(name=name, role=role, key_hash=key_hash, prefix=prefix, created_at=utcnow())
    session.add(row)
    await session.flush()
    return row


async def get_api_key(session: AsyncSession, *, key_id: int) -> ApiKey | None:
    return await session.get(ApiKey, key_id)


async def get_api_key_by_hash(session: AsyncSession, *, key_hash: str) -> ApiKey | None:
    """The key with this hash, revoked or not."""
    return await session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))


async def get_active_key_by_hash(session: AsyncSession, *, key_hash: str) -> ApiKey | None:
    stmt = select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    return await session.scalar(stmt)


async def list_api_keys(session: AsyncSession, *, include_revoked: bool = True) -> Sequence[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return (await session.scalars(stmt)).all()


async def active_admin_ids(session: AsyncSession, *, lock: bool = False) -> list[int]:
    """Ids of unrevoked admin keys; `lock` takes row locks (PostgreSQL) against racing revokes."""
    stmt = select(ApiKey.id).where(ApiKey.role == Role.admin, ApiKey.revoked_at.is_(None))
    if lock:
        stmt = stmt.with_for_update()
    return list((await session.scalars(stmt)).all())


async def revoke_api_key(
    session: AsyncSession, *, key: ApiKey, now: datetime | None = None
) -> None:
    if key.revoked_at is None:
        key.revoked_at = now or utcnow()
        await session.flush()


async def touch_last_used(
    session: AsyncSession, *, key_id: int, now: datetime | None = None
) -> None:
    stmt = update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now or utcnow())
    await session.execute(stmt)
