"""The worker runtime: attempts (success, retry, give up, cancel, takeover) and JobContext."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db.jobs import AdaptationJob, DocumentState, JobEvent, JobStatus
from app.db.models import utcnow
from app.services.jobs import JobService
from app.settings import PipelineSettings
from tests.factories import DB_BACKENDS, db_settings, migrated_db
from tests.support import slow_pipeline
from tests.support.pipeline import JobsEnv, unused
from workers.context import JobContext
from workers.leases import Leases


@pytest.fixture(params=DB_BACKENDS)
async def env(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[JobsEnv]:
    monkeypatch.setenv("SLOW_PIPELINE_STEPS", "2")
    monkeypatch.setenv("SLOW_PIPELINE_STEP_S", "0.01")
    async with migrated_db(request.param, tmp_path) as (engine, sessionmaker):
        base = db_settings(engine.url.render_as_string(hide_password=False), tmp_path)
        pipeline = PipelineSettings(heartbeat_s=0.1, lease_s=5, max_attempts=2, retry_backoff_s=0)
        yield JobsEnv(base.model_copy(update={"pipeline": pipeline}), sessionmaker)


async def test_attempt_succeeds_and_records_everything(env: JobsEnv) -> None:
    job_id = await env.ingest("Fact one.", "Fact two.")
    outcome = await env.runner(slow_pipeline.run).run(job_id)
    assert outcome == {"job_id": job_id, "attempt": 1, "outcome": "succeeded"}
    job = await env.job(job_id)
    assert (job.status, job.stage, job.progress, job.decision) == (
        JobStatus.succeeded,
        "done",
        1.0,
        "promoted",
    )
    assert job.result_version_id is not None
    assert job.lease_expires_at is None
    assert job.started_at is not None
    assert job.finished_at is not None
    assert await env.doc_states(job_id) == [DocumentState.learned] * 2
    view = await JobService(env.sessionmaker).get(job_id)
    assert view.result_version == "acme@v1"
    async with env.sessionmaker() as s:
        stages = list(
            await s.scalars(
                select(JobEvent.data["stage"].as_string()).where(
                    JobEvent.job_id == job_id, JobEvent.kind == "stage"
                )
            )
        )
    assert stages == ["queued", "self_edit", "train", "evaluate", "gate"]
    assert (env.settings.data_dir / "jobs" / job_id / "attempt-1").is_dir()


async def test_failed_attempt_is_retried_then_gives_up(env: JobsEnv) -> None:
    job_id = await env.ingest("Fact.")
    runner = env.runner(slow_pipeline.fail)
    assert (await runner.run(job_id))["outcome"] == "retrying"
    job = await env.job(job_id)
    assert (job.status, job.attempt, job.error) == (JobStatus.queued, 1, "RuntimeError: boom")
    assert await env.doc_states(job_id) == [DocumentState.adapting]
    assert (await runner.run(job_id))["outcome"] == "failed"
    job = await env.job(job_id)
    assert (job.status, job.attempt) == (JobStatus.failed, 2)
    assert await env.doc_states(job_id) == [DocumentState.failed]
    assert (await runner.run(job_id))["outcome"] == "skipped"


async def test_expired_attempts_beyond_max_fail_the_job(env: JobsEnv) -> None:
    job_id = await env.ingest("Fact.")
    async with env.sessionmaker() as s:
        job = await s.get(AdaptationJob, job_id)
        assert job is not None
        job.status, job.attempt, job.lease_owner = JobStatus.running, 2, "dead"
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
        await s.commit()
    assert (await env.runner(slow_pipeline.run).run(job_id))["outcome"] == "failed"
    job = await env.job(job_id)
    assert job.status == JobStatus.failed
    assert "gave up after 2 attempts" in (job.error or "")


async def test_cancel_stops_a_running_attempt(env: JobsEnv) -> None:
    job_id = await env.ingest("Fact.")
    run = asyncio.create_task(env.runner(slow_pipeline.wait_forever).run(job_id))
    await env.wait(job_id, lambda j: j.stage == "train")
    await JobService(env.sessionmaker).cancel(job_id, actor="op")
    assert (await asyncio.wait_for(run, 10))["outcome"] == "cancelled"
    job = await env.job(job_id)
    assert job.status == JobStatus.cancelled
    assert job.finished_at is not None
    assert await env.doc_states(job_id) == [DocumentState.failed]


async def test_taken_over_attempt_stops_without_writing(env: JobsEnv) -> None:
    job_id = await env.ingest("Fact.")
    run = asyncio.create_task(env.runner(slow_pipeline.wait_forever).run(job_id))
    await env.wait(job_id, lambda j: j.stage == "train")
    # Another worker whose clock says the lease has lapsed (a long GC pause, a network split).
    later = Leases(env.sessionmaker, lease_s=60, clock=lambda: utcnow() + timedelta(minutes=5))
    other = await later.claim(job_id, "other-worker")
    assert other is not None
    assert other.attempt == 2
    assert (await asyncio.wait_for(run, 10))["outcome"] == "stale"
    job = await env.job(job_id)
    assert (job.status, job.attempt, job.lease_owner) == (JobStatus.running, 2, "other-worker")


async def test_context_writes_inside_fenced_do_not_block(env: JobsEnv, tmp_path: Path) -> None:
    """Inside fenced(): events and progress, a write from another session (the registry's
    way), then a write through the fenced session and more progress; none may wait on a
    lock this attempt holds itself (PostgreSQL row lock, SQLite's single writer)."""
    job_id = await env.ingest("Fact.")
    runner = env.runner(slow_pipeline.run)
    lease = await runner.leases.claim(job_id, runner.owner)
    assert lease is not None
    ctx = JobContext(
        lease=lease,
        leases=runner.leases,
        settings=env.settings,
        artifacts_dir=tmp_path / "a",
        registry_factory=unused,
        gateway_factory=unused,
    )

    def event(message: str) -> JobEvent:
        return JobEvent(job_id=job_id, attempt=1, at=utcnow(), kind="log", message=message, data={})

    async with asyncio.timeout(4), ctx.fenced() as session:  # < SQLite's busy timeout
        await ctx.event("log", "inside")
        await ctx.progress("train", 0.5)
        async with env.sessionmaker() as other:
            other.add(event("registry-like"))
            await other.commit()
        session.add(event("fenced write"))
        await session.flush()
        await ctx.progress("train", 0.6)
        await ctx.check_fence()
    async with env.sessionmaker() as s:
        messages = set(await s.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)))
    assert {"inside", "registry-like", "fenced write", "stage train"} <= messages
    job = await env.job(job_id)
    assert (job.stage, round(job.progress, 2)) == ("train", 0.6)
    async with ctx.fenced():  # `async with await ctx.fenced()` works too
        pass
    async with await ctx.fenced():
        pass
