"""Model-name resolution over the adapter registry: `base`, `acme`, `acme@v7` -> engine target."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from adapters_store.blobs import BlobCorrupt, BlobError, BlobStore
from adapters_store.events import ChangeEvent, ChangePublisher
from adapters_store.models import CHAMPION, AdapterStatus, NamespaceSettings
from adapters_store.validation import validate_upload_names
from app.db.models import Role
from app.engine.base import EngineClient, LoRATarget
from app.errors import APIError, NotFound, PayloadTooLarge
from app.protocol.admin import (
    AuditEventPublic,
    AuditList,
    ChampionChange,
    NamespacePublic,
    VersionDeleted,
    VersionPublic,
)
from app.protocol.openai import ModelCard

if TYPE_CHECKING:
    from adapters_store.models import AdapterVersion, Namespace
    from adapters_store.registry import AdapterRegistry, ResolvedVersion
    from app.settings import Settings

logger = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^(?P<namespace>[a-z][a-z0-9-]{1,62})(?:@(?P<ref>[A-Za-z0-9_-]{1,63}))?$")
"""`acme` (its champion), `acme@v7` (a version) or `acme@<alias>`."""


@dataclass(frozen=True)
class ResolvedModel:
    """What serves a request: `name` goes into the response's `model` field."""

    name: str
    lora: LoRATarget | None


class AdapterResolver(Protocol):
    """Maps a request's `model` to weights. `role` decides what the caller may see
    (e.g. unpromoted candidates only for operators and admins)."""

    async def resolve(self, model: str, *, role: Role) -> ResolvedModel: ...

    async def list_models(self, *, role: Role) -> list[ModelCard]: ...


class AdapterBlobUnavailable(APIError):
    """The registry names a version whose stored files are missing or corrupt."""

    status_code = 500
    type = "server_error"
    code = "adapter_blob_corrupt"


def model_not_found(model: str) -> NotFound:
    return NotFound(
        f"The model '{model}' does not exist. GET /v1/models lists the models you can use "
        "('base' is the base model).",
        param="model",
        code="model_not_found",
    )


def _user_may_pin(status: AdapterStatus) -> bool:
    # Users see champions and versions that have been champion; the rest (candidates under
    # evaluation, rejected, failed, archived) only operators and admins may pin.
    return status == AdapterStatus.promoted


class RegistryAdapterResolver:
    """Resolves model names through the registry, caching name -> version for `max_age_s`.

    The hot-swap service drops the cache on change events and sets `max_age_s` (short while
    Redis events are unavailable). Engine targets are cached per version id: versions are
    immutable, so one id always names the same verified weights, on every gateway.
    """

    def __init__(
        self,
        registry: AdapterRegistry,
        blobs: BlobStore,
        *,
        base_name: str,
        base_root: str,
        max_age_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._blobs = blobs
        self._base_name = base_name
        self._base_root = base_root
        self.max_age_s = max_age_s
        self._clock = clock
        self._names: dict[str, tuple[float, ResolvedVersion]] = {}
        self._targets: dict[int, LoRATarget] = {}
        self._generation = 0

    def invalidate(self, namespace: str | None = None) -> None:
        """Forget cached names (of one namespace, or all): the next request re-reads them."""
        self._generation += 1
        if namespace is None:
            self._names.clear()
            return
        for model in [m for m, (_, r) in self._names.items() if r.namespace == namespace]:
            del self._names[model]

    async def resolve(self, model: str, *, role: Role) -> ResolvedModel:
        if model == self._base_name:
            return ResolvedModel(name=self._base_name, lora=None)
        match = MODEL_NAME.match(model)
        if match is None:
            raise model_not_found(model)
        resolved = await self._lookup(model)
        public = match["ref"] in (None, CHAMPION)
        if not (public or role.includes(Role.operator) or _user_may_pin(resolved.status)):
            raise model_not_found(model)  # same answer as unknown: candidates stay private
        target = await self.target(
            version_id=resolved.version_id, name=resolved.name, blob_sha256=resolved.blob_sha256
        )
        return ResolvedModel(name=resolved.name, lora=target)

    async def _lookup(self, model: str) -> ResolvedVersion:
        now = self._clock()
        hit = self._names.get(model)
        if hit is not None and now - hit[0] < self.max_age_s:
            return hit[1]
        generation = self._generation
        try:
            resolved = await self._registry.resolve(model)
        except NotFound as e:
            raise model_not_found(model) from e
        # An invalidation that raced this lookup wins: do not cache what may be the old alias.
        if generation == self._generation:
            self._names[model] = (now, resolved)
        return resolved

    async def target(self, *, version_id: int, name: str, blob_sha256: str) -> LoRATarget:
        """The engine target of a version, after checking its blob (once per process)."""
        cached = self._targets.get(version_id)
        if cached is not None:
            return cached
        try:
            path = await asyncio.to_thread(self._blobs.path_for, blob_sha256)
        except BlobError as e:
            code = "adapter_blob_corrupt" if isinstance(e, BlobCorrupt) else "adapter_blob_missing"
            logger.error("cannot serve %s: %s", name, e, extra={"adapter": name})
            raise AdapterBlobUnavailable(
                f"The stored files of adapter '{name}' are "
                f"{'corrupt' if code == 'adapter_blob_corrupt' else 'missing'}; an admin must "
                "restore, re-import or roll back this version.",
                param="model",
                code=code,
            ) from e
        target = LoRATarget(name=name, lora_id=version_id, path=path)
        self._targets[version_id] = target
        return target

    def target_ids(self) -> list[int]:
        """Version ids this gateway has handed to its engine (served at least once)."""
        return list(self._targets)

    def forget_target(self, version_id: int) -> bool:
        """Drops a deleted version's cached target; True when it was known."""
        self._names = {m: hit for m, hit in self._names.items() if hit[1].version_id != version_id}
        return self._targets.pop(version_id, None) is not None

    async def target_for(self, version: AdapterVersion) -> LoRATarget:
        return await self.target(
            version_id=version.id, name=version.name, blob_sha256=version.blob_sha256
        )

    async def list_models(self, *, role: Role) -> list[ModelCard]:
        created = int(time.time())
        cards = [ModelCard(id=self._base_name, created=created, root=self._base_root)]
        aliases = await self._registry.aliases_snapshot()
        for namespace in await self._registry.list_namespaces():
            champion_id = aliases.get(f"{namespace.name}/{CHAMPION}")
            versions = await self._registry.list_versions(namespace.name)
            names = {v.id: v.name for v in versions}
            if champion_id in names:
                cards.append(
                    ModelCard(
                        id=namespace.name,
                        created=int(namespace.created_at.timestamp()),
                        root=self._base_root,
                        parent=names[champion_id],
                    )
                )
            cards.extend(
                ModelCard(
                    id=v.name,
                    created=int(v.created_at.timestamp()),
                    root=self._base_root,
                    parent=names.get(v.parent_version_id or -1, self._base_name),
                )
                for v in versions
                if v.id == champion_id or role.includes(Role.operator) or _user_may_pin(v.status)
            )
        return cards


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
