"""The ReSTEM outer loop over the Protocols of workers/restem/protocols.py.

One round (SEAL's ReST-EM, knowledge incorporation):

1. For each of N training documents, draw K formats from the format weights and sample one
   self-edit per format slot from the current policy; degenerate samples are not trained.
2. Each remaining self-edit trains a temporary adapter (``repeats`` times, seeds 0..r-1);
   its reward is the probe score gain over the starting adapter, averaged over repeats.
3. Per document, the best self-edit is kept when its reward exceeds ``min_reward``; format
   statistics take every reward, and the kept edits' formats count a win.
4. The policy adapter is fine-tuned on (self-edit prompt -> kept self-edit).
5. Gate: on held-out documents (never trained on in this run) the mean reward of self-edits
   sampled from the new policy must beat the current policy's by more than ``gate_min_gain``.
   Both policies see the same formats there (round-robin, not the learned weights), so the
   gate measures the policy adapter. A promoted policy is sampled from in the next round.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from app.settings import RestemSettings
from workers.metrics import QAScore
from workers.restem.protocols import (
    InnerLoop,
    NullReporter,
    PolicyExample,
    PolicyRef,
    PolicyTrainer,
    Reporter,
    SampleRequest,
    SamplingOptions,
    SelfEditSampler,
)
from workers.restem.selection import (
    FormatStats,
    ScoredEdit,
    best_per_document,
    mean_reward,
    reward_of,
)
from workers.tasks.common import Doc
from workers.tasks.synthesize import DEFAULT_PROMPTS, degenerate_reason, render_prompt

logger = logging.getLogger(__name__)

Decision = Literal["promoted", "rejected", "pending_review"]


@dataclass(frozen=True)
class RestemParts:
    """The loop's collaborators (see workers/restem/protocols.py)."""

    sampler: SelfEditSampler
    inner: InnerLoop
    trainer: PolicyTrainer
    reporter: Reporter = field(default_factory=NullReporter)


@dataclass(frozen=True)
class RunShape:
    """How much one run does: rounds, N documents per round, K samples per document."""

    rounds: int
    docs: int
    samples: int

    @classmethod
    def of(cls, settings: RestemSettings) -> RunShape:
        return cls(settings.rounds, settings.docs, settings.samples)


@dataclass(frozen=True)
class GateOutcome:
    """The policy gate: mean held-out reward before (current policy) and after (candidate)."""

    decision: Decision
    before: float | None
    after: float | None
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "before": self.before,
            "after": self.after,
            "reason": self.reason,
        }


@dataclass
class RoundResult:
    """What one round sampled, rewarded, kept, trained and decided."""

    round_index: int
    policy: PolicyRef
    documents: list[str]
    edits: list[ScoredEdit]
    winners: dict[str, ScoredEdit]
    baselines: dict[str, QAScore]
    candidate: PolicyRef = None
    gate: GateOutcome | None = None

    @property
    def promoted(self) -> bool:
        return self.gate is not None and self.gate.decision == "promoted"

    def as_json(self) -> dict[str, Any]:
        return {
            "round": self.round_index,
            "policy": self.policy,
            "documents": self.documents,
            "baselines": {d: s.as_dict() for d, s in self.baselines.items()},
            "edits": [e.as_json() for e in self.edits],
            "kept": {d: e.as_json() for d, e in self.winners.items()},
            "mean_reward": mean_reward(self.edits),
            "candidate": self.candidate,
            "gate": self.gate.as_json() if self.gate is not None else None,
        }


@dataclass
class RestemResult:
    """All rounds, the policy in force at the end, and the updated format statistics."""

    rounds: list[RoundResult]
    policy: PolicyRef
    format_stats: FormatStats
    heldout: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "rounds": [r.as_json() for r in self.rounds],
            "policy": self.policy,
            "format_stats": self.format_stats.as_json(),
            "heldout": self.heldout,
        }


def split_documents(
    docs: Sequence[Doc], *, heldout: int, seed: int | str, trained: Collection[str] = ()
) -> tuple[list[Doc], list[Doc]]:
    """(training pool, held-out documents): only documents with probes, in a seeded order.

    Documents in ``trained`` (an earlier policy was trained on them) are never held out. The
    order is by a hash of seed and document id, so the held-out set stays stable as documents
    arrive (once there are more than ``heldout``). At least one document stays in the pool.
    """
    usable = sorted(
        (d for d in docs if d.probes),
        key=lambda d: hashlib.sha256(f"{seed}:{d.id}".encode()).hexdigest(),
    )
    candidates = [d for d in usable if d.id not in trained]
    n_heldout = min(heldout, len(candidates), max(0, len(usable) - 1))
    held = candidates[:n_heldout]
    return [d for d in usable if d not in held], held


def round_documents(pool: Sequence[Doc], n: int, round_index: int) -> list[Doc]:
    """Round r's N documents: consecutive slices of the pool, wrapping around."""
    if not pool:
        return []
    n = min(n, len(pool))
    start = (round_index * n) % len(pool)
    return [pool[(start + i) % len(pool)] for i in range(n)]


def heldout_formats(formats: Sequence[str], k: int, index: int) -> list[str]:
    """Fixed formats for held-out document ``index``: round-robin, shifted per document."""
    return [formats[(index + j) % len(formats)] for j in range(k)]


class RestemLoop:
    """Runs ReSTEM rounds with the given parts and settings (engine-agnostic)."""

    def __init__(
        self, parts: RestemParts, settings: RestemSettings, *, stats: FormatStats | None = None
    ) -> None:
        self.parts = parts
        self.settings = settings
        self.stats = stats or FormatStats(list(settings.formats))
        self.prompts = {**DEFAULT_PROMPTS, **settings.prompts}
        missing = [f for f in settings.formats if f not in self.prompts]
        if missing:
            raise ValueError(f"no prompt for self-edit format(s) {missing}; set restem.prompts")
        self.options = SamplingOptions(settings.temperature, settings.top_p, settings.max_tokens)
        self._baselines: dict[str, QAScore] = {}
        self._done = 0
        self._total = 1

    # -- entry point ------------------------------------------------------------------------

    async def run(
        self,
        docs: Sequence[Doc],
        *,
        policy: PolicyRef,
        shape: RunShape | None = None,
        trained: Collection[str] = (),
    ) -> RestemResult:
        """All rounds over ``docs`` (only those with probes are used), starting at ``policy``;
        documents in ``trained`` (ids an earlier policy learned from) are never held out.

        Raises:
            ValueError: no document has probes.
        """
        shape = shape or RunShape.of(self.settings)
        pool, heldout = split_documents(
            docs, heldout=self.settings.heldout_docs, seed=self.settings.seed, trained=trained
        )
        if not pool:
            raise ValueError("ReSTEM needs documents with probes; none of them has any")
        per_round = min(shape.docs, len(pool))
        trials = self.settings.repeats * shape.samples
        self._total = max(1, trials * (shape.rounds * (per_round + len(heldout)) + len(heldout)))
        self._done = 0
        await self.parts.reporter.event(
            "log",
            f"ReSTEM: {shape.rounds} round(s) x {per_round} document(s) x {shape.samples} "
            f"self-edit(s), {len(heldout)} held-out document(s)",
            rounds=shape.rounds, docs=per_round, samples=shape.samples,
            repeats=self.settings.repeats, heldout=[d.id for d in heldout],
            pool=len(pool), policy=policy,
        )  # fmt: skip
        rounds: list[RoundResult] = []
        heldout_before: list[ScoredEdit] | None = None
        for r in range(shape.rounds):
            docs_r = round_documents(pool, shape.docs, r)
            result = await self.run_round(docs_r, policy=policy, round_index=r, k=shape.samples)
            if result.candidate is not None:
                if heldout_before is None and heldout:
                    heldout_before = await self.heldout_edits(policy, heldout, shape.samples)
                result.gate, after = await self.gate(
                    result.candidate, heldout, heldout_before, shape.samples
                )
                if result.promoted:
                    policy, heldout_before = result.candidate, after
            rounds.append(result)
            await self._report_round(result)
        await self.parts.reporter.progress("gate", 1.0)
        return RestemResult(rounds, policy, self.stats, [d.id for d in heldout])

    # -- one round --------------------------------------------------------------------------

    async def run_round(
        self, docs: Sequence[Doc], *, policy: PolicyRef, round_index: int, k: int
    ) -> RoundResult:
        """Sample, reward, select and train (the gate is separate: ``gate``)."""
        rng = random.Random(f"{self.settings.seed}:{round_index}")
        weights = self.stats.weights(
            exploration=self.settings.format_exploration,
            temperature=self.settings.format_temperature,
        )
        plans = {d.id: self._choose(k, rng) for d in docs}
        await self.parts.reporter.event(
            "metric",
            f"round {round_index}: format weights "
            + ", ".join(f"{f}={w:.2f}" for f, w in weights.items()),
            round=round_index, weights=weights, plans=plans,
        )  # fmt: skip
        await self.parts.reporter.progress("self_edit", self._fraction())
        edits = await self.sample(policy, docs, plans)
        edits += await self._resample_bare(policy, docs, edits, k, rng, round_index)
        scored = await self.score(docs, edits, label=f"round {round_index}")
        for edit in scored:
            self.stats.record(edit)
        winners = best_per_document(scored, min_reward=self.settings.min_reward)
        for edit in winners.values():
            self.stats.record_win(edit.format)
        result = RoundResult(
            round_index=round_index,
            policy=policy,
            documents=[d.id for d in docs],
            edits=scored,
            winners=winners,
            baselines={d.id: self._baselines[d.id] for d in docs},
        )
        examples = [
            PolicyExample(e.prompt, e.text, e.doc_id, e.format, e.reward or 0.0)
            for e in winners.values()
        ]
        await self.parts.reporter.event(
            "metric",
            f"round {round_index}: kept {len(examples)} of {len(docs)} document(s), mean reward "
            f"{_fmt(mean_reward(scored))}",
            round=round_index, kept=len(examples), documents=len(docs),
            mean_reward=mean_reward(scored), format_stats=self.stats.as_json(),
        )  # fmt: skip
        if examples:
            await self.parts.reporter.progress("train", self._fraction())
            result.candidate = await self.parts.trainer.train(
                examples, parent=policy, round_index=round_index
            )
            await self.parts.reporter.event(
                "log", f"round {round_index}: trained policy {result.candidate}",
                round=round_index, policy=result.candidate, examples=len(examples),
            )  # fmt: skip
        return result

    async def _resample_bare(
        self,
        policy: PolicyRef,
        docs: Sequence[Doc],
        edits: Sequence[ScoredEdit],
        k: int,
        rng: random.Random,
        round_index: int,
    ) -> list[ScoredEdit]:
        """Up to ``resamples`` more draws (formats drawn again) for the documents whose
        self-edits were all degenerate, so one unlucky draw does not cost a document its round.
        The degenerate samples stay in the round (they count against their format)."""
        extra: list[ScoredEdit] = []
        for _ in range(self.settings.resamples):
            usable = {e.doc_id for e in [*edits, *extra] if e.reason is None}
            bare = [d for d in docs if d.id not in usable]
            if not bare:
                break
            await self.parts.reporter.event(
                "log",
                f"round {round_index}: no usable self-edit for {len(bare)} document(s); "
                "sampling them again",
                round=round_index, documents=[d.id for d in bare],
            )  # fmt: skip
            self._total += self.settings.repeats * k * len(bare)
            extra += await self.sample(policy, bare, {d.id: self._choose(k, rng) for d in bare})
        return extra

    def _choose(self, k: int, rng: random.Random) -> list[str]:
        return self.stats.choose(
            k, rng,
            exploration=self.settings.format_exploration,
            temperature=self.settings.format_temperature,
        )  # fmt: skip

    async def sample(
        self, policy: PolicyRef, docs: Sequence[Doc], plans: dict[str, list[str]]
    ) -> list[ScoredEdit]:
        """One self-edit per planned format slot, all requests concurrent; degenerate samples
        carry their reason and are never trained."""
        requests = []
        for doc in docs:
            counts: dict[str, int] = {}
            for fmt in plans[doc.id]:
                counts[fmt] = counts.get(fmt, 0) + 1
            for fmt, n in counts.items():
                prompt = render_prompt(self.prompts[fmt], doc)
                requests.append(SampleRequest(doc, fmt, prompt, n))
        batches = await asyncio.gather(
            *(self.parts.sampler.sample(policy, req, self.options) for req in requests)
        )
        out = []
        for req, texts in zip(requests, batches, strict=True):
            for text in texts:
                reason = degenerate_reason(text, prompt=req.prompt, document=req.doc.text)
                out.append(ScoredEdit(req.doc.id, req.format, req.prompt, text, reason=reason))
        return out

    async def score(
        self, docs: Sequence[Doc], edits: Sequence[ScoredEdit], *, label: str
    ) -> list[ScoredEdit]:
        """Rewards for every non-degenerate edit: one inner-loop training per repeat."""
        by_id = {d.id: d for d in docs}
        await self._ensure_baselines([by_id[i] for i in dict.fromkeys(e.doc_id for e in edits)])
        scored = []
        for edit in edits:
            if edit.reason is not None:
                scored.append(edit)
                self._done += self.settings.repeats
                continue
            doc, rewards = by_id[edit.doc_id], []
            for repeat in range(self.settings.repeats):
                await self.parts.reporter.progress("train", self._fraction())
                trial = await self.parts.inner.trial(doc, edit.text, repeat=repeat)
                base = self._baselines[doc.id]
                rewards.append(reward_of(trial.score, base, self.settings.reward_metric))
                self._done += 1
            done = ScoredEdit(edit.doc_id, edit.format, edit.prompt, edit.text, tuple(rewards))
            scored.append(done)
            await self.parts.reporter.event(
                "metric",
                f"{label}: {edit.format} self-edit of {doc.id}: reward {_fmt(done.reward)}",
                document_id=doc.id, format=edit.format, reward=done.reward,
                rewards=list(rewards), baseline=getattr(base, self.settings.reward_metric),
            )  # fmt: skip
        return scored

    async def _ensure_baselines(self, docs: Sequence[Doc]) -> None:
        todo = [d for d in docs if d.id not in self._baselines]
        scores = await asyncio.gather(*(self.parts.inner.baseline(d) for d in todo))
        for doc, score in zip(todo, scores, strict=True):
            self._baselines[doc.id] = score

    # -- gate -------------------------------------------------------------------------------

    async def heldout_edits(
        self, policy: PolicyRef, heldout: Sequence[Doc], k: int
    ) -> list[ScoredEdit]:
        """Self-edits of ``policy`` on the held-out documents (fixed formats), rewarded."""
        plans = {d.id: heldout_formats(self.settings.formats, k, i) for i, d in enumerate(heldout)}
        await self.parts.reporter.progress("gate", self._fraction())
        edits = await self.sample(policy, heldout, plans)
        return await self.score(heldout, edits, label=f"held-out ({policy or 'base'})")

    async def gate(
        self,
        candidate: PolicyRef,
        heldout: Sequence[Doc],
        before: Sequence[ScoredEdit] | None,
        k: int,
    ) -> tuple[GateOutcome, list[ScoredEdit]]:
        """Promote ``candidate`` only if its held-out mean reward beats the current one's."""
        if not heldout or before is None:
            reason = "no held-out documents with probes: the policy's gain cannot be measured"
            return GateOutcome("pending_review", None, None, reason), []
        after_edits = await self.heldout_edits(candidate, heldout, k)
        # Both lists are non-empty (k >= 1, held-out documents exist), so no None here.
        prior, after = mean_reward(before) or 0.0, mean_reward(after_edits) or 0.0
        gain = after - prior
        passed = gain > self.settings.gate_min_gain
        reason = (
            f"held-out mean reward {after:.4f} vs {prior:.4f} with the current policy: gain "
            f"{gain:+.4f} {'>' if passed else '<='} gate_min_gain {self.settings.gate_min_gain}"
        )
        return GateOutcome("promoted" if passed else "rejected", prior, after, reason), after_edits

    # -- reporting --------------------------------------------------------------------------

    def _fraction(self) -> float:
        return min(1.0, self._done / self._total)

    async def _report_round(self, result: RoundResult) -> None:
        gate = result.gate
        message = f"round {result.round_index}: " + (
            f"policy {result.candidate} {gate.decision} ({gate.reason})"
            if gate is not None
            else "no self-edit beat the baseline; policy unchanged"
        )
        await self.parts.reporter.event(
            "metric", message, round=result.round_index,
            gate=gate.as_json() if gate is not None else None, candidate=result.candidate,
        )  # fmt: skip


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"
