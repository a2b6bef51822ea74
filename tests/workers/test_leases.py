"""Leases on SQLite and PostgreSQL: claim, heartbeat, takeover after expiry, fencing, reaping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.jobs import AdaptationJob, JobEvent, JobStatus
from app.db.models import utcnow
from app.services.ingest import DocumentInput, IngestService
from app.services.jobs import JobService
from app.settings import PipelineSettings
from tests.factories import DB_BACKENDS, migrated_db
from workers.leases import JobCancelled, Leases, StaleAttempt

LEASE_S = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Db:
    sessionmaker: async_sessionmaker[AsyncSession]
    clock: Clock
    backend: str

    def leases(self) -> Leases:
        return Leases(self.sessionmaker, lease_s=LEASE_S, clock=self.clock)

    async def job(self, job_id: str) -> AdaptationJob:
        async with self.sessionmaker() as s:
            row = await s.get(AdaptationJob, job_id)
            assert row is not None
            return row

    async def events(self, job_id: str) -> list[str]:
        async with self.sessionmaker() as s:
            rows = await s.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id))
            return list(rows)


@pytest.fixture(params=DB_BACKENDS)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    async with migrated_db(request.param, tmp_path) as (_, sessionmaker):
        yield Db(sessionmaker, Clock(), request.param)


async def _job(db: Db, text: str = "Fact.") -> str:
    service = IngestService(db.sessionmaker, None, PipelineSettings())
    result = await service.ingest(
        namespace="acme", documents=[DocumentInput(text=text, param="d")], actor="t", force=False
    )
    assert result.job_id is not None
    return result.job_id


async def test_claim_is_exclusive_until_the_lease_expires(db: Db) -> None:
    job_id = await _job(db)
    a, b = db.leases(), db.leases()
    first = await a.claim(job_id, "worker-a")
    assert first is not None
    assert (first.attempt, first.namespace) == (1, "acme")
    assert await b.claim(job_id, "worker-b") is None
    db.clock.advance(LEASE_S - 1)
    await a.heartbeat(first)  # renewed: another LEASE_S from now
    db.clock.advance(LEASE_S - 1)
    assert await b.claim(job_id, "worker-b") is None
    db.clock.advance(2)
    second = await b.claim(job_id, "worker-b")
    assert second is not None
    assert second.attempt == 2
    job = await db.job(job_id)
    assert (job.status, job.attempt, job.lease_owner) == (JobStatus.running, 2, "worker-b")


async def test_stale_attempt_cannot_commit_in_fenced(db: Db) -> None:
    job_id = await _job(db)
    leases = db.leases()
    stale = await leases.claim(job_id, "worker-a")
    assert stale is not None
    db.clock.advance(LEASE_S + 1)
    fresh = await leases.claim(job_id, "worker-b")
    assert fresh is not None
    assert fresh.attempt == 2

    with pytest.raises(StaleAttempt, match="attempt 1 lost its lease"):
        async with leases.fenced(stale) as session:
            session.add(
                JobEvent(
                    job_id=job_id,
                    attempt=1,
                    kind="log",
                    message="stale write",
                    at=utcnow(),
                    data={},
                )
            )
    with pytest.raises(StaleAttempt):
        await leases.heartbeat(stale)
    with pytest.raises(StaleAttempt):
        await leases.heartbeat(stale, progress=0.9)
    async with leases.fenced(fresh) as session:
        session.add(
            JobEvent(
                job_id=job_id, attempt=2, kind="log", message="fresh write", at=utcnow(), data={}
            )
        )
    assert "stale write" not in await db.events(job_id)
    assert "fresh write" in await db.events(job_id)
    job = await db.job(job_id)
    assert (job.attempt, job.lease_owner, job.progress) == (2, "worker-b", 0.0)


async def test_fenced_rolls_back_when_the_block_raises(db: Db) -> None:
    job_id = await _job(db)
    leases = db.leases()
    lease = await leases.claim(job_id, "w")
    assert lease is not None

    async def crash() -> None:
        async with leases.fenced(lease) as session:
            session.add(
                JobEvent(job_id=job_id, attempt=1, kind="log", message="half", at=utcnow(), data={})
            )
            await session.flush()
            raise RuntimeError("stage crashed")

    with pytest.raises(RuntimeError, match="stage crashed"):
        await crash()
    assert "half" not in await db.events(job_id)


async def test_no_takeover_while_inside_fenced(db: Db) -> None:
    """While an attempt is inside fenced(), an expired lease still cannot be taken over: the
    claim waits for the block (PostgreSQL row lock) or is refused (SQLite file lock)."""
    job_id = await _job(db)
    leases = db.leases()
    lease = await leases.claim(job_id, "worker-a")
    assert lease is not None
    async with leases.fenced(lease) as session:
        db.clock.advance(LEASE_S * 3)  # expired as far as any clock can tell
        claim = asyncio.create_task(db.leases().claim(job_id, "worker-b"))
        await asyncio.sleep(0.5)
        if db.backend == "sqlite":
            assert claim.done()
            assert claim.result() is None
        else:
            assert not claim.done()  # blocked on the row lock
        session.add(
            JobEvent(
                job_id=job_id, attempt=1, kind="log", message="committed", at=utcnow(), data={}
            )
        )
    taken = await asyncio.wait_for(claim, 10)
    if db.backend == "sqlite":
        assert taken is None
    else:  # the lease the block renewed at entry (clock then) has expired since
        assert taken is not None
        assert taken.attempt == 2
    assert "committed" in await db.events(job_id)


async def test_cancel_request_stops_the_attempt(db: Db) -> None:
    job_id = await _job(db)
    leases = db.leases()
    lease = await leases.claim(job_id, "w")
    assert lease is not None
    view = await JobService(db.sessionmaker).cancel(job_id, actor="op")
    assert view.job.cancel_requested
    assert view.job.status == JobStatus.running
    with pytest.raises(JobCancelled):
        await leases.heartbeat(lease)
    with pytest.raises(JobCancelled):
        async with leases.fenced(lease):
            pass
    async with leases.fenced(lease, allow_cancelled=True) as session:  # to write "cancelled"
        job = await session.get(AdaptationJob, job_id)
        assert job is not None
        job.status = JobStatus.cancelled
    assert (await db.job(job_id)).status == JobStatus.cancelled


async def test_orphans_are_expired_leases_and_old_queued_jobs(db: Db) -> None:
    leases = db.leases()
    running = await _job(db, "one")
    lease = await leases.claim(running, "w")
    assert lease is not None
    assert await leases.orphans(queued_grace_s=60) == []
    db.clock.advance(LEASE_S + 1)
    assert await leases.orphans(queued_grace_s=3600) == [(running, 1)]
    queued = await _job(db, "two")  # joins no running job: a new queued one
    db.clock.advance(61)
    assert sorted(await leases.orphans(queued_grace_s=60)) == sorted([(running, 1), (queued, 0)])
