"""The adaptation pipeline: self_edit -> probes -> train -> evaluate -> gate, for one job attempt.

The worker runtime (workers/runner.py) claims the job, builds a StageContext and awaits
`run_pipeline(ctx)`. Every stage is idempotent: its output is a JSON artifact under
`ctx.artifacts_dir` (reused by later attempts of the same job), and registry writes are keyed
by the job id and made inside `ctx.fenced()`, so a stale attempt can never register or
promote, and a retry finds the version an earlier attempt committed instead of adding one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.settings import Settings
from workers.tasks import (
    anchors,
    evaluate,
    history,
    probes,
    promote,
    synthesize,
    temper,
    train,
)
from workers.tasks.common import Doc, DocumentRow, as_doc

if TYPE_CHECKING:
    from adapters_store.models import NamespaceSettings
    from adapters_store.registry import AdapterRegistry, ResolvedVersion
    from workers.gateway_client import GatewayClient

logger = logging.getLogger(__name__)


class StageContext(Protocol):
    """What the stages need from the worker runtime (implemented by workers.context)."""

    job_id: str
    attempt: int
    namespace: str
    settings: Settings
    artifacts_dir: Path
    sessionmaker: async_sessionmaker[AsyncSession]
    stop_requested: threading.Event
    """Set when the attempt must stop (cancelled, lease lost): training polls it every step."""

    @property
    def registry(self) -> AdapterRegistry: ...

    @property
    def gateway(self) -> GatewayClient: ...

    async def documents(self) -> Sequence[DocumentRow]: ...

    async def event(self, kind: str, message: str, **data: Any) -> None: ...

    async def progress(self, stage: str, fraction: float) -> None: ...

    async def check_fence(self) -> None: ...

    def fenced(self) -> AbstractAsyncContextManager[AsyncSession]: ...


@dataclass
class PipelineResult:
    """The job's outcome: the gate's decision, why, the candidate version and all scores."""

    decision: str  # promoted | rejected | pending_review
    reasons: list[str]
    version_id: int | None
    scores: dict[str, Any] | None
    timings: dict[str, float] = field(default_factory=dict)


class _Clock:
    """Seconds per stage, reported in the result and as events."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}
        self._stage: str | None = None
        self._t0 = 0.0

    def start(self, stage: str) -> None:
        self.stop()
        self._stage, self._t0 = stage, time.monotonic()

    def stop(self) -> None:
        if self._stage is not None:
            elapsed = time.monotonic() - self._t0
            self.timings[self._stage] = round(self.timings.get(self._stage, 0.0) + elapsed, 2)
            self._stage = None


async def run_pipeline(ctx: StageContext) -> PipelineResult:
    """Runs every stage of one attempt and returns the gate's decision.

    Raises:
        ValueError: the job has no documents.
        StaleAttempt / JobCancelled (from the context): the attempt must stop.
    """
    clock = _Clock()
    docs = [as_doc(row) for row in await ctx.documents()]
    if not docs:
        raise ValueError(f"job {ctx.job_id} has no documents")
    logger.info("job %s: %d document(s) for %s", ctx.job_id, len(docs), ctx.namespace)
    # The anchor answers are cached after the first job; on a cold cache they are asked
    # alongside the self-edits (the engine batches both).
    anchor_task = asyncio.create_task(_anchor_pool(ctx))
    try:
        return await _stages(ctx, docs, clock, anchor_task)
    finally:
        anchor_task.cancel()


async def _anchor_pool(ctx: StageContext) -> list[tuple[str, str]]:
    if ctx.settings.pipeline.anchor_fraction <= 0:
        return []
    return await anchors.anchor_pairs(ctx)


async def _stages(
    ctx: StageContext,
    docs: list[Doc],
    clock: _Clock,
    anchor_task: asyncio.Task[list[tuple[str, str]]],
) -> PipelineResult:
    clock.start("self_edit")
    await ctx.progress("self_edit", 0.0)
    edits = await synthesize.self_edit_stage(ctx, docs)

    clock.start("probes")
    await ctx.progress("probes", 0.0)
    docs = await probes.probe_stage(ctx, docs)

    clock.start("train")
    await ctx.progress("train", 0.0)
    learned = await history.namespace_history(ctx, exclude=[d.id for d in docs])
    champion = await history.current_champion(ctx)
    sets = evaluate.build_eval_sets(ctx, docs, learned)
    # Base and champion answers do not depend on the candidate: ask them while it trains.
    reference_task = asyncio.create_task(evaluate.reference_scores(ctx, sets, champion=champion))
    try:
        inputs = train.TrainInputs(docs, edits, learned, await anchor_task)
        candidate = await _first_candidate(ctx, inputs, champion)
        clock.start("evaluate")
        await ctx.progress("evaluate", 0.0)
        reference = await reference_task
    finally:
        reference_task.cancel()
    scores = await evaluate.evaluate_stage(ctx, sets, candidate=candidate, reference=reference)
    budget = _Budget(ctx.settings.pipeline.search_budget_s, clock.started)
    search = _Search(
        ctx, inputs, champion, sets, reference, await promote.gate_settings(ctx), clock, budget
    )
    candidate, scores = await search.run((candidate, scores))

    clock.start("gate")
    await ctx.progress("gate", 0.0)
    result = await promote.gate_stage(ctx, candidate, scores, champion=champion)
    clock.stop()
    await ctx.event("metric", "stage seconds", **clock.timings)
    reasons = result.reasons
    if budget.spent_before is not None and result.decision != "promoted":
        reasons = [*reasons, f"search stopped: {budget.spent_before}"]
    return PipelineResult(
        decision=result.decision,
        reasons=reasons,
        version_id=candidate.version_id,
        scores={**evaluate.without_answers(scores), "timings": clock.timings},
        timings=clock.timings,
    )


async def _first_candidate(
    ctx: StageContext, inputs: train.TrainInputs, champion: ResolvedVersion | None
) -> train.Candidate:
    """Fresh without a champion; else merged when merging goes first and the champion's
    update plus this job's can be summed exactly (`train.exact_merge_refusal`); else (or
    when the sum fails) incremental, trained on from the champion."""
    if champion is None:
        return await train.train_stage(ctx, inputs, parent=None, mode="fresh")
    pipeline = ctx.settings.pipeline
    if pipeline.merge and pipeline.merge_first:
        refusal = await train.exact_merge_refusal(ctx, champion)
        if refusal is None:
            await ctx.event(
                "log", f"adding this job's documents, trained from the base, to {champion.name}"
            )
            try:
                return await train.merge_stage(ctx, inputs, champion=champion)
            except ValueError as e:  # e.g. a champion an admin imported for other modules
                refusal = str(e)
        await ctx.event("log", f"training on from {champion.name}: cannot add to it ({refusal})")
    return await train.train_stage(ctx, inputs, parent=champion, mode="incremental")


Scored = tuple[train.Candidate, dict[str, Any]]
"""A registered candidate and its evaluation scores."""


class _Budget:
    """The attempt's time for its candidate search (`search_budget_s` from the attempt's start;
    0: no limit): the first candidate is always trained and evaluated, each further one
    (another draw, training further, the other kind, consolidation, a tempered copy) starts
    only while some time is left. A bound on how long one job holds the worker's training
    slot, not a target: each step is a training run or an evaluation of its own."""

    def __init__(self, seconds: float, started: float) -> None:
        self.seconds = seconds
        self.deadline = started + seconds if seconds > 0 else None
        self.spent_before: str | None = None
        """Why the search stopped early (the candidate it left to the gate), once it did."""

    def left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline


@dataclass(frozen=True)
class _Search:
    """One attempt's search for a candidate that passes the gate, after the first one: what
    every further candidate is trained on (``inputs``, from ``champion``), judged on (``sets``
    against ``reference``, by ``gate``) and timed with. Each candidate tried replaces (retires)
    the one before."""

    ctx: StageContext
    inputs: train.TrainInputs
    champion: ResolvedVersion | None
    sets: dict[str, list[evaluate.EvalItem]]
    reference: dict[str, Any]
    gate: NamespaceSettings
    clock: _Clock
    budget: _Budget

    async def may_go_on(self, current: train.Candidate) -> bool:
        """Whether a further candidate may start within the search budget; when not, says so
        once (an event, and a reason should the gate reject ``current``)."""
        if self.budget.left():
            return True
        if self.budget.spent_before is None:
            self.budget.spent_before = (
                f"the search budget of {self.budget.seconds:g} s "
                f"(SELFADAPT_PIPELINE__SEARCH_BUDGET_S) was spent before any candidate "
                f"after {current.name}"
            )
            await self.ctx.event(
                "log", f"{self.budget.spent_before}; the gate judges {current.name}"
            )
        return False

    async def run(self, first: Scored) -> Scored:
        """The candidate the gate judges: ``first``, or what replaced it."""
        current = first
        if self.champion is None or not self.ctx.settings.pipeline.merge:
            current = await self.train_further(current)
        if self.champion is None:
            tried = await self.redraw(current)
        else:
            tried = await self.beyond_first(current, self.champion)
        current = tried[-1]
        tries = self.ctx.settings.pipeline.temper_tries
        source = _temper_source(self.gate, tried) if tries else None
        if source is not None and await self.may_go_on(current[0]):
            self.clock.start("temper")
            what, why = source
            await self.ctx.event(
                "log", f"{what.name} learned but forgot too much ({why}); tempering"
            )
            current = await self.temper(what, current, tries)
        return current

    async def train_further(self, current: Scored) -> Scored:
        """``current`` (a merged one: its part) trained `extend_steps` more (once per
        candidate), evaluated, replacing it, when it did not learn its documents; else
        ``current`` as it is. The gate then judges the result on the same held-out probes
        (neither run trained on them): a job gets two tries at its gain, as tempering gets
        several scales."""
        candidate, scores = current
        more = self.ctx.settings.pipeline.extend_steps
        verdict = promote.decide(scores, self.gate)
        if not more or verdict.learned or not promote.has_probes(scores):
            return current
        if not await self.may_go_on(candidate):
            return current
        mode: train.Mode = "incremental" if self.champion is not None else "fresh"
        self.clock.start("extend")
        await self.ctx.event(
            "log",
            f"{candidate.name} did not learn ({verdict.reasons[0]}); training "
            + ("its part " if candidate.merged else "")
            + f"{more} more steps",
        )
        trained = train.extend_stage(
            self.ctx, self.inputs, candidate, mode=mode, parent=self.champion, steps=more
        )
        return await self.replace(candidate, trained, why="trained further")

    async def redraw(self, first: Scored) -> list[Scored]:
        """The candidates trained from the base tried, in order: ``first`` (a first version,
        or a merged candidate: the champion plus this job's part trained from the base), then
        while the last one learned its documents but forgot too much (a first version: broke
        the guard; a merged one: retention or guard), up to `redraw_tries` more of the same
        kind on the same sequences with other seeds (with `merge_replay` "redraw", a merged
        part drawn again after retention broke also replays the earlier documents). What a run
        forgets varies between draws (`bench/forgetting.py`, `bench/retention.py`), and a
        tempered copy scales the document away with the drift."""
        tried = [first]
        for draw in range(1, self.ctx.settings.pipeline.redraw_tries + 1):
            candidate, scores = tried[-1]
            why = promote.forgot_only(scores, self.gate)
            if why is None or not await self.may_go_on(candidate):
                break
            self.clock.start("redraw")
            trained: Coroutine[Any, Any, train.Candidate]
            if candidate.merged and self.champion is not None:
                broke = promote.retention_broken(scores, self.gate) is not None
                replay = train.merge_replays(self.ctx, after_retention_broke=broke)
                what = "another draw of its part"
                trained = train.merge_stage(
                    self.ctx,
                    self.inputs,
                    champion=self.champion,
                    draw=draw,
                    after_retention_broke=broke,
                )
            else:
                what, replay = "another draw", False
                trained = train.train_stage(
                    self.ctx, self.inputs, parent=None, mode="fresh", draw=draw
                )
            await self.ctx.event(
                "log",
                f"{candidate.name} learned but forgot too much ({why}); "
                f"training {what} from the base"
                + (" with the earlier documents replayed" if replay else ""),
            )
            tried.append(await self.replace(candidate, trained, why=f"draw {draw + 1}"))
        return tried

    async def merged_tries(self, merged: Scored) -> list[Scored]:
        """A merged candidate and those tried after it on the same path: its part drawn again
        while it learned but forgot (`redraw`), then, when the last one learned nothing, its
        part trained further (`train_further`: the second try a first version gets; the part
        is a training from the base like a first version's). Live, first versions that learned
        nothing firmly were promoted after 50 more steps (README, "training further")."""
        tried = await self.redraw(merged)
        further = await self.train_further(tried[-1])
        if further is not tried[-1]:
            tried.append(further)
        return tried

    async def beyond_first(self, first: Scored, champion: ResolvedVersion) -> list[Scored]:
        """The candidates tried for a namespace with a champion, in order, starting with the
        first one (merged or incremental, `_first_candidate`; a merged one that learned but
        forgot too much is drawn again first, `redraw`): when it broke retention or learned
        nothing (a merged one: or broke the guard), the other of the two
        (`bench/retention.py`: the merged one learned the new document far better and kept
        the earlier answers; training on from the champion adds no rank; that incremental
        one, when it kept the earlier documents but learned nothing, is trained further as a
        first version is), then a consolidated one when the last one still broke retention."""
        ctx, gate = self.ctx, self.gate
        tried = await self.merged_tries(first) if first[0].merged else [first]
        candidate, scores = tried[-1]
        verdict = promote.decide(scores, gate)
        short = promote.retention_broken(scores, gate)
        if short is None and not verdict.learned and promote.has_probes(scores):
            short = f"{candidate.name} did not learn ({verdict.reasons[0]})"
        if short is None and candidate.merged:
            # The sum carries the champion's drift from the base plus the new part's; training
            # on from the champion is pulled back to the base's answers on the anchors.
            short = promote.guard_broken(scores, gate)
        if short is not None and not await self.may_go_on(candidate):
            return tried
        if short is not None and candidate.merged:
            self.clock.start("incremental")
            await ctx.event("log", f"{short}; training on from {champion.name} instead")
            trained = train.train_stage(ctx, self.inputs, parent=champion, mode="incremental")
            candidate, scores = await self.replace(
                candidate, trained, why="trained on from the champion"
            )
            if not promote.retention_broken(scores, gate):
                # When it learned nothing either, it gets the second try a first version gets.
                candidate, scores = await self.train_further((candidate, scores))
            tried.append((candidate, scores))
        elif short is not None and ctx.settings.pipeline.merge:
            self.clock.start("merge")
            await ctx.event(
                "log",
                f"{short}; adding this job's documents, trained from the base, to {champion.name}",
            )
            await ctx.progress("train", 0.0)
            try:
                merged = await train.merge_stage(ctx, self.inputs, champion=champion)
            except ValueError as e:  # e.g. a champion an admin imported with per-module ranks
                await ctx.event("log", f"cannot add to {champion.name}: {e}")
            else:
                scored = await self.replace(candidate, merged, why="merged")
                tried.extend(await self.merged_tries(scored))
                candidate, scores = tried[-1]
        broken = promote.retention_broken(scores, gate)
        if ctx.settings.pipeline.consolidate and broken and await self.may_go_on(candidate):
            self.clock.start("consolidate")
            await ctx.event("log", f"retention budget broken ({broken}); consolidating")
            # Retrained from the base on every learned document + this job's.
            trained = train.train_stage(ctx, self.inputs, parent=champion, mode="consolidate")
            tried.append(await self.replace(candidate, trained, why="consolidated"))
        return tried

    async def temper(self, source: train.Candidate, current: Scored, tries: int) -> Scored:
        """Bisects the scale of ``source``'s update in (0, 1) for the largest that passes the
        gate (x1 learned but forgot too much; the smaller the scale, the less of both is
        kept): a copy that still forgot too much moves the upper end down; one that did not
        (it passed, or kept too little) moves the lower end up. What counts as forgetting
        depends on the direction (`temper.too_large`): towards the base, a copy that lost the
        earlier documents kept too little, not too much. ``tries`` copies at most; stops early
        at a copy that kept too much and too little at once (no scale mends that). Returns the
        largest copy that passed, else the last one tried, with its scores (``current`` when
        none could be made); every other copy is rejected."""
        ctx, gate = self.ctx, self.gate
        candidate, scores = current
        passed = False
        search = temper.Bisection()
        for _ in range(tries):
            if not await self.may_go_on(candidate):
                break
            scale = search.next_scale()
            await ctx.progress("evaluate", 0.0)
            try:
                tempered = await temper.temper_stage(ctx, source, scale, parent=self.champion)
            except ValueError as e:  # e.g. a champion of another rank (an admin's import)
                await ctx.event("log", f"cannot temper {source.name}: {e}")
                break
            tried = await self.evaluate(tempered)
            verdict = promote.decide(tried, gate)
            if verdict.passed or not passed:
                why = f"superseded by {tempered.name} (tempered)"
                await promote.retire(ctx, candidate, reason=why)
                candidate, scores, passed = tempered, tried, verdict.passed
            else:
                why = f"{candidate.name} passed with less change"
                await promote.retire(ctx, tempered, reason=why)
            small = temper.too_small(tried, gate, candidate=source, learned=verdict.learned)
            if temper.too_large(tried, gate, candidate=source):
                if small and not passed:
                    break  # kept too much and too little at once: no scale mends that
                search.too_large(scale)
            else:
                search.too_small(scale)  # passed, or kept too little of what was learned
        return candidate, scores

    async def replace(
        self,
        superseded: train.Candidate,
        trained: Coroutine[Any, Any, train.Candidate] | train.Candidate,
        *,
        why: str,
    ) -> Scored:
        """Trains a new candidate (``trained``, unless it is one already), evaluates it,
        retires the one it replaces."""
        if isinstance(trained, train.Candidate):
            candidate = trained
        else:
            await self.ctx.progress("train", 0.0)
            candidate = await trained
        await self.ctx.progress("evaluate", 0.0)
        scores = await self.evaluate(candidate)
        await promote.retire(self.ctx, superseded, reason=f"superseded by {candidate.name} ({why})")
        return candidate, scores

    async def evaluate(self, candidate: train.Candidate) -> dict[str, Any]:
        """``candidate``'s scores on this job's evaluation sets, next to the reference's."""
        return await evaluate.evaluate_stage(
            self.ctx, self.sets, candidate=candidate, reference=self.reference
        )


def _temper_source(
    gate: NamespaceSettings, tried: list[Scored]
) -> tuple[train.Candidate, str] | None:
    """Which candidate to temper, and why (``promote.forgot_only``), or None (the last one
    tried passed the gate, or none only forgot). Of the candidates that learned but forgot too
    much, those that add to the champion (merged, incremental: scaled towards the champion,
    they get back what it knew) and those trained from the base (fresh draws, consolidated)
    that kept the earlier documents (scaled towards the base, one that lost them would only
    lose more), the one that learned most (answered, then F1; the latest on a tie): a scaled
    copy keeps part of what was learned, so the most learned leaves the most room. Else the
    last one tried, when it only forgot."""
    last, last_scores = tried[-1]
    if promote.decide(last_scores, gate).passed:
        return None
    eligible = []
    for index, (candidate, scores) in enumerate(tried):
        why = promote.forgot_only(scores, gate)
        if why is None:
            continue
        if temper.towards_champion(candidate) or not promote.retention_broken(scores, gate):
            eligible.append(((*promote.learned_amount(scores), index), candidate, why))
    if eligible:
        _, candidate, why = max(eligible, key=lambda e: e[0])
        return candidate, why
    why = promote.forgot_only(last_scores, gate)
    return (last, why) if why else None
