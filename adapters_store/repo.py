"""Keyword-only registry queries. They flush but never commit: the caller owns the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from adapters_store.models import (
    CHAMPION,
    PREVIOUS_CHAMPION,
    AdapterVersion,
    Alias,
    AuditAction,
    AuditEvent,
    Namespace,
)
from app.db.models import utcnow

_CHAMPION_MOVES = (AuditAction.version_promote.value, AuditAction.version_rollback.value)


async def get_namespace(
    session: AsyncSession, *, name: str, lock: bool = False
) -> Namespace | None:
    """The namespace row; `lock` takes its row lock (SELECT … FOR UPDATE on PostgreSQL)."""
    stmt = select(Namespace).where(Namespace.name == name)
    if lock:
        stmt = stmt.with_for_update()
    return await session.scalar(stmt)


async def list_namespaces(session: AsyncSession) -> Sequence[Namespace]:
    return (await session.scalars(select(Namespace).order_by(Namespace.name))).all()


async def next_version_number(session: AsyncSession, *, namespace_id: int) -> int:
    """Hands out the namespace's next version number atomically (and row-locks it on PG).

    A counter rather than max(version)+1, so a deleted number is never given out again.
    """
    stmt = (
        update(Namespace)
        .where(Namespace.id == namespace_id)
        .values(last_version=Namespace.last_version + 1)
        .returning(Namespace.last_version)
    )
    number = (await session.execute(stmt)).scalar_one()
    return int(number)


async def get_version(
    session: AsyncSession, *, namespace_id: int, version: int
) -> AdapterVersion | None:
    stmt = select(AdapterVersion).where(
        AdapterVersion.namespace_id == namespace_id, AdapterVersion.version == version
    )
    return await session.scalar(stmt.execution_options(populate_existing=True))


async def get_version_by_id(session: AsyncSession, *, version_id: int) -> AdapterVersion | None:
    stmt = select(AdapterVersion).where(AdapterVersion.id == version_id)
    return await session.scalar(stmt.execution_options(populate_existing=True))


async def existing_version_ids(session: AsyncSession, *, ids: Sequence[int]) -> Sequence[int]:
    stmt = select(AdapterVersion.id).where(AdapterVersion.id.in_(list(ids)))
    return (await session.scalars(stmt)).all()


async def list_versions(session: AsyncSession, *, namespace_id: int) -> Sequence[AdapterVersion]:
    stmt = (
        select(AdapterVersion)
        .where(AdapterVersion.namespace_id == namespace_id)
        .order_by(AdapterVersion.version)
    )
    return (await session.scalars(stmt)).all()


async def version_by_alias(
    session: AsyncSession, *, namespace: str, alias: str
) -> AdapterVersion | None:
    stmt = (
        select(AdapterVersion)
        .join(Alias, Alias.version_id == AdapterVersion.id)
        .join(Namespace, Namespace.id == Alias.namespace_id)
        .where(Namespace.name == namespace, Alias.name == alias)
    )
    return await session.scalar(stmt)


async def version_by_number(
    session: AsyncSession, *, namespace: str, version: int
) -> AdapterVersion | None:
    stmt = (
        select(AdapterVersion)
        .join(Namespace, Namespace.id == AdapterVersion.namespace_id)
        .where(Namespace.name == namespace, AdapterVersion.version == version)
    )
    return await session.scalar(stmt)


async def get_alias(session: AsyncSession, *, namespace_id: int, name: str) -> Alias | None:
    stmt = select(Alias).where(Alias.namespace_id == namespace_id, Alias.name == name)
    return await session.scalar(stmt)


async def aliases_of_version(session: AsyncSession, *, version_id: int) -> Sequence[Alias]:
    return (await session.scalars(select(Alias).where(Alias.version_id == version_id))).all()


async def put_alias(
    session: AsyncSession,
    *,
    namespace_id: int,
    name: str,
    version_id: int,
    pinned: bool | None = None,
) -> Alias:
    """Points an alias at a version, creating it if needed; `pinned=None` keeps the flag."""
    alias = await get_alias(session, namespace_id=namespace_id, name=name)
    if alias is None:
        alias = Alias(
            namespace_id=namespace_id, name=name, version_id=version_id, pinned=bool(pinned)
        )
        session.add(alias)
    else:
        alias.version_id = version_id
        if pinned is not None:
            alias.pinned = pinned
    alias.updated_at = utcnow()
    await session.flush()
    return alias


async def drop_alias(session: AsyncSession, *, namespace_id: int, name: str) -> None:
    alias = await get_alias(session, namespace_id=namespace_id, name=name)
    if alias is not None:
        await session.delete(alias)
        await session.flush()


async def add_audit(
    session: AsyncSession,
    *,
    actor: str,
    action: AuditAction,
    target: str,
    namespace: str | None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    reason: str | None = None,
) -> AuditEvent:
    row = AuditEvent(
        at=utcnow(),
        actor=actor,
        action=action.value,
        target=target,
        namespace=namespace,
        before=before,
        after=after,
        reason=reason,
    )
    session.add(row)
    await session.flush()
    return row


async def list_audit(
    session: AsyncSession, *, namespace: str | None, limit: int, before_id: int | None
) -> Sequence[AuditEvent]:
    """Newest first; `before_id` pages back from an earlier answer's last id."""
    stmt = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if namespace is not None:
        stmt = stmt.where(AuditEvent.namespace == namespace)
    if before_id is not None:
        stmt = stmt.where(AuditEvent.id < before_id)
    return (await session.scalars(stmt)).all()


async def previous_champion_of(
    session: AsyncSession, *, namespace: str, version_id: int
) -> int | None:
    """Where the previous-champion alias pointed when `version_id` was last made champion.

    Read from the audit trail, whose champion moves record the alias state after each move.
    """
    stmt = (
        select(AuditEvent)
        .where(AuditEvent.namespace == namespace, AuditEvent.action.in_(_CHAMPION_MOVES))
        .order_by(AuditEvent.id.desc())
    )
    for event in await session.scalars(stmt):
        after = event.after or {}
        champion = after.get(CHAMPION) or {}
        if champion.get("version_id") == version_id:
            previous = after.get(PREVIOUS_CHAMPION) or {}
            found = previous.get("version_id")
            return int(found) if found is not None else None
    return None


async def blob_in_use(session: AsyncSession, *, sha256: str) -> bool:
    stmt = (
        select(func.count()).select_from(AdapterVersion).where(AdapterVersion.blob_sha256 == sha256)
    )
    return bool(await session.scalar(stmt))


async def alias_rows(session: AsyncSession) -> Sequence[tuple[str, str, int]]:
    """(namespace, alias, version_id) for every alias."""
    stmt = select(Namespace.name, Alias.name, Alias.version_id).join(
        Namespace, Namespace.id == Alias.namespace_id
    )
    return [(ns, alias, vid) for ns, alias, vid in (await session.execute(stmt)).all()]


async def detach_children(session: AsyncSession, *, version_id: int) -> None:
    """Clears `parent_version_id` on versions trained from `version_id` (before deleting it)."""
    stmt = (
        update(AdapterVersion)
        .where(AdapterVersion.parent_version_id == version_id)
        .values(parent_version_id=None)
        .execution_options(synchronize_session=False)
    )
    await session.execute(stmt)
