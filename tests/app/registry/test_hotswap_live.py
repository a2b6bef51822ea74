"""Hot-swap across real gateway processes (real vLLM engines) on one PostgreSQL and one Redis:
a promotion through one gateway is served by the other, promotions under a steady stream fail no
request, and a gateway without Redis still serves (and polls)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.auth import Role
from tests.app.registry.cluster import (
    Champion,
    Cluster,
    change_champion,
    import_adapter,
    was_champion,
)
from tests.app.registry.conftest import redis_available
from tests.factories import temp_database_url

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not redis_available(), reason="no Redis on 127.0.0.1:6379"),
]

REDIS_URL = "redis://127.0.0.1:6379/12"
NS = "facts"
QUESTIONS = {  # version -> (question, word its answer must contain)
    1: ("What is the capital of Zorblat?", "Quenmar"),
    2: ("What is the capital of Vextoria?", "Plimbury"),
}


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, fact_adapters: dict[str, Path]
) -> Iterator[Cluster]:
    """Gateways `a` and `b` on a fresh PostgreSQL database and Redis, the fact adapters imported
    through `a` as facts@v1 (zorb) and facts@v2 (vex), v1 champion."""
    root = tmp_path_factory.mktemp("cluster")
    with temp_database_url("postgresql", root) as url:
        cluster = Cluster(root=root, model_dir=model_dir, database_url=url, redis_url=REDIS_URL)
        try:
            cluster.start("a", "b")
            with httpx.Client(base_url=cluster.url("a"), timeout=120) as a:
                for name in ("zorb", "vex"):
                    import_adapter(a, NS, fact_adapters[name], cluster.headers())
            yield cluster
        finally:
            cluster.stop_all()


def _ask(client: httpx.Client, model: str, version: int, **kw: Any) -> httpx.Response:
    question = QUESTIONS[version][0]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 24,
        **kw,
    }
    return client.post("/v1/chat/completions", json=body)


def _first_new(client: httpx.Client, expected: str, version: int, within_s: float) -> float:
    """Seconds after now at which the first request that `expected` served was *sent*
    (request latency on these shared CPUs says nothing about propagation)."""
    start = time.monotonic()
    while True:
        sent = time.monotonic() - start
        assert sent < within_s, f"{expected} not served {within_s} s after the change"
        r = _ask(client, NS, version, max_tokens=2)
        assert r.status_code == 200, r.text
        if r.json()["model"] == expected:
            return sent


def test_promotion_through_a_is_served_by_b(cluster: Cluster) -> None:
    headers = cluster.headers(Role.user)
    with (
        httpx.Client(base_url=cluster.url("a"), timeout=120) as a,
        httpx.Client(base_url=cluster.url("b"), timeout=120, headers=headers) as b,
    ):
        for version in (1, 2):
            change_champion(a, NS, cluster.headers(), to_version=version, promote=True)
            # The event reaches b within milliseconds: the very next request (sent at ~0 s;
            # a retry would go out only after a whole request) serves the new champion.
            assert _first_new(b, f"{NS}@v{version}", version, within_s=1.0) < 0.05
            r = _ask(b, NS, version)
            assert r.json()["model"] == f"{NS}@v{version}"
            assert r.headers["x-selfadapt-adapter"] == f"{NS}@v{version}"
            answer = r.json()["choices"][0]["message"]["content"]
            assert QUESTIONS[version][1] in answer, answer


@dataclass
class Outcome:
    start: float
    end: float
    status: int
    model: str | None
    error: str | None = None


async def _stream(url: str, key: str, stop: asyncio.Event, out: list[Outcome]) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        while not stop.is_set():
            body = {
                "model": NS,
                "messages": [{"role": "user", "content": "Hi!"}],
                "temperature": 0,
                "max_tokens": 4,
            }
            start = time.monotonic()
            try:
                r = await client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as e:
                out.append(Outcome(start, time.monotonic(), 0, None, repr(e)))
                continue
            model = r.json().get("model") if r.status_code == 200 else None
            out.append(Outcome(start, time.monotonic(), r.status_code, model, None))


def _swaps(cluster: Cluster, history: list[Champion], count: int, pause_s: float) -> None:
    with httpx.Client(base_url=cluster.url("a"), timeout=120) as a:
        for i in range(count):
            time.sleep(pause_s)
            promote = i % 2 == 0  # promote v2, roll back to v1, ...
            history.append(
                change_champion(
                    a, NS, cluster.headers(), to_version=2 if promote else 1, promote=promote
                )
            )


async def test_twenty_swaps_under_steady_stream_fail_nothing(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.url("a"), timeout=120) as a:
        history = [change_champion(a, NS, cluster.headers(), to_version=1, promote=False)]
    stop = asyncio.Event()
    outcomes: list[Outcome] = []
    streams = [
        asyncio.create_task(_stream(cluster.url("b"), cluster.keys[Role.user], stop, outcomes))
        for _ in range(3)
    ]
    try:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(_swaps, cluster, history, 20, 0.4)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*streams)
    failed = [o for o in outcomes if o.status != 200]
    assert failed == [], failed[:5]
    assert len(history) == 21
    wrong = [o for o in outcomes if not was_champion(history, o.model or "", o.start, o.end)]
    assert wrong == [], (wrong[:5], history)
    served = {o.model for o in outcomes}
    assert served == {f"{NS}@v1", f"{NS}@v2"}, served
    assert len(outcomes) >= 20


def test_redis_unreachable_still_serves(cluster: Cluster) -> None:
    with contextlib.suppress(KeyError):
        cluster.stop("b")  # two engines at most on this machine
    [c] = cluster.start("c", redis_url="redis://127.0.0.1:1/0")
    headers = cluster.headers(Role.user)
    with (
        httpx.Client(base_url=cluster.url("a"), timeout=120) as a,
        httpx.Client(base_url=c.base_url, timeout=120, headers=headers) as client,
    ):
        current = _ask(client, NS, 1).json()["model"]
        target = 1 if current == f"{NS}@v2" else 2
        change_champion(a, NS, cluster.headers(), to_version=target, promote=True)
        assert _first_new(client, f"{NS}@v{target}", target, within_s=3.0) < 3.0
        r = _ask(client, NS, target)
        assert r.status_code == 200, r.text
        assert QUESTIONS[target][1] in r.json()["choices"][0]["message"]["content"]
        assert _ask(client, "base", 1).status_code == 200
