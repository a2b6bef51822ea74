"""POST /v1/admin/namespaces/{ns}/restem: 202 + a queued ReSTEM job, OpenAI-style errors for
bad input, and ReSTEM jobs kept apart from document batching; the worker runs them by kind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.api import documents, jobs
from app.api.admin import restem
from app.auth import Authenticator, Role
from app.db.jobs import JobKind, JobStatus
from app.deps import get_state
from app.errors import install_error_handlers
from app.services.ingest import IngestService
from app.services.jobs import JobService
from app.services.restem import RestemService
from app.settings import PipelineSettings, RestemSettings, Settings
from tests.factories import DB_BACKENDS, db_settings, make_api_key, migrated_db
from tests.support.pipeline import assert_error, doc, ingest_body, unused
from workers.pipeline import PipelineResult
from workers.runner import JobRunner

PROBES = [{"question": "What is the capital of Zorblat?", "answer": "Quenmar"}]


@dataclass
class RestemState:
    settings: Settings
    sessionmaker: Any
    authenticator: Authenticator
    ingest: IngestService
    jobs: JobService
    restem: RestemService


@dataclass
class Api:
    client: httpx.AsyncClient
    state: RestemState
    keys: dict[Role, str]

    def as_role(self, role: Role | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"} if role else {}

    async def start(self, namespace: str = "acme", **body: Any) -> httpx.Response:
        return await self.client.post(f"/v1/admin/namespaces/{namespace}/restem", json=body)

    async def ingest(self, *docs: dict[str, Any], namespace: str = "acme") -> dict[str, Any]:
        r = await self.client.post(
            "/v1/documents",
            json=ingest_body(*docs, namespace=namespace),
            headers=self.as_role(Role.operator),
        )
        assert r.status_code == 202, r.text
        body: dict[str, Any] = r.json()
        return body


@pytest.fixture(params=DB_BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    async with migrated_db(request.param, tmp_path) as (engine, sessionmaker):
        base = db_settings(engine.url.render_as_string(hide_password=False), tmp_path)
        pipeline = PipelineSettings(batch_window_s=0.0, heartbeat_s=0.1, retry_backoff_s=0)
        config = RestemSettings(max_docs=8, max_samples=4, max_rounds=3, max_repeats=2)
        settings = base.model_copy(update={"pipeline": pipeline, "restem": config})
        state = RestemState(
            settings=settings,
            sessionmaker=sessionmaker,
            authenticator=Authenticator(sessionmaker, cache_ttl_s=60),
            ingest=IngestService(sessionmaker, None, pipeline),
            jobs=JobService(sessionmaker),
            restem=RestemService(sessionmaker, None, config, max_attempts=2),
        )
        app = FastAPI()
        install_error_handlers(app)
        for module in (documents, jobs, restem):
            app.include_router(module.router)
        app.dependency_overrides[get_state] = lambda: state
        keys = {}
        for role in Role:
            _, keys[role] = await make_api_key(sessionmaker, name=f"test-{role}", role=role)
        headers = {"Authorization": f"Bearer {keys[Role.admin]}"}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers
        ) as client:
            yield Api(client, state, keys)


async def test_start_restem_queues_a_job(api: Api) -> None:
    await api.ingest(doc(probes=PROBES))
    r = await api.start(rounds=2, docs=1, samples=2)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["object"] == "adaptation.job"
    assert (job["kind"], job["status"], job["namespace"]) == ("restem", "queued", "acme")
    assert job["params"] == {"rounds": 2, "docs": 1, "samples": 2}
    assert job["document_ids"] == []
    shown = await api.client.get(f"/v1/adaptation/jobs/{job['id']}")
    assert shown.json()["kind"] == "restem"
    events = (await api.client.get(f"/v1/adaptation/jobs/{job['id']}/events")).json()["data"]
    assert events[0]["message"].startswith("ReSTEM job queued")


async def test_settings_fill_omitted_parameters(api: Api) -> None:
    await api.ingest(doc(probes=PROBES))
    r = await api.client.post("/v1/admin/namespaces/acme/restem")  # no body at all
    assert r.status_code == 202, r.text
    assert r.json()["params"] == {}


async def test_one_active_restem_job_per_namespace(api: Api) -> None:
    await api.ingest(doc(probes=PROBES))
    first = (await api.start()).json()
    assert_error(await api.start(), 409, "restem_job_active", "namespace")
    cancelled = await api.client.post(f"/v1/adaptation/jobs/{first['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled"
    assert (await api.start()).status_code == 202


async def test_documents_do_not_join_a_restem_job(api: Api) -> None:
    first = await api.ingest(doc(probes=PROBES))
    restem_job = (await api.start()).json()
    ingested = await api.ingest(doc("Vextoria's river is the Plimbury."))
    # It joins the queued adaptation job, never the (also queued) ReSTEM job.
    assert ingested["job_id"] == first["job_id"] != restem_job["id"]
    assert ingested["job_created"] is False


async def test_unknown_namespace(api: Api) -> None:
    assert_error(await api.start("nowhere"), 404, "namespace_not_found", "namespace")


async def test_namespace_without_probe_documents(api: Api) -> None:
    await api.ingest(doc())  # no probes: ReSTEM has nothing to score on
    error = assert_error(await api.start(), 400, "no_probe_documents", "namespace")
    assert "probes" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"docs": 0}, "docs"),
        ({"docs": 9}, "docs"),
        ({"samples": 0}, "samples"),
        ({"samples": 5}, "samples"),
        ({"rounds": 4}, "rounds"),
        ({"repeats": 3}, "repeats"),
    ],
)
async def test_out_of_range_parameters(api: Api, body: dict[str, int], param: str) -> None:
    await api.ingest(doc(probes=PROBES))
    error = assert_error(await api.start("acme", **body), 400, f"{param}_out_of_range", param)
    assert str(body[param]) in error["message"]


async def test_malformed_body(api: Api) -> None:
    await api.ingest(doc(probes=PROBES))
    assert_error(await api.start(docs="many"), 400, "invalid_request", "docs")
    assert_error(await api.start(temperature=2.0), 400, "invalid_request", "temperature")


async def test_policy_namespaces_are_reserved(api: Api) -> None:
    assert_error(await api.start("acme-policy"), 400, "invalid_namespace", "namespace")
    r = await api.client.post(
        "/v1/documents",
        json=ingest_body(doc(), namespace="acme-trial"),
        headers=api.as_role(Role.operator),
    )
    assert_error(r, 400, "reserved_namespace", "namespace")


async def test_admin_key_required(api: Api) -> None:
    await api.ingest(doc(probes=PROBES))
    url = "/v1/admin/namespaces/acme/restem"
    r = await api.client.post(url, json={}, headers=api.as_role(Role.operator))
    assert_error(r, 403, "insufficient_role")
    r = await api.client.post(url, json={}, headers={"Authorization": "Bearer nope"})
    assert_error(r, 401, "invalid_api_key")


async def test_worker_runs_restem_jobs_with_the_restem_pipeline(api: Api) -> None:
    await api.ingest(doc(probes=PROBES))
    job_id = (await api.start(docs=1)).json()["id"]
    ran: list[tuple[str, str]] = []

    async def adapt(ctx: Any) -> PipelineResult:
        ran.append(("adapt", ctx.job_id))
        raise AssertionError("a ReSTEM job must not run the adaptation pipeline")

    async def learn_policy(ctx: Any) -> PipelineResult:
        ran.append(("restem", ctx.job_id))
        await ctx.progress("train", 0.5, overall=True)
        return PipelineResult("rejected", ["round 0: no self-edit beat the baseline"], None, {})

    runner = JobRunner(
        settings=api.state.settings, sessionmaker=api.state.sessionmaker, queue=None,
        pipeline=adapt, restem=learn_policy, registry_factory=unused, gateway_factory=unused,
    )  # fmt: skip
    assert (await runner.run(job_id))["outcome"] == "succeeded"
    assert ran == [("restem", job_id)]
    view = await api.state.jobs.get(job_id)
    assert view.job.kind == JobKind.restem
    assert view.job.status == JobStatus.succeeded
    assert view.job.decision == "rejected"
    assert view.job.reasons == ["round 0: no self-edit beat the baseline"]
