"""Champion moves: promote, rollback and custom aliases, each one transaction with its audit row."""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from adapters_store import repo
from adapters_store.core import BeforeMove, RegistryCore, check_promotable
from adapters_store.events import ChangeEvent
from adapters_store.models import (
    CHAMPION,
    PREVIOUS_CHAMPION,
    AdapterStatus,
    AdapterVersion,
    AuditAction,
    Namespace,
)
from app.errors import Conflict, InvalidRequest

logger = logging.getLogger(__name__)

ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class ChampionOps(RegistryCore):
    """The alias-moving half of AdapterRegistry."""

    async def promote(
        self,
        namespace: str,
        version: int,
        actor: str,
        *,
        reason: str | None = None,
        before_move: BeforeMove | None = None,
    ) -> AdapterVersion:
        """Makes `version` the champion (audit `version.promote`); a no-op if it already is.

        `before_move(version)` runs first; if it raises, nothing changes.

        Raises:
            NotFound: no such namespace or version.
            Conflict: `not_promotable` for archived or failed versions.
        """
        async with self._changing(namespace) as session:
            target = await self._version(session, namespace, version)
            check_promotable(target)
            champion = await repo.get_alias(
                session, namespace_id=target.namespace_id, name=CHAMPION
            )
            if champion is not None and champion.version_id == target.id:
                return target
            return await self._move_champion(
                session,
                target,
                previous="current",
                actor=actor,
                action=AuditAction.version_promote,
                reason=reason,
                before_move=before_move,
            )

    async def rollback(
        self,
        namespace: str,
        actor: str,
        *,
        to_version: int | None = None,
        reason: str | None = None,
        before_move: BeforeMove | None = None,
    ) -> AdapterVersion:
        """Moves the champion back to the previous one (again: further back), or to `to_version`.

        Raises:
            NotFound: no such namespace or version.
            Conflict: `no_previous_champion`, or `not_promotable` for an archived/failed target.
        """
        async with self._changing(namespace) as session:
            ns = await self._namespace(session, namespace)
            champion = await repo.get_alias(session, namespace_id=ns.id, name=CHAMPION)
            current_id = champion.version_id if champion is not None else None
            previous: int | Literal["current"] | None = "current"
            if to_version is not None:
                target = await self._version(session, namespace, to_version)
            else:
                target = await self._previous_champion(session, ns)
                previous = await repo.previous_champion_of(
                    session, namespace=namespace, version_id=target.id
                )
            check_promotable(target)
            if target.id == current_id:
                return target
            return await self._move_champion(
                session,
                target,
                previous=previous,
                actor=actor,
                action=AuditAction.version_rollback,
                reason=reason,
                before_move=before_move,
            )

    async def _previous_champion(self, session: AsyncSession, ns: Namespace) -> AdapterVersion:
        alias = await repo.get_alias(session, namespace_id=ns.id, name=PREVIOUS_CHAMPION)
        row = None
        if alias is not None:
            row = await repo.get_version_by_id(session, version_id=alias.version_id)
        if row is None:
            raise Conflict(
                f"namespace '{ns.name}' has no previous champion to roll back to",
                code="no_previous_champion",
            )
        return row

    async def _move_champion(
        self,
        session: AsyncSession,
        target: AdapterVersion,
        *,
        previous: int | Literal["current"] | None,
        actor: str,
        action: AuditAction,
        reason: str | None,
        before_move: BeforeMove | None,
    ) -> AdapterVersion:
        """`before_move`, then the alias moves under the namespace lock. `previous`: where a
        later plain rollback goes (a version id, none, or "current" = the replaced champion)."""
        if before_move is not None:
            await before_move(target)
        ns = await self._namespace(session, target.namespace_name, lock=True)
        target = await self._version(session, ns.name, target.version)  # re-read under the lock
        check_promotable(target)
        champion = await repo.get_alias(session, namespace_id=ns.id, name=CHAMPION)
        current_id = champion.version_id if champion is not None else None
        if current_id == target.id:
            return target  # moved there concurrently
        previous_id = current_id if previous == "current" else previous
        before = await self._champion_state(session, ns)
        await self._point_aliases(session, ns, target, previous_id)
        after = await self._champion_state(session, ns)
        await repo.add_audit(
            session, actor=actor, action=action, target=target.name, namespace=ns.name,
            before=before, after=after, reason=reason,
        )  # fmt: skip
        await session.commit()
        logger.info(
            "%s: champion is now %s (%s)",
            ns.name,
            target.name,
            action,
            extra={"adapter": target.name},
        )
        await self._publish(ChangeEvent("alias_moved", ns.name, CHAMPION, target.id))
        return target

    async def _point_aliases(
        self, session: AsyncSession, ns: Namespace, target: AdapterVersion, previous_id: int | None
    ) -> None:
        """champion -> target, previous_champion -> previous_id (dropped when there is none)."""
        if previous_id is not None and (
            previous_id == target.id
            or await repo.get_version_by_id(session, version_id=previous_id) is None
        ):
            previous_id = None  # deleted since it was champion
        await repo.put_alias(session, namespace_id=ns.id, name=CHAMPION, version_id=target.id)
        if previous_id is None:
            await repo.drop_alias(session, namespace_id=ns.id, name=PREVIOUS_CHAMPION)
        else:
            await repo.put_alias(
                session, namespace_id=ns.id, name=PREVIOUS_CHAMPION, version_id=previous_id
            )
        target.status = AdapterStatus.promoted
        await session.flush()

    async def _champion_state(
        self, session: AsyncSession, ns: Namespace
    ) -> dict[str, dict[str, Any] | None]:
        state: dict[str, dict[str, Any] | None] = {}
        for name in (CHAMPION, PREVIOUS_CHAMPION):
            alias = await repo.get_alias(session, namespace_id=ns.id, name=name)
            row = None
            if alias is not None:
                row = await repo.get_version_by_id(session, version_id=alias.version_id)
            state[name] = row.snapshot() if row is not None else None
        return state

    async def set_alias(
        self, namespace: str, alias: str, version: int, actor: str, *, pinned: bool = False
    ) -> None:
        """Points a custom alias (`acme@stable`) at a version; a pinned alias's version cannot
        be deleted. `champion` moves only through promote/rollback."""
        if not ALIAS_RE.match(alias) or alias in (CHAMPION, PREVIOUS_CHAMPION):
            raise InvalidRequest(
                f"alias {alias!r} cannot be set directly", param="alias", code="invalid_alias"
            )
        async with self._changing(namespace) as session:
            ns = await self._namespace(session, namespace, lock=True)
            target = await self._version(session, namespace, version)
            existing = await repo.get_alias(session, namespace_id=ns.id, name=alias)
            before = (
                {"version_id": existing.version_id, "pinned": existing.pinned} if existing else None
            )
            await repo.put_alias(
                session, namespace_id=ns.id, name=alias, version_id=target.id, pinned=pinned
            )
            await repo.add_audit(
                session,
                actor=actor,
                action=AuditAction.alias_set,
                target=f"{namespace}@{alias}",
                namespace=namespace,
                before=before,
                after={"version_id": target.id, "version": target.version, "pinned": pinned},
            )
            await session.commit()
        await self._publish(ChangeEvent("alias_moved", namespace, alias, target.id))
