"""POST/GET /v1/documents: ingest (JSON, upload), de-dup, batching, limits, nothing half-stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from adapters_store.models import AuditEvent, Namespace
from app.auth import Role
from app.db.jobs import DocumentState, JobStatus
from tests.factories import DB_BACKENDS
from tests.support.pipeline import PipelineApp, assert_error, doc, ingest_body, pipeline_app

URL = "/v1/documents"
EMPTY = {"namespace": 0, "document": 0, "adaptation_job": 0, "job_event": 0}


@pytest.fixture(params=DB_BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PipelineApp]:
    async with pipeline_app(request.param, tmp_path) as app:
        yield app


async def test_ingest_json_creates_namespace_document_and_job(api: PipelineApp) -> None:
    probes = [{"question": "What is the capital of Zorblat?", "answer": "Quenmar"}]
    r = await api.client.post(URL, json=ingest_body(doc(title="zorb", probes=probes)))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["object"] == "document.ingest"
    assert body["namespace"] == "acme"
    assert body["job_created"] is True
    [d] = body["documents"]
    assert d["id"].startswith("doc_")
    assert len(d["sha256"]) == 64
    assert (d["state"], d["job_id"], d["duplicate"]) == ("pending", body["job_id"], False)
    job = await api.job(body["job_id"])
    assert (job.status, job.attempt, job.document_ids) == (JobStatus.queued, 0, [d["id"]])
    async with api.sessionmaker() as s:
        ns = await s.scalar(select(Namespace).where(Namespace.name == "acme"))
        assert ns is not None
        assert ns.created_by == "test-operator"
        audit = (await s.scalars(select(AuditEvent))).all()
        assert [(a.action, a.target) for a in audit] == [("namespace.create", "acme")]
    listed = (await api.client.get(URL)).json()["data"]
    assert listed[0]["title"] == "zorb"
    assert listed[0]["probes"] == 1
    assert listed[0]["job_status"] == "queued"


async def test_ingest_same_text_twice_returns_same_id_and_no_second_job(api: PipelineApp) -> None:
    first = (await api.client.post(URL, json=ingest_body(doc("Fact one.\r\n")))).json()
    r = await api.client.post(URL, json=ingest_body(doc("  Fact one.\n")))
    assert r.status_code == 200, r.text  # nothing new was accepted
    again = r.json()
    assert again["documents"][0]["id"] == first["documents"][0]["id"]
    assert again["documents"][0]["duplicate"] is True
    assert (again["job_id"], again["job_created"]) == (first["job_id"], False)
    assert (await api.counts())["adaptation_job"] == 1
    # The same text in another namespace is another document.
    other = (
        await api.client.post(URL, json=ingest_body(doc("Fact one."), namespace="beta"))
    ).json()
    assert other["documents"][0]["id"] != first["documents"][0]["id"]


async def test_ingest_duplicates_within_one_request_collapse(api: PipelineApp) -> None:
    r = await api.client.post(URL, json=ingest_body(doc("Same."), doc("Same."), doc("Other.")))
    assert r.status_code == 202
    ids = [d["id"] for d in r.json()["documents"]]
    assert ids[0] == ids[1] != ids[2]
    assert (await api.job(r.json()["job_id"])).document_ids == [ids[0], ids[2]]


async def test_documents_batch_into_the_queued_job(api: PipelineApp) -> None:
    a = (await api.client.post(URL, json=ingest_body(doc("A.")))).json()
    b = (await api.client.post(URL, json=ingest_body(doc("B.")))).json()
    assert b["job_id"] == a["job_id"]
    assert b["job_created"] is False
    job = await api.job(a["job_id"])
    assert job.document_ids == [a["documents"][0]["id"], b["documents"][0]["id"]]
    # Once the job runs, new documents start a new job.
    await api.set_job(a["job_id"], status=JobStatus.running, attempt=1)
    c = (await api.client.post(URL, json=ingest_body(doc("C.")))).json()
    assert c["job_created"] is True
    assert c["job_id"] != a["job_id"]


async def test_force_requeues_a_known_document(api: PipelineApp) -> None:
    first = (await api.client.post(URL, json=ingest_body(doc("Fact.")))).json()
    doc_id, job_id = first["documents"][0]["id"], first["job_id"]
    await api.set_job(job_id, status=JobStatus.succeeded)
    r = await api.client.post(URL, json=ingest_body(doc("Fact."), force=True))
    assert r.status_code == 202
    again = r.json()
    assert again["documents"][0] == {
        "id": doc_id,
        "object": "document",
        "sha256": first["documents"][0]["sha256"],
        "state": "pending",
        "job_id": again["job_id"],
        "duplicate": False,
    }
    assert again["job_created"] is True
    assert again["job_id"] != job_id


async def test_ingest_multipart_txt_and_md(api: PipelineApp) -> None:
    files = [
        ("file", ("notes.txt", b"Vextoria's river is the Plimbury.", "text/plain")),
        (
            "file",
            ("README.md", "\ufeff# Zorblat\n\nQuenmar is the capital.".encode(), "text/markdown"),
        ),
    ]
    r = await api.client.post(URL, data={"namespace": "acme"}, files=files)
    assert r.status_code == 202, r.text
    assert len(r.json()["documents"]) == 2
    listed = (await api.client.get(URL, params={"namespace": "acme"})).json()["data"]
    assert sorted(d["title"] for d in listed) == ["README.md", "notes.txt"]
    assert {d["metadata"]["filename"] for d in listed} == {"README.md", "notes.txt"}


BAD_JSON: list[tuple[Any, int, str, str | None]] = [
    (ingest_body(doc("   \n ")), 400, "empty_document", "documents.0.text"),
    (ingest_body(doc("")), 400, "empty_document", "documents.0.text"),
    (ingest_body(doc("x" * 2_001)), 413, "document_too_large", "documents.0.text"),
    (ingest_body(doc("é" * 1_001)), 413, "document_too_large", "documents.0.text"),
    (
        ingest_body(doc("A."), doc("B."), doc("C."), doc("D.")),
        400,
        "too_many_documents",
        "documents",
    ),
    (ingest_body(namespace="Acme"), 400, "invalid_namespace", "namespace"),
    (ingest_body(namespace="base"), 400, "invalid_namespace", "namespace"),
    (ingest_body(namespace="a"), 400, "invalid_namespace", "namespace"),
    (ingest_body(namespace="../x"), 400, "invalid_namespace", "namespace"),
    (
        ingest_body(doc(probes=[{"question": "Q?", "answer": "  "}])),
        400,
        "invalid_probe",
        "documents.0.probes.0.answer",
    ),
    (
        ingest_body(doc(probes=[{"question": "Q?", "answer": ""}])),
        400,
        "invalid_request",
        "documents.0.probes.0.answer",
    ),
    (
        ingest_body(doc(probes=[{"question": " ", "answer": "A"}])),
        400,
        "invalid_probe",
        "documents.0.probes.0.question",
    ),
    (ingest_body(doc("ok"), doc(" ")), 400, "empty_document", "documents.1.text"),
    ({"namespace": "acme", "documents": []}, 400, "no_documents", "documents"),
    ({"namespace": "acme"}, 400, "invalid_request", "documents"),
    (ingest_body(doc(colour="red")), 400, "invalid_request", "documents.0.colour"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), BAD_JSON)
async def test_ingest_bad_json_is_4xx_and_stores_nothing(
    api: PipelineApp, body: Any, status: int, code: str, param: str | None
) -> None:
    r = await api.client.post(URL, json=body)
    assert_error(r, status, code, param)
    assert await api.counts() == EMPTY


async def test_ingest_oversize_body_is_413(api: PipelineApp) -> None:
    r = await api.client.post(URL, json=ingest_body(doc("x" * 30_000)))
    error = assert_error(r, 413, "payload_too_large")
    assert "20000" in error["message"]

    # Without a Content-Length the stream is still cut off at the limit.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(30):
            yield b"x" * 1_000

    r = await api.client.post(URL, content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    assert await api.counts() == EMPTY


async def test_ingest_malformed_json_and_media_type(api: PipelineApp) -> None:
    r = await api.client.post(URL, content=b"{nope", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_request")
    r = await api.client.post(URL, content=b"hello", headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")
    assert await api.counts() == EMPTY


@pytest.mark.parametrize(
    ("files", "data", "code", "param"),
    [
        (
            [
                ("file", ("ok.txt", b"fine", "text/plain")),
                ("file", ("bad.txt", b"caf\xe9 \xff", "text/plain")),
            ],
            {"namespace": "acme"},
            "invalid_encoding",
            "file.1",
        ),
        (
            [("file", ("doc.pdf", b"%PDF-1.7", "application/pdf"))],
            {"namespace": "acme"},
            "unsupported_file_type",
            "file.0",
        ),
        ([("file", ("a.txt", b"fine", "text/plain"))], {}, "invalid_request", "namespace"),
        (
            [("file", ("a.txt", b"   ", "text/plain"))],
            {"namespace": "acme"},
            "empty_document",
            "file.0.text",
        ),
        ([], {"namespace": "acme"}, "no_documents", "documents"),
    ],
)
async def test_ingest_bad_upload_is_400_and_stores_nothing(
    api: PipelineApp, files: list[Any], data: dict[str, str], code: str, param: str
) -> None:
    if not files:  # httpx sends a urlencoded body without files; force multipart
        files = [("note", ("", b"", "text/plain"))]
        r = await api.client.post(URL, data=data, files=files)
        assert r.status_code == 400
        assert await api.counts() == EMPTY
        return
    r = await api.client.post(URL, data=data, files=files)
    error = assert_error(r, 400, code, param)
    if code == "invalid_encoding":
        assert "bad.txt" in error["message"]
        assert "UTF-8" in error["message"]
    assert await api.counts() == EMPTY


@pytest.mark.parametrize(("role", "status"), [(None, 401), (Role.user, 403)])
async def test_documents_need_operator_role(
    api: PipelineApp, role: Role | None, status: int
) -> None:
    headers = api.as_role(role) if role else {"Authorization": ""}
    r = await api.client.post(URL, json=ingest_body(), headers=headers)
    assert r.status_code == status
    assert (await api.client.get(URL, headers=headers)).status_code == status
    assert await api.counts() == EMPTY
    admin = await api.client.get(URL, headers=api.as_role(Role.admin))
    assert admin.status_code == 200


async def test_list_documents_filters_and_pages(api: PipelineApp) -> None:
    for i in range(3):
        await api.client.post(URL, json=ingest_body(doc(f"Doc {i}.")))
    await api.client.post(URL, json=ingest_body(doc("Other."), namespace="beta"))
    page = (await api.client.get(URL, params={"namespace": "acme", "limit": 2})).json()
    assert page["object"] == "list"
    assert page["has_more"] is True
    assert [d["namespace"] for d in page["data"]] == ["acme", "acme"]
    rest = (
        await api.client.get(
            URL, params={"namespace": "acme", "limit": 2, "after": page["data"][-1]["id"]}
        )
    ).json()
    assert rest["has_more"] is False
    assert len(rest["data"]) == 1
    ids = [d["id"] for d in page["data"] + rest["data"]]
    assert ids == sorted(ids, reverse=True)  # newest first
    assert len((await api.client.get(URL)).json()["data"]) == 4
    pending = await api.client.get(URL, params={"state": DocumentState.learned.value})
    assert pending.json()["data"] == []
    assert_error(
        await api.client.get(URL, params={"state": "nope"}), 400, "invalid_request", "state"
    )
