"""Registry plumbing and reads: sessions, namespaces, resolving model names, audit listing."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters_store import repo
from adapters_store.blobs import BlobStore
from adapters_store.events import ChangeEvent, ChangePublisher
from adapters_store.models import (
    CHAMPION,
    NAMESPACE_RE,
    PROMOTABLE_STATUSES,
    RESERVED_NAMESPACES,
    AdapterStatus,
    AdapterVersion,
    AuditAction,
    AuditEvent,
    Namespace,
    NamespaceSettings,
)
from app.db.models import utcnow
from app.errors import Conflict, InvalidRequest, NotFound

logger = logging.getLogger(__name__)

BeforeMove = Callable[[AdapterVersion], Awaitable[None]]
"""Called with the new champion before the alias moves (the gateway loads it into its engine)."""
_PINNED_REF = re.compile(r"^v(\d{1,9})$")


@dataclass(frozen=True)
class ResolvedVersion:
    """What a model name points at right now."""

    name: str  # "acme@v7"
    version_id: int  # also the engine LoRA id
    blob_sha256: str
    status: AdapterStatus
    namespace: str
    base_model: str | None = None

    @property
    def version(self) -> int:
        return int(self.name.rsplit("@v", 1)[1])

    @classmethod
    def of(cls, row: AdapterVersion) -> ResolvedVersion:
        return cls(
            name=row.name,
            version_id=row.id,
            blob_sha256=row.blob_sha256,
            status=row.status,
            namespace=row.namespace_name,
            base_model=row.base_model,
        )


def _version_not_found(model: str) -> NotFound:
    return NotFound(f"model '{model}' does not exist", code="version_not_found", param="model")


def _namespace_not_found(name: str) -> NotFound:
    return NotFound(f"namespace '{name}' does not exist", code="namespace_not_found")


def check_promotable(row: AdapterVersion) -> None:
    if row.status not in PROMOTABLE_STATUSES:
        raise Conflict(f"{row.name} is {row.status} and cannot be champion", code="not_promotable")


class RegistryCore:
    """Shared plumbing of AdapterRegistry, plus its namespace and read methods."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        blobs: BlobStore,
        publisher: ChangePublisher | None,
        *,
        base_model: str,
    ) -> None:
        self._sessionmaker = sessionmaker
        self.blobs = blobs
        self._publisher = publisher
        self.base_model = base_model
        self._locks: dict[str, asyncio.Lock] = {}

    # -- plumbing ---------------------------------------------------------------------------

    def _session(self) -> AsyncSession:
        # Rows are returned after commit, so they must not expire.
        return self._sessionmaker(expire_on_commit=False)

    @asynccontextmanager
    async def _changing(self, namespace: str) -> AsyncIterator[AsyncSession]:
        """Serialises this process's changes to one namespace (PostgreSQL row locks serialise
        processes) and maps a lost race on a unique constraint to a retryable Conflict."""
        lock = self._locks.setdefault(namespace, asyncio.Lock())
        async with lock, self._session() as session:
            try:
                yield session
            except IntegrityError as e:
                await session.rollback()
                raise Conflict(f"concurrent change to '{namespace}'; retry") from e

    async def _publish(self, *events: ChangeEvent) -> None:
        if self._publisher is None:
            return
        for event in events:
            try:
                await self._publisher.publish(event)
            except Exception:  # a publisher must not fail a committed change
                logger.exception("publishing %s failed", event)

    async def _namespace(
        self, session: AsyncSession, name: str, *, lock: bool = False
    ) -> Namespace:
        ns = await repo.get_namespace(session, name=name, lock=lock)
        if ns is None:
            raise _namespace_not_found(name)
        return ns

    async def _version(self, session: AsyncSession, namespace: str, version: int) -> AdapterVersion:
        ns = await self._namespace(session, namespace)
        row = await repo.get_version(session, namespace_id=ns.id, version=version)
        if row is None:
            raise _version_not_found(f"{namespace}@v{version}")
        return row

    # -- namespaces -------------------------------------------------------------------------

    async def ensure_namespace(self, name: str, actor: str) -> Namespace:
        """The namespace, created (with an audit row) on first use."""
        if not NAMESPACE_RE.match(name) or name in RESERVED_NAMESPACES:
            raise InvalidRequest(
                f"invalid namespace name {name!r}: lowercase letters, digits and '-', 2-63 "
                "characters, starting with a letter; 'base' is reserved",
                param="namespace",
                code="invalid_namespace",
            )
        async with self._session() as session:
            existing = await repo.get_namespace(session, name=name)
            if existing is not None:
                return existing
            ns = Namespace(
                name=name,
                created_by=actor,
                created_at=utcnow(),
                settings=NamespaceSettings().model_dump(),
            )
            session.add(ns)
            try:
                await session.flush()
            except IntegrityError:  # created concurrently: use theirs
                await session.rollback()
                return await self._namespace(session, name)
            await repo.add_audit(
                session,
                actor=actor,
                action=AuditAction.namespace_create,
                target=name,
                namespace=name,
                after={"settings": ns.settings},
            )
            await session.commit()
        logger.info("created namespace %s", name, extra={"adapter": name})
        return ns

    async def get_namespace(self, name: str) -> Namespace:
        async with self._session() as session:
            return await self._namespace(session, name)

    async def list_namespaces(self) -> list[Namespace]:
        async with self._session() as session:
            return list(await repo.list_namespaces(session))

    async def update_namespace_settings(
        self, name: str, settings: Mapping[str, Any], actor: str
    ) -> Namespace:
        """Merges `settings` into the namespace's gate settings (audit `namespace.update`)."""
        async with self._changing(name) as session:
            ns = await self._namespace(session, name, lock=True)
            before = dict(ns.settings)
            try:
                merged = NamespaceSettings.model_validate({**before, **settings})
            except ValidationError as e:
                loc = ".".join(str(p) for p in e.errors()[0]["loc"])
                raise InvalidRequest(
                    f"invalid settings: {e.errors()[0]['msg']}", param=f"settings.{loc}"
                ) from e
            ns.settings = merged.model_dump()
            await repo.add_audit(
                session,
                actor=actor,
                action=AuditAction.namespace_update,
                target=name,
                namespace=name,
                before=before,
                after=ns.settings,
            )
            await session.commit()
        return ns

    # -- reads ------------------------------------------------------------------------------

    async def get_version(self, namespace: str, version: int) -> AdapterVersion:
        async with self._session() as session:
            return await self._version(session, namespace, version)

    async def get_version_by_id(self, version_id: int) -> AdapterVersion:
        async with self._session() as session:
            row = await repo.get_version_by_id(session, version_id=version_id)
        if row is None:
            raise NotFound(
                f"adapter version id {version_id} does not exist", code="version_not_found"
            )
        return row

    async def existing_version_ids(self, ids: Sequence[int]) -> set[int]:
        """Which of `ids` still name a version (the rest were deleted)."""
        async with self._session() as session:
            return set(await repo.existing_version_ids(session, ids=ids))

    async def list_versions(self, namespace: str) -> list[AdapterVersion]:
        async with self._session() as session:
            ns = await self._namespace(session, namespace)
            return list(await repo.list_versions(session, namespace_id=ns.id))

    async def resolve(self, model: str) -> ResolvedVersion:
        """What `acme` (champion), `acme@v7` or `acme@<alias>` points at.

        Raises:
            NotFound: `namespace_not_found`, or `version_not_found` (also when the namespace
                has no champion yet).
        """
        namespace, _, ref = model.partition("@")
        if not NAMESPACE_RE.match(namespace) or namespace in RESERVED_NAMESPACES:
            raise NotFound(
                f"model '{model}' does not exist", code="namespace_not_found", param="model"
            )
        pinned = _PINNED_REF.match(ref)
        async with self._session() as session:
            if pinned is not None:
                row = await repo.version_by_number(
                    session, namespace=namespace, version=int(pinned[1])
                )
            else:
                row = await repo.version_by_alias(
                    session, namespace=namespace, alias=ref or CHAMPION
                )
            if row is not None:
                return ResolvedVersion.of(row)
            if await repo.get_namespace(session, name=namespace) is None:
                raise NotFound(
                    f"model '{model}' does not exist", code="namespace_not_found", param="model"
                )
        if not ref:
            raise NotFound(
                f"namespace '{namespace}' has no champion yet",
                code="version_not_found",
                param="model",
            )
        raise _version_not_found(model)

    async def aliases_snapshot(self) -> dict[str, int]:
        """`{"ns/alias": version_id}` for every alias: cheap to poll for changes."""
        async with self._session() as session:
            return {f"{ns}/{alias}": vid for ns, alias, vid in await repo.alias_rows(session)}

    async def audit(
        self, namespace: str | None = None, limit: int = 50, before_id: int | None = None
    ) -> list[AuditEvent]:
        """Audit rows, newest first; page back with `before_id` = the last id seen."""
        limit = max(1, min(limit, 500))
        async with self._session() as session:
            return list(
                await repo.list_audit(
                    session, namespace=namespace, limit=limit, before_id=before_id
                )
            )
