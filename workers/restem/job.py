"""A ReSTEM job on the worker: the loop run through the gateway and the adapter registry.

Trial adapters become versions of the scratch namespace ``<ns>-trial`` just long enough to be
served pinned (``acme-trial@v4``) and scored, then are deleted (row, blob; the gateway drops
its engine slot on the change event). Policy adapters are versions of ``<ns>-policy``, with
lineage (parent = the policy they were trained from), promoted only through the loop's
held-out gate; the pipeline's self-edit stage samples from that namespace's champion.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select

from adapters_store.models import AdapterStatus, Namespace, policy_namespace, trial_namespace
from app.db.jobs import AdaptationJob, Decision, Document, SelfEdit
from app.errors import NotFound
from app.settings import RestemSettings
from workers.pipeline import PipelineResult
from workers.restem.history import latest_format_stats
from workers.restem.loop import RestemLoop, RestemParts, RestemResult, RunShape
from workers.restem.parts import ChatSampler, PeftInnerLoop, PeftPolicyTrainer
from workers.restem.protocols import PolicyExample, PolicyRef
from workers.restem.selection import FormatStats
from workers.tasks.common import ACTOR, Doc, as_doc
from workers.tasks.history import current_champion

if TYPE_CHECKING:
    from workers.context import JobContext

logger = logging.getLogger(__name__)

PARAMS = ("rounds", "docs", "samples", "repeats")
"""Job parameters that override `settings.restem` (set by the admin API / CLI)."""


class JobReporter:
    """Reporter onto the job: events as job events, progress as the job's overall progress."""

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx

    async def event(self, kind: str, message: str, **data: Any) -> None:
        await self._ctx.event(kind, message, **data)

    async def progress(self, stage: str, fraction: float) -> None:
        await self._ctx.progress(stage, fraction, overall=True)


class RegistryTrialHost:
    """AdapterHost: a trial adapter is a version of `<ns>-trial` while it is scored."""

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx
        self._namespace = trial_namespace(ctx.namespace)
        self._versions: dict[str, int] = {}

    async def publish(self, adapter_dir: Path, *, label: str) -> str:
        async with self._ctx.fenced():
            row = await self._ctx.registry.register_version(
                self._namespace, adapter_dir, ACTOR, job_id=self._ctx.job_id,
                note=f"restem trial of job {self._ctx.job_id}: {label}",
            )  # fmt: skip
        self._versions[row.name] = row.version
        return row.name

    async def retire(self, model: str) -> None:
        version = self._versions.pop(model)
        await self._ctx.registry.delete(self._namespace, version, ACTOR)


async def remove_trials(ctx: JobContext) -> int:
    """Deletes trial versions this job left behind (an attempt killed mid-trial)."""
    name = trial_namespace(ctx.namespace)
    try:
        versions = await ctx.registry.list_versions(name)
    except NotFound:
        return 0
    stale = [v for v in versions if v.job_id == ctx.job_id]
    for v in stale:
        await ctx.registry.delete(name, v.version, ACTOR)
    return len(stale)


class RegistryPolicyStore:
    """PolicyStore: policies are versions of `<ns>-policy`, named pinned (`ns-policy@v3`)."""

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx
        self.namespace = policy_namespace(ctx.namespace)

    async def adapter_dir(self, policy: str) -> Path:
        resolved = await self._ctx.registry.resolve(policy)
        return await asyncio.to_thread(self._ctx.registry.blobs.path_for, resolved.blob_sha256)

    async def register(
        self,
        adapter_dir: Path,
        *,
        parent: PolicyRef,
        round_index: int,
        examples: Sequence[PolicyExample],
    ) -> str:
        registry = self._ctx.registry
        parent_version = (await registry.resolve(parent)).version if parent else None
        lineage = {
            "job_id": self._ctx.job_id,
            "round": round_index,
            "parent": parent,
            "examples": [
                {"document_id": e.document_id, "format": e.format, "reward": e.reward}
                for e in examples
            ],
        }
        async with self._ctx.fenced():
            row = await registry.register_version(
                self.namespace, adapter_dir, ACTOR, parent_version=parent_version,
                job_id=self._ctx.job_id, scores={"restem": lineage},
                note=f"restem round {round_index}: job {self._ctx.job_id}, "
                f"{len(examples)} kept self-edit(s)",
            )  # fmt: skip
        await self._ctx.event("log", f"registered policy {row.name}", version_id=row.id, **lineage)
        return row.name


async def namespace_documents(ctx: JobContext) -> list[Doc]:
    """The namespace's documents that have probes (given or generated), oldest first."""
    async with ctx.sessionmaker() as session:
        rows = (
            await session.scalars(
                select(Document)
                .join(Namespace, Namespace.id == Document.namespace_id)
                .where(Namespace.name == ctx.namespace)
                .order_by(Document.created_at, Document.id)
            )
        ).all()
    return [d for d in (as_doc(r) for r in rows) if d.probes]


async def _job_params(ctx: JobContext) -> dict[str, Any]:
    async with ctx.sessionmaker() as session:
        params = await session.scalar(
            select(AdaptationJob.params).where(AdaptationJob.id == ctx.job_id)
        )
    return {k: v for k, v in (params or {}).items() if k in PARAMS and v is not None}


async def _format_stats(ctx: JobContext, formats: list[str]) -> FormatStats:
    """The format statistics of the namespace's last finished ReSTEM job (fresh if none)."""
    async with ctx.sessionmaker() as session:
        return FormatStats.from_json(formats, await latest_format_stats(session, ctx.namespace))


async def _current_policy(ctx: JobContext) -> PolicyRef:
    """The promoted policy, pinned by version (a promotion meanwhile cannot switch it)."""
    try:
        return (await ctx.registry.resolve(policy_namespace(ctx.namespace))).name
    except NotFound:
        return None


async def _policy_documents(ctx: JobContext) -> set[str]:
    """Documents any policy of the namespace was trained on (never held out for the gate)."""
    try:
        versions = await ctx.registry.list_versions(policy_namespace(ctx.namespace))
    except NotFound:
        return set()
    return {
        str(example.get("document_id"))
        for v in versions
        for example in ((v.scores or {}).get("restem") or {}).get("examples", [])
    }


async def _parts(ctx: JobContext, settings: RestemSettings) -> RestemParts:
    from app.model_prep import resolve_model_dir
    from workers.training.threads import default_threads

    s = ctx.settings
    base_dir = await asyncio.to_thread(resolve_model_dir, s, progress=False)
    champion = await current_champion(ctx)
    start_dir = None
    if champion is not None:
        start_dir = await asyncio.to_thread(ctx.registry.blobs.path_for, champion.blob_sha256)
    threads = s.pipeline.train_threads or default_threads()
    work_dir = ctx.artifacts_dir / "restem"
    inner = PeftInnerLoop(
        ctx.gateway, RegistryTrialHost(ctx), settings=settings, base_model_dir=base_dir,
        start_model=champion.name if champion else s.engine.served_model_name,
        start_adapter_dir=start_dir, work_dir=work_dir,
        eval_max_tokens=s.pipeline.eval_max_tokens, eval_concurrency=s.pipeline.eval_concurrency,
        num_threads=threads, stop=ctx.stop_requested,
    )  # fmt: skip
    trainer = PeftPolicyTrainer(
        RegistryPolicyStore(ctx), settings=settings, base_model_dir=base_dir,
        work_dir=work_dir, num_threads=threads, stop=ctx.stop_requested,
    )  # fmt: skip
    sampler = ChatSampler(ctx.gateway, base_model=s.engine.served_model_name)
    return RestemParts(sampler, inner, trainer, JobReporter(ctx))


async def run_restem_job(ctx: JobContext) -> PipelineResult:
    """Runs the job's ReSTEM rounds and acts on each round's policy gate.

    Raises:
        ValueError: the namespace has no documents with probes.
        StaleAttempt / JobCancelled (from the context): the attempt must stop.
    """
    params = await _job_params(ctx)
    settings = ctx.settings.restem.model_copy(update=params)
    docs = await namespace_documents(ctx)
    if not docs:
        raise ValueError(f"namespace {ctx.namespace} has no documents with probes")
    removed = await remove_trials(ctx)
    if removed:
        await ctx.event("log", f"removed {removed} trial adapter(s) of an earlier attempt")
    loop = RestemLoop(
        await _parts(ctx, settings), settings, stats=await _format_stats(ctx, settings.formats)
    )
    policy, trained = await _current_policy(ctx), await _policy_documents(ctx)
    try:
        result = await loop.run(docs, policy=policy, shape=RunShape.of(settings), trained=trained)
    finally:
        await remove_trials(ctx)
    await _store_self_edits(ctx, result)
    return await _apply_gates(ctx, result)


async def _store_self_edits(ctx: JobContext, result: RestemResult) -> None:
    """Every sampled self-edit of the rounds as a `self_edit` row with its mean reward
    (`kept` = passed the degenerate filter, as in the pipeline); replaces an earlier attempt's."""
    async with ctx.fenced() as session:
        await session.execute(delete(SelfEdit).where(SelfEdit.job_id == ctx.job_id))
        edits = [e for r in result.rounds for e in r.edits]
        session.add_all(
            SelfEdit(
                job_id=ctx.job_id,
                attempt=ctx.attempt,
                document_id=e.doc_id,
                format=e.format,
                text=e.text,
                kept=e.reason is None,
                reward=e.reward,
            )
            for e in edits
        )


async def _apply_gates(ctx: JobContext, result: RestemResult) -> PipelineResult:
    """Promotes / rejects each round's policy candidate in order; sums up the job."""
    store_ns = policy_namespace(ctx.namespace)
    reasons: list[str] = []
    decisions: list[Decision] = []
    version_id: int | None = None
    for r in result.rounds:
        if r.candidate is None or r.gate is None:
            reasons.append(f"round {r.round_index}: no self-edit beat the starting adapter")
            continue
        row = await ctx.registry.get_version(store_ns, int(r.candidate.rsplit("@v", 1)[1]))
        decision = Decision(r.gate.decision)
        async with ctx.fenced():
            if decision == Decision.promoted:
                await ctx.registry.promote(
                    store_ns, row.version, ACTOR, reason=f"job {ctx.job_id}: {r.gate.reason}"
                )
            elif decision == Decision.rejected:
                await ctx.registry.set_status(row.id, AdapterStatus.rejected, ACTOR)
        decisions.append(decision)
        if decision == Decision.promoted or Decision.promoted not in decisions:
            version_id = row.id  # the last promoted policy, else the last candidate
        reasons.append(f"round {r.round_index}: {r.candidate} {decision}: {r.gate.reason}")
    final = (
        Decision.promoted if Decision.promoted in decisions
        else Decision.pending_review if Decision.pending_review in decisions
        else Decision.rejected
    )  # fmt: skip
    scores = {**result.as_json(), "format_stats": result.format_stats.as_json()}
    return PipelineResult(final, reasons, version_id, scores)
