"""Gateway logic on a fake engine: admission (429), readiness, request validation envelopes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.auth import Role
from app.engine.fake import FakeEngine
from app.main import create_app
from app.settings import EngineSettings, Settings
from tests.conftest import _create_keys


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    model = tmp_path / "model"
    model.mkdir()
    return Settings(data_dir=tmp_path / "data", model=model, engine=EngineSettings(max_queue=2))


@pytest.fixture
def keys(settings: Settings) -> dict[Role, str]:
    return _create_keys(settings)


@pytest.fixture
async def client(
    settings: Settings, keys: dict[Role, str]
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine]]:
    engine = FakeEngine()
    app = create_app(settings, engine=engine)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        headers = {"Authorization": f"Bearer {keys[Role.user]}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers
        ) as c:
            yield c, engine


def _chat(max_tokens: int = 3, **extra: object) -> dict[str, object]:
    return {
        "model": "base",
        "messages": [{"role": "user", "content": "hi there"}],
        "max_tokens": max_tokens,
        **extra,
    }


async def test_chat_queue_full_is_429_with_retry_after(
    client: tuple[httpx.AsyncClient, FakeEngine],
) -> None:
    c, engine = client
    engine.gate = asyncio.Event()
    held = [asyncio.create_task(c.post("/v1/chat/completions", json=_chat())) for _ in range(2)]
    for _ in range(500):  # until both requests sit in the engine
        if engine.running == 2:
            break
        await asyncio.sleep(0.01)
    r = await c.post("/v1/chat/completions", json=_chat())
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"] == {
        "message": r.json()["error"]["message"],
        "type": "rate_limit_error",
        "param": None,
        "code": "queue_full",
    }
    engine.gate.set()
    assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
    assert (await c.post("/v1/chat/completions", json=_chat())).status_code == 200


async def test_chat_fake_engine_usage_and_n(client: tuple[httpx.AsyncClient, FakeEngine]) -> None:
    c, _ = client
    r = await c.post("/v1/chat/completions", json=_chat(max_tokens=3, n=2))
    body = r.json()
    assert r.status_code == 200, body
    assert [ch["message"]["content"] for ch in body["choices"]] == ["tok0 tok1 tok2 "] * 2
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


async def test_completion_prompt_too_long_is_400(
    client: tuple[httpx.AsyncClient, FakeEngine],
) -> None:
    c, _ = client
    r = await c.post("/v1/completions", json={"model": "base", "prompt": "a " * 100})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "base", "prompt": []}, "prompt"),
        ({"model": "base", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "base", "prompt": "x", "echo": True}, "echo"),
        ({"model": "base", "prompt": "x", "n": 99}, "n"),
        ({"prompt": "x"}, "model"),
    ],
)
async def test_completion_bad_input_is_400(
    client: tuple[httpx.AsyncClient, FakeEngine], body: dict[str, object], param: str
) -> None:
    c, _ = client
    r = await c.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["param"] == param


async def test_unknown_route_is_openai_404(client: tuple[httpx.AsyncClient, FakeEngine]) -> None:
    c, _ = client
    r = await c.get("/v1/nope")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"


async def test_readyz_503_until_engine_started(settings: Settings) -> None:
    engine = FakeEngine(ready=False)

    async def never() -> None:
        await asyncio.Event().wait()

    engine.start = never  # type: ignore[method-assign]
    app = create_app(settings, engine=engine)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/readyz")
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "engine_unavailable"
            assert (await c.get("/healthz")).status_code == 200
