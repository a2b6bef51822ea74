"""/v1/adaptation/jobs: list, show, paginated events, cancel, errors and the operator role."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.auth import Role
from app.db.jobs import Decision, DocumentState, EventKind, JobEvent, JobStatus
from app.db.models import utcnow
from tests.factories import DB_BACKENDS
from tests.support.pipeline import PipelineApp, assert_error, doc, ingest_body, pipeline_app

URL = "/v1/adaptation/jobs"


@pytest.fixture(params=DB_BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PipelineApp]:
    async with pipeline_app(request.param, tmp_path) as app:
        yield app


async def _new_job(api: PipelineApp, text: str, namespace: str = "acme") -> str:
    r = await api.client.post("/v1/documents", json=ingest_body(doc(text), namespace=namespace))
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


async def _add_events(api: PipelineApp, job_id: str, n: int) -> None:
    async with api.sessionmaker() as s:
        for i in range(n):
            s.add(
                JobEvent(
                    job_id=job_id,
                    attempt=1,
                    at=utcnow(),
                    kind=EventKind.loss,
                    message=f"step {i}",
                    data={"step": i, "loss": 1.0 / (i + 1)},
                )
            )
        await s.commit()


async def test_get_job_shape(api: PipelineApp) -> None:
    job_id = await _new_job(api, "Fact.")
    r = await api.client.get(f"{URL}/{job_id}")
    assert r.status_code == 200
    job = r.json()
    assert job["object"] == "adaptation.job"
    assert (job["id"], job["namespace"], job["status"], job["stage"]) == (
        job_id,
        "acme",
        "queued",
        "queued",
    )
    assert (job["progress"], job["attempt"], job["max_attempts"]) == (0.0, 0, 3)
    assert job["decision"] is None
    assert job["result_version"] is None
    assert job["reasons"] == []
    assert isinstance(job["created_at"], int)
    assert job["finished_at"] is None
    assert job["created_by"] == "test-operator"
    assert len(job["document_ids"]) == 1


async def test_finished_job_shows_decision_and_scores(api: PipelineApp) -> None:
    job_id = await _new_job(api, "Fact.")
    await api.set_job(
        job_id,
        status=JobStatus.succeeded,
        decision=Decision.rejected,
        reasons=["new-knowledge F1 0.10 < champion 0.20 + min_gain 0.00"],
        scores={"candidate": {"f1": 0.1}},
        finished_at=utcnow(),
        progress=1.0,
    )
    job = (await api.client.get(f"{URL}/{job_id}")).json()
    assert (job["status"], job["decision"]) == ("succeeded", "rejected")
    assert job["reasons"][0].startswith("new-knowledge F1")
    assert job["scores"] == {"candidate": {"f1": 0.1}}
    assert isinstance(job["finished_at"], int)


async def test_list_jobs_newest_first_with_filters_and_pages(api: PipelineApp) -> None:
    ids = []
    for i in range(3):
        job_id = await _new_job(api, f"Fact {i}.", namespace=f"ns-{i}")
        ids.append(job_id)
    await api.set_job(ids[0], status=JobStatus.failed)
    page = (await api.client.get(URL, params={"limit": 2})).json()
    assert page["object"] == "list"
    assert page["has_more"] is True
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]]
    rest = (await api.client.get(URL, params={"limit": 2, "after": ids[1]})).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False
    by_ns = (await api.client.get(URL, params={"namespace": "ns-1"})).json()["data"]
    assert [j["id"] for j in by_ns] == [ids[1]]
    failed = (await api.client.get(URL, params={"status": "failed"})).json()["data"]
    assert [j["id"] for j in failed] == [ids[0]]
    assert_error(
        await api.client.get(URL, params={"status": "nope"}), 400, "invalid_request", "status"
    )
    assert_error(await api.client.get(URL, params={"limit": 0}), 400, "invalid_request", "limit")


async def test_events_paginate_newest_first(api: PipelineApp) -> None:
    job_id = await _new_job(api, "Fact.")
    await _add_events(api, job_id, 5)  # plus the "documents added" event from ingest
    first = (await api.client.get(f"{URL}/{job_id}/events", params={"limit": 4})).json()
    assert first["object"] == "list"
    assert first["has_more"] is True
    assert [e["message"] for e in first["data"]] == ["step 4", "step 3", "step 2", "step 1"]
    event = first["data"][0]
    assert event["object"] == "adaptation.job.event"
    assert event["type"] == "loss"
    assert event["level"] == "info"
    assert event["data"] == {"step": 4, "loss": 0.2}
    after = first["data"][-1]["id"]
    rest = (await api.client.get(f"{URL}/{job_id}/events", params={"after": after})).json()
    assert next(e["message"] for e in rest["data"]) == "step 0"
    assert rest["data"][-1]["message"].startswith("1 document(s) added")
    assert rest["has_more"] is False


@pytest.mark.parametrize("suffix", ["", "/events", "/cancel"])
async def test_unknown_job_is_404(api: PipelineApp, suffix: str) -> None:
    method = api.client.post if suffix == "/cancel" else api.client.get
    r = await method(f"{URL}/adj_nope{suffix}")
    error = assert_error(r, 404, "job_not_found", "job_id")
    assert "adj_nope" in error["message"]


async def test_cancel_queued_job_at_once(api: PipelineApp) -> None:
    job_id = await _new_job(api, "Fact.")
    r = await api.client.post(f"{URL}/{job_id}/cancel")
    assert r.status_code == 200, r.text
    job = r.json()
    assert (job["status"], job["cancel_requested"]) == ("cancelled", True)
    assert job["finished_at"] is not None
    docs = (await api.client.get("/v1/documents")).json()["data"]
    assert [d["state"] for d in docs] == [DocumentState.failed.value]
    again = await api.client.post(f"{URL}/{job_id}/cancel")  # idempotent
    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"
    # The next document starts a new job instead of joining the cancelled one.
    assert await _new_job(api, "Another fact.") != job_id


async def test_cancel_running_job_is_requested(api: PipelineApp) -> None:
    job_id = await _new_job(api, "Fact.")
    await api.set_job(job_id, status=JobStatus.running, attempt=1)
    job = (await api.client.post(f"{URL}/{job_id}/cancel")).json()
    assert (job["status"], job["cancel_requested"]) == ("running", True)
    events = (await api.client.get(f"{URL}/{job_id}/events")).json()["data"]
    assert events[0]["message"] == "cancellation requested by test-operator"


@pytest.mark.parametrize("status", [JobStatus.succeeded, JobStatus.failed])
async def test_cancel_finished_job_is_409(api: PipelineApp, status: JobStatus) -> None:
    job_id = await _new_job(api, "Fact.")
    await api.set_job(job_id, status=status)
    assert_error(
        await api.client.post(f"{URL}/{job_id}/cancel"), 409, "job_not_cancellable", "job_id"
    )
    assert (await api.job(job_id)).status == status


@pytest.mark.parametrize(("role", "status"), [(None, 401), (Role.user, 403)])
async def test_jobs_need_operator_role(api: PipelineApp, role: Role | None, status: int) -> None:
    job_id = await _new_job(api, "Fact.")
    headers = api.as_role(role) if role else {"Authorization": ""}
    for method, path in [
        ("GET", URL),
        ("GET", f"{URL}/{job_id}"),
        ("GET", f"{URL}/{job_id}/events"),
        ("POST", f"{URL}/{job_id}/cancel"),
    ]:
        r = await api.client.request(method, path, headers=headers)
        assert r.status_code == status, (method, path)
    assert (await api.job(job_id)).status == JobStatus.queued
