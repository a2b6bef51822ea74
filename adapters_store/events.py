"""Registry change events on Redis pub/sub: a best-effort publisher, a reconnecting subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

CHANNEL = "selfadapt:adapters"
"""Default channel. Pub/sub ignores Redis database numbers: deployments (or test runs) that
share one Redis server keep apart by giving each its own channel (`SELFADAPT_REDIS_CHANNEL`)."""
PUBLISH_TIMEOUT_S = 2.0
EventKind = Literal["alias_moved", "version_changed", "preload"]
_KINDS: frozenset[str] = frozenset({"alias_moved", "version_changed", "preload"})


@dataclass(frozen=True)
class ChangeEvent:
    """One registry change; gateways drop their alias cache (or preload) when they see it."""

    kind: EventKind
    namespace: str
    alias: str | None = None
    version_id: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> ChangeEvent:
        """Parses an event; raises ValueError on anything that is not one."""
        raw: Any = json.loads(data)
        if not isinstance(raw, dict) or raw.get("kind") not in _KINDS:
            raise ValueError(f"not a change event: {data!r}")
        version_id = raw.get("version_id")
        alias = raw.get("alias")
        return cls(
            kind=raw["kind"],
            namespace=str(raw.get("namespace", "")),
            alias=None if alias is None else str(alias),
            version_id=None if version_id is None else int(version_id),
        )


class ChangePublisher(Protocol):
    """Where the registry announces committed changes. Must never raise."""

    async def publish(self, event: ChangeEvent) -> None: ...


def _client(redis_url: str, *, timeout_s: float) -> Redis:
    # No client-side retries: a dead Redis must cost one quick failure, not a backoff series.
    return Redis.from_url(
        redis_url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


class RedisChangePublisher:
    """Publishes events on `channel`; failures are logged, never raised (Redis down must not
    fail a promotion: gateways then notice the change by polling)."""

    def __init__(
        self, redis_url: str, *, channel: str = CHANNEL, timeout_s: float = PUBLISH_TIMEOUT_S
    ) -> None:
        self._url = redis_url
        self._channel = channel
        self._timeout_s = timeout_s
        self._redis: Redis | None = None

    async def publish(self, event: ChangeEvent) -> None:
        try:
            if self._redis is None:
                self._redis = _client(self._url, timeout_s=self._timeout_s)
            receivers = await asyncio.wait_for(
                self._redis.publish(self._channel, event.to_json()), self._timeout_s
            )
        except (RedisError, OSError, TimeoutError) as e:
            logger.warning(
                "could not publish %s for %s: %s",
                event.kind,
                event.namespace,
                e,
                extra={"adapter": event.namespace},
            )
            return
        logger.debug("published %s to %s receivers", event, receivers)

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


class ChangeSubscriber:
    """Async iterator over change events, reconnecting with exponential backoff.

    `on_connect` runs after each (re)subscription: events sent while disconnected are lost,
    so a gateway should drop its caches then. Stop with `close()`.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        channel: str = CHANNEL,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        poll_timeout_s: float = 1.0,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self._url = redis_url
        self._channel = channel
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._poll_timeout_s = poll_timeout_s
        self._on_connect = on_connect
        self._closed = asyncio.Event()
        self.connected = False

    def close(self) -> None:
        """Ends the iteration at the next poll."""
        self._closed.set()

    def __aiter__(self) -> AsyncIterator[ChangeEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[ChangeEvent]:
        backoff = self._backoff_initial_s
        while not self._closed.is_set():
            redis = _client(self._url, timeout_s=max(self._poll_timeout_s * 2, 1.0))
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    self._set_connected(True)
                    backoff = self._backoff_initial_s
                    async for event in self._listen(pubsub):
                        yield event
            except (RedisError, OSError, TimeoutError) as e:
                logger.warning("change subscriber lost Redis (%s); retrying in %.1fs", e, backoff)
            finally:
                self._set_connected(False)
                await redis.aclose()
            if not self._closed.is_set():
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max_s)

    async def _listen(self, pubsub: PubSub) -> AsyncIterator[ChangeEvent]:
        while not self._closed.is_set():
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=self._poll_timeout_s
            )
            if message is None or message.get("type") != "message":
                continue
            try:
                yield ChangeEvent.from_json(message["data"])
            except ValueError:
                logger.warning("ignoring malformed change event %r", message.get("data"))

    def _set_connected(self, connected: bool) -> None:
        was, self.connected = self.connected, connected
        if connected and not was and self._on_connect is not None:
            try:
                self._on_connect()
            except Exception:
                logger.exception("on_connect callback failed")

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)
