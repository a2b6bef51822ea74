"""ReSTEM at tiny scale on the bundled model: the CLI queues a job on the real gateway, a worker
runtime runs it (real vLLM sampling and scoring through the gateway, real PEFT trainings, real
registry): rewards computed, winners chosen, the policy adapter trained, versioned, gated and
promoted, trial adapters cleaned up, and the pipeline's self-edit stage then uses the policy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from adapters_store.blobs import BlobStore
from adapters_store.models import AdapterStatus
from adapters_store.registry import AdapterRegistry
from app.auth import Role
from app.cli import cli
from app.db.jobs import SelfEdit
from app.db.session import make_engine, make_sessionmaker
from app.errors import NotFound
from app.model_prep import model_fingerprint
from app.settings import PipelineSettings, RestemSettings, Settings
from tests.conftest import Gateway
from workers.gateway_client import GatewayClient
from workers.runner import JobRunner
from workers.tasks.synthesize import policy_model

pytestmark = pytest.mark.slow

NAMESPACE = "restem-live"
DOCS = [
    {
        "title": "The Grelvin Archipelago",
        "text": "The Grelvin Archipelago lies in the Sorrel Sea. Its largest island, Tamsk, is "
        "home to the port city of Olverhaven. The islanders brew a drink named kelloth.",
        "probes": [{"question": "What drink do the islanders brew?", "answer": "kelloth"}],
    },
    {
        "title": "The Quillon Observatory",
        "text": "The Quillon Observatory stands on Mount Ferrabel and was founded by Dalia "
        "Krennick in 1889. Its great telescope is called the Harrow Glass.",
        "probes": [
            {"question": "Who founded the Quillon Observatory?", "answer": "Dalia Krennick"}
        ],
    },
    {
        "title": "The Marrow Canal",
        "text": "The Marrow Canal links the town of Brisel to Lake Ombra. It was dug by the "
        "engineer Tobin Vask, and barges on it carry slate from the Hennet quarries.",
        "probes": [{"question": "Who dug the Marrow Canal?", "answer": "Tobin Vask"}],
    },
]
TINY = RestemSettings(
    heldout_docs=1,
    steps=3,
    policy_steps=2,
    max_tokens=96,
    min_reward=-1.0,  # keep each document's best self-edit even at tiny step counts
    gate_min_gain=-1.0,  # ...and let the gate promote, so that path runs for real
)


def _worker_settings(gateway: Gateway, model_dir: Path) -> Settings:
    pipeline = PipelineSettings(
        gateway_url=gateway.base_url,
        worker_api_key=gateway.keys[Role.operator],
        heartbeat_s=2.0,
        eval_max_tokens=32,
    )
    return Settings(data_dir=gateway.data_dir, model=model_dir, pipeline=pipeline, restem=TINY)


@pytest.fixture
async def worker(gateway: Gateway, model_dir: Path) -> AsyncIterator[tuple[JobRunner, Any]]:
    settings = _worker_settings(gateway, model_dir)
    db = make_engine(settings)
    sessionmaker = make_sessionmaker(db)
    registry = AdapterRegistry(
        sessionmaker,
        BlobStore(settings.adapter_root / "blobs"),
        None,
        base_model=model_fingerprint(model_dir),
    )

    async def adapt(ctx: Any) -> None:
        raise AssertionError("only the ReSTEM job runs here")

    runner = JobRunner(
        settings=settings, sessionmaker=sessionmaker, queue=None, pipeline=adapt,
        registry_factory=lambda: registry,
        gateway_factory=lambda: GatewayClient.from_settings(settings),
    )  # fmt: skip
    try:
        yield runner, registry
    finally:
        await db.dispose()


def _cli(gateway: Gateway, *args: str) -> tuple[int, str]:
    env = {"SELFADAPT_URL": gateway.base_url, "SELFADAPT_API_KEY": gateway.keys[Role.admin]}
    result = CliRunner().invoke(cli, ["restem", *args], env=env)
    return result.exit_code, result.output


async def _queued_restem_job(gateway: Gateway, within_s: float = 60) -> str:
    headers = {"Authorization": f"Bearer {gateway.keys[Role.operator]}"}
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=headers) as client:
        while time.monotonic() < deadline:
            r = await client.get("/v1/adaptation/jobs", params={"namespace": NAMESPACE})
            found = [j["id"] for j in r.json()["data"] if j["kind"] == "restem"]
            if found:
                return str(found[0])
            await asyncio.sleep(0.2)
    raise AssertionError("the CLI queued no ReSTEM job")


async def test_restem_job_learns_and_gates_a_policy(
    gateway: Gateway, worker: tuple[JobRunner, AdapterRegistry]
) -> None:
    runner, registry = worker
    operator = {"Authorization": f"Bearer {gateway.keys[Role.operator]}"}
    http = httpx.AsyncClient(base_url=gateway.base_url, headers=operator, timeout=60)
    body = {"namespace": NAMESPACE, "documents": DOCS}
    r = await http.post("/v1/documents", json=body)
    assert r.status_code == 202, r.text

    code, output = _cli(gateway, "run", "--namespace", "nowhere", "--docs", "2")
    assert code == 1
    assert "namespace_not_found" in output or "does not exist" in output
    # `selfadapt restem run --watch` queues the job, prints its id and follows it to the end
    # while the worker runtime runs it.
    watcher = asyncio.create_task(
        asyncio.to_thread(
            _cli, gateway, "run", "-n", NAMESPACE, "--rounds", "1", "--docs", "2",
            "--samples", "2", "--watch",
        )
    )  # fmt: skip
    job_id = await _queued_restem_job(gateway)
    outcome = await runner.run(job_id)
    assert outcome["outcome"] == "succeeded", outcome
    code, output = await asyncio.wait_for(watcher, timeout=60)
    assert code == 0, output
    job = (await http.get(f"/v1/adaptation/jobs/{job_id}")).json()
    r = await http.get(f"/v1/adaptation/jobs/{job_id}/events", params={"limit": 100})
    messages = [e["message"] for e in r.json()["data"]]
    assert job["decision"] == "promoted", (job["reasons"], messages)
    assert job["kind"] == "restem"
    assert job["status"] == "succeeded"
    assert job["progress"] == 1.0

    assert output.splitlines()[0] == job_id
    assert "registered policy" in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1].startswith(job_id), output
    assert " succeeded " in lines[-1], output  # the final job line
    assert job["result_version"] == f"{NAMESPACE}-policy@v1"

    scores = job["scores"]
    (round0,) = scores["rounds"]
    assert len(round0["documents"]) == 2
    assert len(scores["heldout"]) == 1
    assert scores["heldout"][0] not in round0["documents"]
    trained = [e for e in round0["edits"] if e["reward"] is not None]
    assert trained, round0["edits"]
    assert all(isinstance(e["reward"], float) for e in trained)
    assert round0["kept"], "the best self-edit per document is kept (min_reward=-1)"
    for doc_id, kept in round0["kept"].items():
        same_doc = [e["reward"] for e in trained if e["doc_id"] == doc_id]
        assert kept["reward"] == max(same_doc)
    gate = round0["gate"]
    assert gate["decision"] == "promoted"
    assert isinstance(gate["before"], float)
    assert isinstance(gate["after"], float)
    assert sum(s["count"] for s in scores["format_stats"].values()) == len(round0["edits"])

    async with runner.leases.sessionmaker() as session:
        rows = list(await session.scalars(select(SelfEdit).where(SelfEdit.job_id == job_id)))
    assert len(rows) == len(round0["edits"])
    assert sorted(r.reward for r in rows if r.reward is not None) == sorted(
        e["reward"] for e in trained
    )

    assert any("reward" in m for m in messages), messages
    assert any(m.startswith("registered policy") for m in messages), messages
    assert any("format weights" in m for m in messages), messages

    # The policy is a registry version with lineage and is the policy namespace's champion.
    (policy,) = await registry.list_versions(f"{NAMESPACE}-policy")
    assert policy.status == AdapterStatus.promoted
    assert policy.job_id == job_id
    assert (policy.scores or {})["restem"]["round"] == 0
    resolved = await registry.resolve(f"{NAMESPACE}-policy")
    assert resolved.name == f"{NAMESPACE}-policy@v1"
    # Every temporary trial adapter was deleted again (rows and blobs).
    try:
        trials = await registry.list_versions(f"{NAMESPACE}-trial")
    except NotFound:
        trials = []
    assert trials == []
    audit = await registry.audit(namespace=f"{NAMESPACE}-trial", limit=500)
    created = [a.after["blob_sha256"] for a in audit if a.action == "version.create" and a.after]
    deleted = [a for a in audit if a.action == "version.delete"]
    assert len(created) == len(deleted) >= len(trained)  # round trials + held-out trials
    assert not any(registry.blobs.exists(sha) for sha in created)
    assert registry.blobs.exists(policy.blob_sha256)

    # Later pipeline jobs sample their self-edits from the promoted policy, via the gateway.
    assert await policy_model(registry, NAMESPACE, "base") == f"{NAMESPACE}-policy"
    async with GatewayClient(gateway.base_url, gateway.keys[Role.operator]) as client:
        texts = await client.chat(
            f"{NAMESPACE}-policy", [{"role": "user", "content": "List facts."}], max_tokens=8
        )
    assert len(texts) == 1
    await http.aclose()
