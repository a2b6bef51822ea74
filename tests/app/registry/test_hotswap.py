"""Hot-swap on fake engines: Redis events drop the alias cache at once, polling covers a missing or
unreachable Redis within 2 s, and a promotion through one gateway preloads on the others."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from adapters_store.blobs import BlobStore
from adapters_store.events import ChangePublisher, RedisChangePublisher
from adapters_store.registry import AdapterRegistry
from app.auth import Role
from app.db.session import make_engine, make_sessionmaker
from app.settings import RegistrySettings, Settings
from tests.app.registry.conftest import (
    REDIS_URL,
    InProcessGateway,
    in_process_gateway,
    redis_available,
)

needs_redis = pytest.mark.skipif(not redis_available(), reason="no Redis on 127.0.0.1:6379")


@asynccontextmanager
async def direct_registry(
    settings: Settings, publisher: ChangePublisher | None = None
) -> AsyncIterator[AdapterRegistry]:
    """A registry of its own on the gateway's database and store, as a worker would have."""
    engine = make_engine(settings)
    try:
        blobs = BlobStore(settings.adapter_root / "blobs")
        yield AdapterRegistry(make_sessionmaker(engine), blobs, publisher, base_model="test")
    finally:
        await engine.dispose()


async def _serves(gw: InProcessGateway, model: str, expected: str, *, within_s: float) -> float:
    """Seconds until `model` is served as `expected` (fails after `within_s`)."""
    start = time.monotonic()
    while True:
        r = await gw.ask(model)
        assert r.status_code == 200, r.text
        elapsed = time.monotonic() - start
        if r.json()["model"] == expected:
            return elapsed
        assert elapsed < within_s, f"{model} still served as {r.json()['model']}"
        await asyncio.sleep(0.02)


async def _until_connected(gw: InProcessGateway) -> None:
    for _ in range(200):
        if gw.state.hotswap.events_connected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("change events never connected")


async def _two_versions(gw: InProcessGateway, tiny_adapters: list[Path]) -> None:
    await gw.import_adapter("acme", tiny_adapters[0])
    await gw.import_adapter("acme", tiny_adapters[1])
    await gw.promote("acme", 1)
    assert (await gw.ask("acme")).json()["model"] == "acme@v1"


async def test_polling_without_redis_sees_direct_promotion_within_2s(
    settings: Settings, keys: dict[Role, str], tiny_adapters: list[Path]
) -> None:
    settings = settings.model_copy(update={"registry": RegistrySettings()})  # default interval
    async with in_process_gateway(settings, keys) as gw:
        assert settings.redis_url is None
        await _two_versions(gw, tiny_adapters)
        async with direct_registry(settings) as registry:
            await registry.promote("acme", 2, "worker")
            assert await _serves(gw, "acme", "acme@v2", within_s=2.0) <= 2.0
            await registry.rollback("acme", "worker")
            assert await _serves(gw, "acme", "acme@v1", within_s=2.0) <= 2.0


@needs_redis
async def test_redis_event_drops_cache_immediately(
    settings: Settings, keys: dict[Role, str], tiny_adapters: list[Path]
) -> None:
    settings = settings.model_copy(update={"redis_url": REDIS_URL})
    async with in_process_gateway(settings, keys) as gw:
        await _until_connected(gw)
        await _two_versions(gw, tiny_adapters)
        resolver = gw.state.resolver
        assert resolver.max_age_s == settings.registry.alias_cache_s  # events, not polling
        publisher = RedisChangePublisher(REDIS_URL)
        async with direct_registry(settings, publisher) as registry:
            await registry.promote("acme", 2, "worker")
            assert await _serves(gw, "acme", "acme@v2", within_s=0.5) < 0.5
        await publisher.aclose()


@needs_redis
async def test_promotion_through_one_gateway_preloads_and_serves_on_another(
    settings: Settings, keys: dict[Role, str], tiny_adapters: list[Path]
) -> None:
    settings = settings.model_copy(update={"redis_url": REDIS_URL})
    async with (
        in_process_gateway(settings, keys) as a,
        in_process_gateway(settings, keys) as b,
    ):
        await _until_connected(a)
        await _until_connected(b)
        await _two_versions(a, tiny_adapters)
        assert (await b.ask("acme")).json()["model"] == "acme@v1"
        v2 = (await a.promote("acme", 2))["champion"]
        assert await _serves(b, "acme", "acme@v2", within_s=0.5) < 0.5
        preloaded = [t for t in b.engine.loaded if t.name == "acme@v2"]
        assert [(t.lora_id, t.path.name) for t in preloaded] == [(v2["id"], v2["blob_sha256"])]
        assert b.engine.requests[-1][2] == preloaded[0]  # same target: stable ids everywhere


@needs_redis
async def test_redis_reconnect_drops_cache(
    settings: Settings, keys: dict[Role, str], tiny_adapters: list[Path]
) -> None:
    settings = settings.model_copy(update={"redis_url": REDIS_URL})
    async with in_process_gateway(settings, keys) as gw:
        await _until_connected(gw)
        await _two_versions(gw, tiny_adapters)
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            async with direct_registry(settings) as registry:  # no events for this one
                await registry.promote("acme", 2, "worker")
            assert (await gw.ask("acme")).json()["model"] == "acme@v1"  # cached, no event
            # Only our subscribers (db 11): other suites may share this Redis server.
            for c in await client.client_list(_type="pubsub"):
                if c["db"] == "11":
                    await client.client_kill_filter(_id=c["id"])  # the subscriber reconnects
            assert await _serves(gw, "acme", "acme@v2", within_s=3.0) < 3.0
        finally:
            await client.aclose()


async def test_unreachable_redis_still_serves_and_polls(
    settings: Settings, keys: dict[Role, str], tiny_adapters: list[Path]
) -> None:
    settings = settings.model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "registry": RegistrySettings()}
    )
    async with in_process_gateway(settings, keys) as gw:
        await _two_versions(gw, tiny_adapters)  # promotion works: publishing is best effort
        assert not gw.state.hotswap.events_connected
        async with direct_registry(settings) as registry:
            await registry.promote("acme", 2, "worker")
            assert await _serves(gw, "acme", "acme@v2", within_s=2.0) <= 2.0
        change = await gw.admin.post("/v1/admin/namespaces/acme/rollback")
        assert change.status_code == 200, change.text
        assert (await gw.ask("acme")).json()["model"] == "acme@v1"


async def _until_unloaded(gw: InProcessGateway, version_id: int, *, within_s: float) -> float:
    start = time.monotonic()
    while version_id not in gw.engine.unloaded:
        assert time.monotonic() - start < within_s, f"{version_id} still loaded"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_deleted_version_is_unloaded_from_the_engine_by_polling(
    settings: Settings, keys: dict[Role, str], tiny_adapters: list[Path]
) -> None:
    async with in_process_gateway(settings, keys) as gw:
        await _two_versions(gw, tiny_adapters)
        served = await gw.ask("acme@v2", gw.operator)  # a candidate, pinned: now in the engine
        assert served.status_code == 200, served.text
        v2 = (await gw.state.registry.get_version("acme", 2)).id
        async with direct_registry(settings) as registry:  # a worker deletes it
            await registry.delete("acme", 2, "worker")
        await _until_unloaded(gw, v2, within_s=3.0)
        assert gw.state.resolver.target_ids() == [
            (await gw.state.registry.resolve("acme")).version_id
        ]
        assert (await gw.ask("acme")).json()["model"] == "acme@v1"  # the champion stays


@needs_redis
async def test_deleted_version_is_unloaded_on_its_change_event(
    settings: Settings, keys: dict[Role, str], tiny_adapters: list[Path]
) -> None:
    settings = settings.model_copy(update={"redis_url": REDIS_URL})
    async with in_process_gateway(settings, keys) as gw:
        await _until_connected(gw)
        await _two_versions(gw, tiny_adapters)
        assert (await gw.ask("acme@v2", gw.operator)).status_code == 200
        v2 = (await gw.state.registry.get_version("acme", 2)).id
        publisher = RedisChangePublisher(REDIS_URL)
        async with direct_registry(settings, publisher) as registry:
            await registry.delete("acme", 2, "worker")
            assert await _until_unloaded(gw, v2, within_s=1.0) < 1.0
        await publisher.aclose()
