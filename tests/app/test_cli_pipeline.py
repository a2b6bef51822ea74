"""CLI pieces of the pipeline: `selfadapt jobs`, the worker key and the embedded Redis of `up`."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from app.auth import hash_api_key
from app.cli import cli
from app.cli import jobs as jobs_cli
from app.cli.worker import embedded_redis, ensure_worker_key
from app.db import migrate, repo
from app.db.models import Role
from app.db.session import make_engine, make_sessionmaker
from app.settings import PipelineSettings, Settings
from tests.support.server import free_port
from workers.main import WORKER_KEY_FILE, worker_api_key


def _job(status: str, stage: str, progress: float, attempt: int = 1) -> dict[str, Any]:
    return {
        "id": "adj_1",
        "namespace": "acme",
        "status": status,
        "stage": stage,
        "progress": progress,
        "attempt": attempt,
        "max_attempts": 3,
        "decision": None,
        "result_version": None,
        "created_at": 1_700_000_000,
        "document_ids": ["doc_1"],
        "reasons": [],
        "scores": None,
        "error": None,
    }


def _event(i: int, message: str) -> dict[str, Any]:
    return {
        "id": i,
        "created_at": 1_700_000_000 + i,
        "attempt": 1,
        "type": "stage",
        "message": message,
        "data": {},
    }


class FakeApi:
    """Answers the CLI's GETs from a script of job states (one per poll)."""

    def __init__(self, states: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
        self.states, self.events = states, events
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, url: str, path: str, key: str | None, **params: Any) -> dict[str, Any]:
        self.calls.append((path, params))
        if path.endswith("/events"):
            shown = len([c for c in self.calls if c[0].endswith("/events")])
            return {"object": "list", "data": self.events[: shown * 2][::-1], "has_more": False}
        if path == "/v1/adaptation/jobs":
            return {"object": "list", "data": [self.states[-1]], "has_more": False}
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


def test_jobs_watch_follows_until_done(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi(
        [
            _job("queued", "queued", 0.0),
            _job("running", "train", 0.5),
            _job("succeeded", "done", 1.0),
        ],
        [
            _event(1, "attempt 1 started"),
            _event(2, "stage self_edit"),
            _event(3, "stage train"),
            _event(4, "decision: promoted"),
        ],
    )
    monkeypatch.setattr(jobs_cli, "_get", api)
    result = CliRunner().invoke(cli, ["jobs", "watch", "adj_1", "--key", "k", "--interval", "0"])
    assert result.exit_code == 0, result.output
    for message in ("attempt 1 started", "stage train", "decision: promoted"):
        assert result.output.count(message) == 1  # each event printed once
    assert "succeeded" in result.output


def test_jobs_watch_exits_1_when_the_job_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi([_job("failed", "train", 0.4)], [_event(1, "attempt 1 failed: boom")])
    monkeypatch.setattr(jobs_cli, "_get", api)
    result = CliRunner().invoke(cli, ["jobs", "watch", "adj_1", "--key", "k", "--interval", "0"])
    assert result.exit_code == 1
    assert "boom" in result.output


def test_jobs_list_and_show(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi([_job("running", "train", 0.5)], [_event(1, "stage train")])
    monkeypatch.setattr(jobs_cli, "_get", api)
    listed = CliRunner().invoke(cli, ["jobs", "list", "--key", "k", "-n", "acme"])
    assert listed.exit_code == 0, listed.output
    assert "adj_1" in listed.output
    assert "50.0%" in listed.output
    assert ("/v1/adaptation/jobs", {"namespace": "acme", "status": None, "limit": 20}) in api.calls
    shown = CliRunner().invoke(cli, ["jobs", "show", "adj_1", "--key", "k"])
    assert shown.exit_code == 0, shown.output
    assert "attempt 1/3" in shown.output
    assert "stage train" in shown.output


def test_jobs_cli_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SELFADAPT_API_KEY", raising=False)
    result = CliRunner().invoke(cli, ["jobs", "list"])
    assert result.exit_code == 2
    assert "SELFADAPT_API_KEY" in result.output


def _is_active_operator(settings: Settings, key: str) -> bool:
    async def check() -> bool:
        engine = make_engine(settings)
        try:
            async with make_sessionmaker(engine)() as s:
                row = await repo.get_active_key_by_hash(s, key_hash=hash_api_key(key))
                return row is not None and row.role == Role.operator and row.name == "worker"
        finally:
            await engine.dispose()

    return asyncio.run(check())


def test_worker_key_is_created_once_and_replaced_when_revoked(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", redis_url=None)
    migrate.upgrade(settings)
    key = ensure_worker_key(settings)
    path = settings.data_dir / WORKER_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == key
    assert _is_active_operator(settings, key)
    assert ensure_worker_key(settings) == key
    assert worker_api_key(settings) == key  # what a worker on this data_dir uses

    async def revoke() -> None:
        engine = make_engine(settings)
        try:
            async with make_sessionmaker(engine)() as s:
                row = await repo.get_api_key_by_hash(s, key_hash=hash_api_key(key))
                assert row is not None
                await repo.revoke_api_key(s, key=row)
                await s.commit()
        finally:
            await engine.dispose()

    asyncio.run(revoke())
    replaced = ensure_worker_key(settings)
    assert replaced != key
    assert _is_active_operator(settings, replaced)


def test_embedded_redis_only_without_a_configured_url(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        redis_url=None,
        pipeline=PipelineSettings(embedded_redis_port=port),
    )
    with embedded_redis(settings) as running:
        assert running.redis_url == f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(running.redis_url)
        assert client.ping()
        client.set("k", "v")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(f"redis://127.0.0.1:{port}/0").ping()
    configured = settings.model_copy(update={"redis_url": "redis://example:6379/0"})
    with embedded_redis(configured) as same:
        assert same is configured
