"""The worker side of ReSTEM on a real database and registry (no engine): trial adapters come
and go, policies are registered with lineage and gated, self-edits are stored with rewards, a
retried attempt cleans up after a killed one, and cancelling stops the loop."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from adapters_store.blobs import BlobStore
from adapters_store.models import AdapterStatus
from adapters_store.registry import AdapterRegistry
from app.db.jobs import JobStatus, SelfEdit
from app.errors import NotFound
from app.services.jobs import JobService
from app.services.restem import RestemRequest, RestemService
from app.settings import PipelineSettings, RestemSettings
from tests.app.registry.conftest import write_tiny_adapter
from tests.factories import DB_BACKENDS, db_settings, migrated_db
from tests.support.pipeline import JobsEnv, unused
from tests.support.restem import ScriptedSampler, ScriptedTrainer
from workers.context import JobContext
from workers.pipeline import PipelineResult
from workers.restem.job import (
    JobReporter,
    RegistryPolicyStore,
    RegistryTrialHost,
    _apply_gates,
    _policy_documents,
    _store_self_edits,
    namespace_documents,
    remove_trials,
)
from workers.restem.loop import GateOutcome, RestemLoop, RestemParts, RestemResult, RoundResult
from workers.restem.protocols import PolicyExample
from workers.restem.selection import FormatStats, ScoredEdit
from workers.runner import JobRunner
from workers.tasks.common import Doc, Probe

PROBE = {"question": "What is the capital of Zorblat?", "answer": "Quenmar"}


@pytest.fixture(params=DB_BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobsEnv]:
    async with migrated_db(request.param, tmp_path) as (engine, sessionmaker):
        base = db_settings(engine.url.render_as_string(hide_password=False), tmp_path)
        pipeline = PipelineSettings(heartbeat_s=0.05, lease_s=5, max_attempts=1)
        yield JobsEnv(base.model_copy(update={"pipeline": pipeline}), sessionmaker)


@pytest.fixture
def registry(env: JobsEnv) -> AdapterRegistry:
    blobs = BlobStore(env.settings.adapter_root / "blobs")
    return AdapterRegistry(env.sessionmaker, blobs, None, base_model="test")


async def _restem_job(env: JobsEnv) -> str:
    from app.services.ingest import DocumentInput, IngestService

    ingest = IngestService(env.sessionmaker, None, env.settings.pipeline)
    doc = DocumentInput(
        "Zorblat's capital is Quenmar.", "d0", probes=[(PROBE["question"], PROBE["answer"])]
    )
    await ingest.ingest(namespace="acme", documents=[doc], actor="t", force=False)
    service = RestemService(env.sessionmaker, None, RestemSettings(), max_attempts=1)
    return await service.start("acme", RestemRequest(docs=1), actor="t")


def _runner(env: JobsEnv, registry: AdapterRegistry, restem: Any) -> JobRunner:
    return JobRunner(
        settings=env.settings, sessionmaker=env.sessionmaker, queue=None, pipeline=unused,
        restem=restem, registry_factory=lambda: registry, gateway_factory=unused,
    )  # fmt: skip


async def test_trials_policies_gates_and_self_edits_on_the_registry(
    env: JobsEnv, registry: AdapterRegistry, model_dir: Path, tmp_path: Path
) -> None:
    job_id = await _restem_job(env)
    tiny = [write_tiny_adapter(model_dir, tmp_path / f"a{i}", seed=i) for i in range(3)]

    async def pipeline(ctx: JobContext) -> PipelineResult:
        host = RegistryTrialHost(ctx)
        first = await host.publish(tiny[0], label="d0 r0")
        assert first == "acme-trial@v1"
        assert (await registry.resolve(first)).status == AdapterStatus.candidate
        await host.retire(first)
        left_over = await host.publish(tiny[1], label="d0 r1")  # as if killed mid-trial
        assert await remove_trials(ctx) == 1
        with pytest.raises(NotFound):
            await registry.resolve(left_over)
        assert await registry.list_versions("acme-trial") == []

        store = RegistryPolicyStore(ctx)
        example = PolicyExample("prompt", "edit", "d0", "rewrite", 0.25)
        v1 = await store.register(tiny[0], parent=None, round_index=0, examples=[example])
        v2 = await store.register(tiny[2], parent=v1, round_index=1, examples=[example])
        assert (v1, v2) == ("acme-policy@v1", "acme-policy@v2")
        assert await _policy_documents(ctx) == {"d0"}  # never held out by later jobs
        assert await store.adapter_dir(v1) == registry.blobs.path_for(
            (await registry.resolve(v1)).blob_sha256
        )
        (doc,) = await namespace_documents(ctx)
        edits = [
            ScoredEdit(doc.id, "rewrite", "p", "a kept edit", (0.25,)),
            ScoredEdit(doc.id, "self_qa", "p", "", reason="empty"),
        ]
        rounds = [
            RoundResult(0, None, [doc.id], edits, {doc.id: edits[0]}, {}, v1,
                        GateOutcome("promoted", 0.0, 0.1, "better")),
            RoundResult(1, v1, [doc.id], [], {}, {}, v2,
                        GateOutcome("rejected", 0.1, 0.05, "worse")),
        ]  # fmt: skip
        result = RestemResult(rounds, v1, FormatStats(["rewrite", "self_qa"]))
        await _store_self_edits(ctx, result)
        await _store_self_edits(ctx, result)  # a retry replaces, never doubles
        return await _apply_gates(ctx, result)

    outcome = await _runner(env, registry, pipeline).run(job_id)
    assert outcome["outcome"] == "succeeded"
    view = await JobService(env.sessionmaker).get(job_id)
    assert view.job.decision == "promoted"
    assert view.result_version == "acme-policy@v1"  # the promoted one, not the rejected v2
    assert [r.split(":")[0] for r in view.job.reasons] == ["round 0", "round 1"]
    versions = await registry.list_versions("acme-policy")
    assert [(v.version, v.status) for v in versions] == [
        (1, AdapterStatus.promoted),
        (2, AdapterStatus.rejected),
    ]
    assert versions[1].parent_version_id == versions[0].id  # lineage
    assert versions[0].job_id == job_id
    assert (await registry.resolve("acme-policy")).name == "acme-policy@v1"
    async with env.sessionmaker() as s:
        rows = list(await s.scalars(select(SelfEdit).where(SelfEdit.job_id == job_id)))
    assert sorted((r.format, r.kept, r.reward) for r in rows) == [
        ("rewrite", True, 0.25),
        ("self_qa", False, None),
    ]
    for folder in tiny:
        shutil.rmtree(folder)


class _CancelsDuringTrial:
    """An inner loop whose first trial asks the job service to cancel the job."""

    def __init__(self, jobs: JobService, job_id: str) -> None:
        self.jobs, self.job_id, self.trials = jobs, job_id, 0

    async def baseline(self, doc: Doc) -> Any:
        from workers.metrics import QAScore

        return QAScore(0.0, 0.0, 0.0, 1)

    async def trial(self, doc: Doc, self_edit: str, *, repeat: int) -> Any:
        from workers.metrics import QAScore
        from workers.restem.protocols import TrialResult

        self.trials += 1
        await self.jobs.cancel(self.job_id, actor="admin")
        return TrialResult(QAScore(0.5, 0.0, 0.0, 1))


async def test_cancel_stops_the_loop_at_the_next_step(
    env: JobsEnv, registry: AdapterRegistry
) -> None:
    job_id = await _restem_job(env)
    jobs = JobService(env.sessionmaker)
    inner, trainer = _CancelsDuringTrial(jobs, job_id), ScriptedTrainer()
    docs = [
        Doc(f"d{i}", "Tamsk", "Tamsk lies in the Sorrel Sea. Olverhaven brews kelloth from "
            "brisk grain.", (Probe("Where?", "Sorrel Sea"),))
        for i in range(3)
    ]  # fmt: skip

    async def pipeline(ctx: JobContext) -> PipelineResult:
        settings = RestemSettings(docs=2, samples=2, formats=["rewrite"], heldout_docs=1)
        parts = RestemParts(ScriptedSampler(), inner, trainer, JobReporter(ctx))
        await RestemLoop(parts, settings).run(docs, policy=None)
        raise AssertionError("the loop must stop once the job is cancelled")

    outcome = await _runner(env, registry, pipeline).run(job_id)
    assert outcome["outcome"] == "cancelled"
    assert inner.trials == 1  # stopped before the next trial
    assert trainer.examples == []  # and before any policy training
    assert (await jobs.get(job_id)).job.status == JobStatus.cancelled
