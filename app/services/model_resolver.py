"""Model-name resolution over the adapter registry: `base`, `acme`, `acme@v7` -> engine target."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from adapters_store.blobs import BlobCorrupt, BlobError, BlobStore
from adapters_store.models import CHAMPION, AdapterStatus
from app.db.models import Role
from app.engine.base import LoRATarget
from app.errors import APIError, NotFound
from app.protocol.openai import ModelCard

if TYPE_CHECKING:
    from adapters_store.models import AdapterVersion
    from adapters_store.registry import AdapterRegistry, ResolvedVersion

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
