"""The optional ReSTEM schedule: which namespaces get a job, and the SAQ cron wiring."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.services.ingest import DocumentInput, IngestService
from app.services.jobs import JobQueue
from app.settings import RestemSettings, Settings
from tests.factories import DB_BACKENDS, db_settings, migrated_db
from tests.support.pipeline import JobsEnv, drop_queue, redis_for
from workers.main import restem_cron
from workers.restem.schedule import SCHEDULE_TASK, queue_scheduled_jobs


@pytest.fixture(params=DB_BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobsEnv]:
    async with migrated_db(request.param, tmp_path) as (engine, sessionmaker):
        settings = db_settings(engine.url.render_as_string(hide_password=False), tmp_path)
        yield JobsEnv(settings, sessionmaker)


async def _ingest(env: JobsEnv, namespace: str, *, probes: bool) -> None:
    service = IngestService(env.sessionmaker, None, env.settings.pipeline)
    pairs = [("What is the capital of Zorblat?", "Quenmar")] if probes else []
    text = f"Zorblat's capital is Quenmar ({namespace})."
    doc = DocumentInput(text=text, param="d", probes=pairs)
    await service.ingest(namespace=namespace, documents=[doc], actor="t", force=False)


async def test_schedule_queues_one_job_per_ready_namespace(env: JobsEnv) -> None:
    await _ingest(env, "acme", probes=True)
    await _ingest(env, "bare", probes=False)  # nothing to score on: skipped
    started = await queue_scheduled_jobs(env.sessionmaker, None, env.settings)
    assert len(started) == 1
    job = await env.job(started[0])
    assert (job.kind, job.status, job.created_by) == ("restem", "queued", "schedule")
    # The next tick finds acme's job still queued and queues nothing.
    assert await queue_scheduled_jobs(env.sessionmaker, None, env.settings) == []


def test_schedule_setting_must_be_a_cron_expression() -> None:
    assert RestemSettings(schedule="0 3 * * *").schedule == "0 3 * * *"
    with pytest.raises(ValidationError, match="cron"):
        RestemSettings(schedule="every night")


async def test_cron_job_is_wired_into_the_worker(env: JobsEnv, tmp_path: Path) -> None:
    from saq import Worker

    assert restem_cron(env.settings, env.sessionmaker, None) == ([], [])  # type: ignore[arg-type]
    settings: Settings = env.settings.model_copy(
        update={"restem": RestemSettings(schedule="*/5 * * * *")}
    )
    name = f"restem-cron-{uuid.uuid4().hex[:8]}"
    with redis_for("redis", tmp_path) as url:
        queue = JobQueue.from_settings(
            settings.model_copy(
                update={"pipeline": settings.pipeline.model_copy(update={"queue_name": name})}
            ),
            url,
        )
        try:
            functions, cron_jobs = restem_cron(settings, env.sessionmaker, queue)
            worker = Worker(queue.queue, functions=functions, cron_jobs=cron_jobs)
            await worker.schedule()
            message = await queue.queue.job(f"cron:{SCHEDULE_TASK}")
            assert message is not None
            assert message.function == SCHEDULE_TASK
            assert SCHEDULE_TASK in worker.functions
            # What the cron task runs: the schedule for every namespace.
            await _ingest(env, "acme", probes=True)
            result = await worker.functions[SCHEDULE_TASK]({})
            assert len(result["jobs"]) == 1
        finally:
            await queue.close()
            drop_queue(url, name)
