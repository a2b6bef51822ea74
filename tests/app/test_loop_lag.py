"""The event-loop lag watch (a loop blocked by a synchronous call is measured and logged) and
the keep-alive time given to uvicorn."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.engine.fake import FakeEngine
from app.loop_lag import watch_loop_lag
from app.main import create_app
from app.settings import Settings


async def test_a_blocked_loop_is_measured_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[float] = []
    caplog.set_level(logging.WARNING, logger="app.loop_lag")
    watch = asyncio.create_task(watch_loop_lag(seen.append, interval_s=0.05, warn_s=0.2))
    await asyncio.sleep(0.2)
    assert seen, "the watch observed nothing while the loop ran freely"
    assert min(seen) < 0.2, seen  # on time while nothing blocks (bounds kept loose for CI)
    time.sleep(0.4)  # noqa: ASYNC251 - the blocking call on the loop's thread under test
    await asyncio.sleep(0.1)
    watch.cancel()
    assert max(seen) >= 0.3, seen
    assert "event loop stalled for " in caplog.text


async def test_gateway_exports_the_loop_lag(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    app = create_app(Settings(data_dir=tmp_path / "data", model=model), engine=FakeEngine())
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            await asyncio.sleep(0.6)  # two 0.25 s ticks at least
            text = (await http.get("/metrics")).text
    count = next(
        line
        for line in text.splitlines()
        if line.startswith("selfadapt_event_loop_lag_seconds_count")
    )
    assert float(count.split()[-1]) >= 1, count


def test_gateway_keeps_idle_connections_open_for_the_configured_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib

    import uvicorn

    from app.settings import ServerSettings

    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    assert ServerSettings().keep_alive_s == 75
    settings = Settings(data_dir=tmp_path, model=tmp_path, server=ServerSettings(keep_alive_s=9))
    importlib.import_module("app.cli.serve")._run_gateway(settings)
    assert seen["timeout_keep_alive"] == 9
