"""The adapter registry's admin API: namespaces, versions, uploads, promotion and rollback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from adapters_store.events import ChangeEvent, ChangePublisher
from adapters_store.models import CHAMPION, NamespaceSettings
from adapters_store.validation import validate_upload_names
from app.engine.base import EngineClient
from app.errors import NotFound, PayloadTooLarge
from app.protocol.admin import (
    AuditEventPublic,
    AuditList,
    ChampionChange,
    NamespacePublic,
    VersionDeleted,
    VersionPublic,
)

if TYPE_CHECKING:
    from adapters_store.models import AdapterVersion, Namespace
    from adapters_store.registry import AdapterRegistry
    from app.services.model_resolver import RegistryAdapterResolver
    from app.settings import Settings

logger = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^(?P<namespace>[a-z][a-z0-9-]{1,62})(?:@(?P<ref>[A-Za-z0-9_-]{1,63}))?$")
"""`acme` (its champion), `acme@v7` (a version) or `acme@<alias>`."""


class Upload(Protocol):
    """An uploaded file as the HTTP layer hands it over (Starlette's UploadFile fits)."""

    filename: str | None

    async def read(self, size: int = -1) -> bytes: ...


def parse_version(ref: str) -> int:
    """`7` or `v7` -> 7; anything else is an unknown version."""
    match = _VERSION_REF.match(ref)
    if match is None:
        raise NotFound(f"version {ref!r} does not exist", code="version_not_found")
    return int(match[1])


_VERSION_REF = re.compile(r"^v?(\d{1,9})$")


class AdapterService:
    """Registry reads and changes for the admin API. Changes of the champion touch this
    gateway's engine: the new champion is announced (`preload`, so other gateways load it
    too) and loaded here before its alias moves, so the first request after it is not slow."""

    def __init__(
        self,
        registry: AdapterRegistry,
        resolver: RegistryAdapterResolver,
        engine: EngineClient,
        *,
        publisher: ChangePublisher | None,
        settings: Settings,
    ) -> None:
        self._registry = registry
        self._resolver = resolver
        self._engine = engine
        self._publisher = publisher
        self._settings = settings

    # -- engine ------------------------------------------------------------------------------

    async def load(self, version: AdapterVersion) -> None:
        """Verify the version's blob and load it into this gateway's engine (idempotent)."""
        await self._engine.load_adapter(await self._resolver.target_for(version))

    async def drop_deleted(self) -> list[int]:
        """Unloads the engine adapters of versions deleted from the registry (e.g. ReSTEM's
        temporary trial adapters), so they stop holding engine slots and cached weights."""
        known = self._resolver.target_ids()
        if not known:
            return []
        gone = sorted(set(known) - await self._registry.existing_version_ids(known))
        for version_id in gone:
            self._resolver.forget_target(version_id)
            try:
                await self._engine.unload_adapter(version_id)
            except Exception as e:  # the engine evicts it by LRU anyway
                logger.warning("could not unload adapter %s: %s", version_id, e)
        if gone:
            logger.info("unloaded deleted adapter version(s) %s", gone)
        return gone

    async def _before_move(self, version: AdapterVersion) -> None:
        target = await self._resolver.target_for(version)  # a bad blob stops it here
        if self._publisher is not None:  # other gateways load it while this one does
            await self._publisher.publish(
                ChangeEvent("preload", version.namespace_name, CHAMPION, version.id)
            )
        await self._engine.load_adapter(target)

    # -- namespaces --------------------------------------------------------------------------

    async def namespaces(self) -> list[NamespacePublic]:
        aliases = await self._registry.aliases_snapshot()
        rows = await self._registry.list_namespaces()
        return [await self._namespace_public(ns, aliases) for ns in rows]

    async def namespace(self, name: str) -> NamespacePublic:
        ns = await self._registry.get_namespace(name)
        return await self._namespace_public(ns, await self._registry.aliases_snapshot())

    async def create_namespace(
        self, name: str, settings: NamespaceSettings | None, *, actor: str
    ) -> NamespacePublic:
        await self._registry.ensure_namespace(name, actor)
        if settings is not None:
            await self._registry.update_namespace_settings(name, settings.model_dump(), actor)
        return await self.namespace(name)

    async def update_settings(
        self, name: str, settings: Mapping[str, Any], *, actor: str
    ) -> NamespacePublic:
        await self._registry.update_namespace_settings(name, settings, actor)
        return await self.namespace(name)

    async def _namespace_public(self, ns: Namespace, aliases: dict[str, int]) -> NamespacePublic:
        champion_id = aliases.get(f"{ns.name}/{CHAMPION}")
        champion = None
        if champion_id is not None:
            champion = (await self._registry.get_version_by_id(champion_id)).name
        return NamespacePublic(
            id=ns.id,
            name=ns.name,
            settings=ns.gate,
            champion=champion,
            created_at=ns.created_at,
            created_by=ns.created_by,
        )

    # -- versions ----------------------------------------------------------------------------

    async def versions(self, namespace: str) -> list[VersionPublic]:
        rows = await self._registry.list_versions(namespace)
        aliases = _aliases_by_version(namespace, await self._registry.aliases_snapshot())
        names = {r.id: r.name for r in rows}
        return [_version_public(r, aliases, names) for r in rows]

    async def version(self, namespace: str, ref: str) -> VersionPublic:
        return await self._public(await self._registry.get_version(namespace, parse_version(ref)))

    async def _public(self, row: AdapterVersion) -> VersionPublic:
        aliases = _aliases_by_version(row.namespace_name, await self._registry.aliases_snapshot())
        names = {row.id: row.name}
        if row.parent_version_id is not None:
            with contextlib.suppress(NotFound):
                parent = await self._registry.get_version_by_id(row.parent_version_id)
                names[parent.id] = parent.name
        return _version_public(row, aliases, names)

    async def import_upload(
        self, namespace: str, files: Sequence[Upload], *, actor: str
    ) -> VersionPublic:
        """Validate and store an uploaded PEFT folder as a candidate; nothing is stored when
        any check fails (InvalidAdapter, 4xx)."""
        names = validate_upload_names([f.filename or "" for f in files])
        staging = self._settings.adapter_root / "uploads" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            await self._receive(files, names, staging)
            row = await self._registry.import_version(
                namespace,
                staging,
                actor,
                self._settings.model_dir,
                self._settings.engine.max_lora_rank,
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
        return await self._public(row)

    async def _receive(self, files: Sequence[Upload], names: list[str], staging: Path) -> None:
        limit = self._settings.registry.max_import_mb * 1024 * 1024
        total = 0
        for upload, name in zip(files, names, strict=True):
            with (staging / name).open("xb") as out:
                while chunk := await upload.read(1 << 20):
                    total += len(chunk)
                    if total > limit:
                        raise PayloadTooLarge(
                            f"the upload exceeds {self._settings.registry.max_import_mb} MB",
                            param="files",
                        )
                    await asyncio.to_thread(out.write, chunk)

    async def promote(
        self, namespace: str, ref: str, *, actor: str, reason: str | None
    ) -> ChampionChange:
        previous = await self._champion_name(namespace)
        row = await self._registry.promote(
            namespace, parse_version(ref), actor, reason=reason, before_move=self._before_move
        )
        return await self._changed(namespace, row, previous)

    async def rollback(
        self, namespace: str, *, actor: str, to_version: int | None, reason: str | None
    ) -> ChampionChange:
        previous = await self._champion_name(namespace)
        row = await self._registry.rollback(
            namespace, actor, to_version=to_version, reason=reason, before_move=self._before_move
        )
        return await self._changed(namespace, row, previous)

    async def _champion_name(self, namespace: str) -> str | None:
        try:
            return (await self._registry.resolve(namespace)).name
        except NotFound:  # no champion yet (or no namespace: the change itself will say so)
            return None

    async def _changed(
        self, namespace: str, row: AdapterVersion, previous: str | None
    ) -> ChampionChange:
        self._resolver.invalidate(namespace)  # this gateway switches now, events or not
        return ChampionChange(
            namespace=namespace,
            champion=await self._public(row),
            previous=None if previous == row.name else previous,
        )

    async def archive(self, namespace: str, ref: str, *, actor: str) -> VersionPublic:
        row = await self._registry.archive(namespace, parse_version(ref), actor)
        self._resolver.invalidate(namespace)
        return await self._public(row)

    async def delete(self, namespace: str, ref: str, *, actor: str) -> VersionDeleted:
        row = await self._registry.get_version(namespace, parse_version(ref))
        await self._registry.delete(namespace, row.version, actor)
        self._resolver.invalidate(namespace)
        return VersionDeleted(id=row.id, name=row.name)

    async def audit(self, *, namespace: str | None, limit: int, before_id: int | None) -> AuditList:
        rows = await self._registry.audit(namespace=namespace, limit=limit, before_id=before_id)
        return AuditList(
            data=[AuditEventPublic.model_validate(r, from_attributes=True) for r in rows],
            next_before_id=rows[-1].id if len(rows) == limit else None,
        )


def _aliases_by_version(namespace: str, snapshot: dict[str, int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for key, version_id in sorted(snapshot.items()):
        ns, _, alias = key.partition("/")
        if ns == namespace:
            out.setdefault(version_id, []).append(alias)
    return out


def _version_public(
    row: AdapterVersion, aliases: dict[int, list[str]], names: dict[int, str]
) -> VersionPublic:
    return VersionPublic(
        id=row.id,
        name=row.name,
        namespace=row.namespace_name,
        version=row.version,
        status=row.status,
        aliases=aliases.get(row.id, []),
        parent=names.get(row.parent_version_id) if row.parent_version_id else None,
        base_model=row.base_model,
        blob_sha256=row.blob_sha256,
        size_bytes=row.size_bytes,
        rank=row.rank,
        peft_config=row.peft_config,
        job_id=row.job_id,
        scores=row.scores,
        note=row.note,
        created_at=row.created_at,
        created_by=row.created_by,
    )
