"""Hot-swap: keeps the alias cache fresh from Redis change events, or by polling without them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from adapters_store.events import ChangeEvent, ChangeSubscriber

if TYPE_CHECKING:
    from adapters_store.registry import AdapterRegistry
    from app.services.adapters import AdapterService
    from app.services.model_resolver import RegistryAdapterResolver

logger = logging.getLogger(__name__)


class HotSwap:
    """Drops the resolver's alias cache when the registry changes, on every gateway.

    With Redis, change events drop the cache at once and `preload` events load a coming
    champion into the engine before its alias moves. A deleted version's adapter is unloaded
    from the engine (on its change event, or on the next poll without Redis). While Redis is
    unset or unreachable, aliases are re-read every `poll_s` and cached names expire after
    `poll_s`, so a promotion shows within about `poll_s` and serving never depends on Redis.
    """

    def __init__(
        self,
        *,
        registry: AdapterRegistry,
        resolver: RegistryAdapterResolver,
        adapters: AdapterService,
        redis_url: str | None,
        channel: str,
        poll_s: float,
        cache_s: float,
    ) -> None:
        self._registry = registry
        self._resolver = resolver
        self._adapters = adapters
        self._poll_s = poll_s
        self._cache_s = cache_s
        self._subscriber = (
            ChangeSubscriber(redis_url, channel=channel, on_connect=self._events_resumed)
            if redis_url
            else None
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._snapshot: dict[str, int] | None = None
        resolver.max_age_s = poll_s

    @property
    def events_connected(self) -> bool:
        return self._subscriber is not None and self._subscriber.connected

    def start(self) -> None:
        self._spawn(self._poll(), name="alias-poll")
        if self._subscriber is not None:
            self._spawn(self._listen(), name="alias-events")

    async def stop(self) -> None:
        if self._subscriber is not None:
            self._subscriber.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, work: Coroutine[Any, Any, None], *, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("hot-swap task %s failed: %s", task.get_name(), error, exc_info=error)

    def _events_resumed(self) -> None:
        # Events published while we were disconnected are lost: re-read everything.
        logger.info("registry change events connected")
        self._resolver.max_age_s = self._cache_s
        self._resolver.invalidate()

    async def _listen(self) -> None:
        assert self._subscriber is not None
        async for event in self._subscriber:
            self.handle(event)

    def handle(self, event: ChangeEvent) -> None:
        """Apply one change event (public for tests)."""
        logger.debug("change event %s", event)
        if event.kind == "preload":
            if event.version_id is not None:
                self._spawn(self._preload(event.version_id), name=f"preload-{event.version_id}")
            return
        self._resolver.invalidate(event.namespace)
        if event.version_id in self._resolver.target_ids():  # maybe deleted: free its slot
            self._spawn(self._drop_deleted(), name=f"drop-{event.version_id}")

    async def _preload(self, version_id: int) -> None:
        try:
            version = await self._registry.get_version_by_id(version_id)
            await self._adapters.load(version)
        except Exception as e:  # best effort: the first request loads it otherwise
            logger.warning("could not preload adapter version %s: %s", version_id, e)
        else:
            logger.info("preloaded %s", version.name, extra={"adapter": version.name})

    async def _poll(self) -> None:
        while True:
            if self.events_connected:
                self._resolver.max_age_s = self._cache_s
            else:
                self._resolver.max_age_s = self._poll_s
                await self._reread()
                await self._drop_deleted()
            await asyncio.sleep(self._poll_s)

    async def _drop_deleted(self) -> None:
        try:
            await self._adapters.drop_deleted()
        except Exception as e:  # best effort: vLLM's LRU evicts unused adapters anyway
            logger.warning("could not drop deleted adapters: %s", e)

    async def _reread(self) -> None:
        try:
            snapshot = await self._registry.aliases_snapshot()
        except Exception as e:  # the database may blip; serving goes on from the cache
            logger.warning("could not re-read adapter aliases: %s", e)
            return
        self._apply(snapshot)

    def _apply(self, snapshot: dict[str, int]) -> None:
        previous, self._snapshot = self._snapshot, snapshot
        if previous is None or previous == snapshot:
            return
        changed = {
            key.split("/", 1)[0]
            for key in previous.keys() | snapshot.keys()
            if previous.get(key) != snapshot.get(key)
        }
        for namespace in changed:
            self._resolver.invalidate(namespace)
        logger.info("aliases changed (polled): %s", ", ".join(sorted(changed)))
