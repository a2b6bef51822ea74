"""Gate stage: promote a candidate that learned the new documents without forgetting, reject
it otherwise (with the numbers), or leave it for review when the namespace says so."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapters_store.models import AdapterStatus, NamespaceSettings
from workers.tasks.common import ACTOR

if TYPE_CHECKING:
    from adapters_store.registry import ResolvedVersion
    from workers.pipeline import StageContext
    from workers.tasks.train import Candidate

logger = logging.getLogger(__name__)

EPS = 1e-9
"""Scores are means over few questions: 1.0 - 0.95 must not count as more than 0.05."""


@dataclass
class GateResult:
    decision: str  # promoted | rejected | pending_review
    reasons: list[str] = field(default_factory=list)
    passed: bool = False
    learned: bool = False
    """The new-knowledge check alone passed."""


async def gate_settings(ctx: StageContext) -> NamespaceSettings:
    namespace = await ctx.registry.get_namespace(ctx.namespace)
    return namespace.gate


def _value(row: dict[str, Any] | None, name: str, metric: str) -> tuple[float, int]:
    scores = (row or {}).get(name) or {}
    return float(scores.get(metric, 0.0)), int(scores.get("n", 0))


def _answered(row: dict[str, Any] | None) -> int:
    """How many of the new probes ``row`` answered: firmly when it was measured so (see
    ``evaluate.FirmRule``), else its greedy answer contains the gold answer."""
    scores = (row or {}).get("new") or {}
    if "answered" in scores:
        return int(scores["answered"])
    share, n = _value(row, "new", "contains")
    return round(share * n)


def _over_budget(before: float, after: float, limit: float) -> bool:
    """More than ``limit`` lost between two scores."""
    return before - after > limit + EPS


def _guard(scores: dict[str, Any]) -> tuple[str, float, float, int]:
    """Guard metric, the base's and the candidate's score, and the number of questions."""
    metric = scores["metrics"]["guard"]
    before, n = _value(scores["base"], "guard", metric)
    after, _ = _value(scores["candidate"], "guard", metric)
    return metric, before, after, n


def _retention(scores: dict[str, Any]) -> list[tuple[str, float, float, int]]:
    """The retention scores the gate holds to ``max_forgetting``, each as (metric, the
    champion's, the candidate's, the number of earlier probes); none without a champion. The
    gate metric (F1), and the share of earlier probes answered (the greedy answer contains
    the gold one): a champion's right answer in a long sentence scores an F1 of a few
    hundredths, so losing it can fall within an F1 budget (seen live: 0.036 -> 0.000, one of
    4 answers gone)."""
    champion, candidate = scores.get("champion"), scores["candidate"]
    if champion is None:
        return []
    rows = []
    for metric in dict.fromkeys((scores["metrics"]["gate"], "contains")):
        before, n = _value(champion, "retention", metric)
        after, _ = _value(candidate, "retention", metric)
        rows.append((metric, before, after, n))
    return rows


def retention_broken(scores: dict[str, Any], gate: NamespaceSettings) -> str | None:
    """Why the candidate forgot too much of what the champion knew, or None."""
    for metric, before, after, n in _retention(scores):
        if n and _over_budget(before, after, gate.max_forgetting):
            counts = ""
            if metric == "contains":
                counts = f" ({round(before * n)} -> {round(after * n)} answered)"
            return (
                f"retention {metric} fell from {before:.3f} to {after:.3f} "
                f"(> max_forgetting {gate.max_forgetting}) on {n} earlier probes{counts}"
            )
    return None


def _guard_limits(
    scores: dict[str, Any], gate: NamespaceSettings
) -> list[tuple[str, float, float, str]]:
    """What the candidate's guard score is held to: (against whom, their score, the drop
    allowed, the setting's name). Each version may lose at most ``max_forgetting`` against
    the one it replaces (the champion, or the base for a first version), and all of a
    namespace's versions together at most ``max_guard_drift`` against the base model."""
    metric, base, _, _ = _guard(scores)
    champion = scores.get("champion")
    limits = []
    if champion is not None and (champion.get("guard") or {}).get("n"):
        before, _ = _value(champion, "guard", metric)
        limits.append((str(champion.get("model", "champion")), before, gate.max_forgetting,
                       "max_forgetting"))  # fmt: skip
        limits.append(("base", base, gate.max_guard_drift, "max_guard_drift"))
    else:
        limits.append(("base", base, gate.max_forgetting, "max_forgetting"))
        if gate.max_guard_drift < gate.max_forgetting:
            limits.append(("base", base, gate.max_guard_drift, "max_guard_drift"))
    return limits


def guard_broken(scores: dict[str, Any], gate: NamespaceSettings) -> str | None:
    """Why the candidate lost too much of the guard set (against its champion, or in all
    against the base: `_guard_limits`), or None."""
    metric, _, after, n = _guard(scores)
    for name, before, limit, setting in _guard_limits(scores, gate):
        if _over_budget(before, after, limit):
            return (
                f"guard {metric} fell from {before:.3f} ({name}) to {after:.3f} "
                f"(> {setting} {limit}) on {n} questions"
            )
    return None


def has_probes(scores: dict[str, Any]) -> bool:
    """Whether the new documents had probes to measure learning on."""
    return _value(scores["candidate"], "new", scores["metrics"]["gate"])[1] > 0


def learned_amount(scores: dict[str, Any]) -> tuple[int, float]:
    """How much of the new documents the candidate learned: probes answered, then the gate
    metric on them (to rank candidates that each learned)."""
    candidate = scores["candidate"]
    return _answered(candidate), _value(candidate, "new", scores["metrics"]["gate"])[0]


def forgot(scores: dict[str, Any], gate: NamespaceSettings) -> str | None:
    """Why the candidate broke the forgetting budget (retention or guard), or None."""
    return retention_broken(scores, gate) or guard_broken(scores, gate)


def forgot_only(scores: dict[str, Any], gate: NamespaceSettings) -> str | None:
    """Why the candidate fails, when forgetting (retention or guard) is the only reason: it
    learned the new documents (so a smaller step may keep enough of that and pass)."""
    if not decide(scores, gate).learned:
        return None
    return forgot(scores, gate)


def decide(scores: dict[str, Any], gate: NamespaceSettings) -> GateResult:
    """The gate, as a pure function of the scores and the namespace's thresholds.

    New knowledge: the candidate's score on the new probes must beat the champion's (the
    base's for a first version) by more than 0 and by at least ``min_gain``, and it must
    answer (contain the gold answer of) at least ``metrics.min_answered`` more of them: F1
    also rewards a wrong answer that shares a word with the gold one. Answered means firmly
    where the evaluation measured it so (``evaluate.FirmRule``): a greedy answer won by a
    thin margin flips with the engine's batch composition. Retention: at
    most ``max_forgetting`` lost on earlier probes relative to the champion, in F1 and in the
    share answered. Guard: at most ``max_forgetting`` lost relative to the champion (the base,
    for a first version), and at most ``max_guard_drift`` relative to the base model (so
    drift adds up over versions only that far).
    """
    metric = scores["metrics"]["gate"]
    candidate, base = scores["candidate"], scores["base"]
    reference = scores.get("champion") or base
    ref_name = reference.get("model", "base")
    reasons: list[str] = []
    ok = True
    new_after, n_new = _value(candidate, "new", metric)
    new_before, _ = _value(reference, "new", metric)
    gain = new_after - new_before
    need = int(scores["metrics"].get("min_answered", 0))
    answered, answered_before = _answered(candidate), _answered(reference)
    counts = f"{answered}/{n_new} probes answered vs {answered_before}/{n_new}"
    if firm := (candidate.get("new") or {}).get("firm"):
        counts += f" ({firm})"
    if n_new == 0:
        ok = False
        reasons.append("no probes: new knowledge cannot be measured")
    elif gain <= EPS or gain < gate.min_gain - EPS:
        ok = False
        reasons.append(
            f"new-knowledge {metric} {new_after:.3f} vs {new_before:.3f} ({ref_name}): "
            f"gain {gain:+.3f} below min_gain {gate.min_gain} (must be > 0)"
        )
    elif answered - answered_before < need:
        ok = False
        reasons.append(
            f"new-knowledge {metric} {new_after:.3f} vs {new_before:.3f} ({ref_name}): "
            f"gain {gain:+.3f} >= min_gain {gate.min_gain}, but {counts}: fewer than "
            f"min_answered {need} more (an answer must contain the gold answer)"
        )
    else:
        reasons.append(
            f"new-knowledge {metric} {new_after:.3f} vs {new_before:.3f} ({ref_name}): "
            f"gain {gain:+.3f} >= min_gain {gate.min_gain}; {counts}"
        )
    learned = ok
    broken = retention_broken(scores, gate)
    if broken:
        ok = False
        reasons.append(broken)
    elif retention := _retention(scores):
        kept = ", ".join(f"{m} {after:.3f} vs {before:.3f}" for m, before, after, _ in retention)
        reasons.append(f"retention {kept} on {retention[0][3]} earlier probes")
    guard_metric, _, guard_after, n_guard = _guard(scores)
    drops = []
    for name, before, limit, setting in _guard_limits(scores, gate):
        too_much = _over_budget(before, guard_after, limit)
        ok = ok and not too_much
        verdict = ">" if too_much else "<="
        drops.append(
            f"vs {name} {before:.3f}: drop {before - guard_after:+.3f} {verdict} {setting} {limit}"
        )
    reasons.append(
        f"guard {guard_metric} {guard_after:.3f} on {n_guard} questions, {'; '.join(drops)}"
    )
    if not ok:
        return GateResult("rejected", reasons, passed=False, learned=learned)
    if not gate.auto_promote:
        reasons.append("auto_promote is off: waiting for an admin")
        return GateResult("pending_review", reasons, passed=True, learned=True)
    return GateResult("promoted", reasons, passed=True, learned=True)


async def gate_stage(
    ctx: StageContext,
    candidate: Candidate,
    scores: dict[str, Any],
    *,
    champion: ResolvedVersion | None,
) -> GateResult:
    """Applies the gate and acts on it inside the fence (promote / mark rejected)."""
    result = decide(scores, await gate_settings(ctx))
    summary = "; ".join(result.reasons)
    async with ctx.fenced():
        if result.decision == "promoted":
            await ctx.registry.promote(
                ctx.namespace, candidate.version, ACTOR, reason=f"job {ctx.job_id}: {summary}"
            )
        elif result.decision == "rejected":
            await ctx.registry.set_status(candidate.version_id, AdapterStatus.rejected, ACTOR)
    logger.info("job %s: %s %s (%s)", ctx.job_id, result.decision, candidate.name, summary)
    await ctx.event(
        "metric",
        f"gate: {result.decision} {candidate.name}",
        decision=result.decision,
        reasons=result.reasons,
        champion=champion.name if champion is not None else None,
    )
    return result


async def retire(ctx: StageContext, candidate: Candidate, *, reason: str) -> None:
    """Marks a candidate of this job that will not be gated (e.g. replaced by consolidation)."""
    async with ctx.fenced():
        await ctx.registry.set_status(candidate.version_id, AdapterStatus.rejected, ACTOR)
    await ctx.event("log", f"{candidate.name} rejected: {reason}", version_id=candidate.version_id)
