"""Learning-benchmark statistics: per-passage QA scores, bootstrap CIs over passages, the
result document (`bench/results/learning.json`) and its target checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from workers.metrics import best_of

CONDITIONS = ("base", "passage", "self_edit", "restem_1", "restem_2", "in_context")
"""Every condition the benchmark knows, in report order."""
Metric = Literal["f1", "em", "contains"]
METRICS: tuple[Metric, ...] = ("f1", "em", "contains")


@dataclass(frozen=True)
class PassageScore:
    """One passage's per-question scores (each 0..1) under one condition."""

    passage_id: str
    f1: tuple[float, ...]
    em: tuple[float, ...]
    contains: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.f1)

    def total(self, metric: Metric) -> float:
        values: tuple[float, ...] = getattr(self, metric)
        return sum(values)


def score_passage(
    passage_id: str, predictions: Sequence[str], golds: Sequence[Sequence[str]]
) -> PassageScore:
    """SQuAD F1 / EM / contains of each prediction against its best-matching gold answer."""
    rows = [best_of(p, g) for p, g in zip(predictions, golds, strict=True)]
    return PassageScore(
        passage_id,
        f1=tuple(r[0] for r in rows),
        em=tuple(r[1] for r in rows),
        contains=tuple(r[2] for r in rows),
    )


def pooled(scores: Sequence[PassageScore], metric: Metric) -> float:
    """Mean over all questions of the passages (SEAL's CPT pooling)."""
    n = sum(s.n for s in scores)
    return sum(s.total(metric) for s in scores) / n if n else 0.0


def bootstrap_ci(
    scores: Sequence[PassageScore],
    metric: Metric,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile CI of the pooled mean, resampling whole passages with replacement.

    Questions of one passage are not independent (one adapter answers them all), so the
    passage is the resampling unit.
    """
    import numpy as np

    if not scores:
        return (0.0, 0.0)
    totals = np.array([s.total(metric) for s in scores])
    counts = np.array([s.n for s in scores], dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(scores), size=(n_boot, len(scores)))
    n = counts[idx].sum(axis=1)
    stats = np.divide(totals[idx].sum(axis=1), n, out=np.zeros(n_boot), where=n > 0)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return (float(lo), float(hi))


class TrainStats(BaseModel):
    """Inner-loop cost of one trained condition, averaged over its passages."""

    sequences_mean: float
    steps_mean: float
    seconds_mean: float


class ConditionScore(BaseModel):
    """Pooled scores (0..1) over the condition's questions, with 95% passage-bootstrap CIs."""

    f1: float
    f1_ci: tuple[float, float]
    em: float
    em_ci: tuple[float, float]
    contains: float
    contains_ci: tuple[float, float]
    n_questions: int
    n_passages: int
    per_passage: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="passage id -> mean f1/em/contains"
    )
    train: TrainStats | None = None
    seconds: float | None = Field(None, description="wall time of the condition")


class LearningResult(BaseModel):
    """`bench/results/learning.json`."""

    model: str
    conditions: dict[str, ConditionScore]
    not_run: dict[str, str] = Field(
        default_factory=dict, description="condition -> why it has no score"
    )
    targets: dict[str, Any] = Field(default_factory=dict)
    n_passages: int
    data: str
    seconds: float = Field(description="wall time of this invocation (cached work costs ~0)")
    compute_seconds: float = Field(
        0.0, description="sum of the conditions' own times when they were computed"
    )
    settings: dict[str, Any]
    machine: dict[str, Any]
    restem: dict[str, Any] = Field(default_factory=dict, description="ReSTEM round summaries")
    note: str | None = Field(None, description="the operator's remark on this run (--note)")


def summarize(
    scores: Sequence[PassageScore],
    *,
    train: TrainStats | None = None,
    seconds: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> ConditionScore:
    """Pooled F1/EM/contains with bootstrap CIs (one seed for all metrics: same resamples)."""
    values = {m: pooled(scores, m) for m in METRICS}
    cis = {m: bootstrap_ci(scores, m, n_boot=n_boot, seed=seed) for m in METRICS}
    per_passage = {
        s.passage_id: {m: (s.total(m) / s.n if s.n else 0.0) for m in METRICS} for s in scores
    }
    return ConditionScore(
        f1=values["f1"],
        f1_ci=cis["f1"],
        em=values["em"],
        em_ci=cis["em"],
        contains=values["contains"],
        contains_ci=cis["contains"],
        n_questions=sum(s.n for s in scores),
        n_passages=len(scores),
        per_passage=per_passage,
        train=train,
        seconds=seconds,
    )


def _ci(score: ConditionScore, metric: Metric) -> tuple[float, float]:
    ci: tuple[float, float] = getattr(score, f"{metric}_ci")
    return ci


def clearly_above(a: ConditionScore, b: ConditionScore, metric: Metric) -> bool:
    """``a`` beats ``b`` with disjoint 95% CIs (a's lower bound above b's upper bound)."""
    return _ci(a, metric)[0] > _ci(b, metric)[1]


def relative_gain(a: float, b: float) -> float | None:
    """(a - b) / b, or None when b is 0."""
    return (a - b) / b if b > 0 else None


TRAINED = ("passage", "self_edit", "restem_1", "restem_2")
SEAL_RELATIVE_GAIN = 0.40
"""SEAL: 47.0 (after 2 ReSTEM rounds) over 33.5 (passage only), about +40%."""


def check_targets(conditions: Mapping[str, ConditionScore], metric: Metric) -> dict[str, Any]:
    """The issue's targets on ``metric``, each True/False, or None when a condition is missing.

    self_edit > passage > base and restem_2 > self_edit, each with disjoint CIs; the best
    trained condition's relative gain over `passage` is at least SEAL's +40%.
    """

    def above(a: str, b: str) -> bool | None:
        if a not in conditions or b not in conditions:
            return None
        return clearly_above(conditions[a], conditions[b], metric)

    out: dict[str, Any] = {
        "metric": metric,
        "passage_gt_base": above("passage", "base"),
        "self_edit_gt_passage": above("self_edit", "passage"),
        "restem_2_gt_self_edit": above("restem_2", "self_edit"),
    }
    trained = [c for c in TRAINED[1:] if c in conditions]
    if "passage" in conditions and trained:
        best = max(trained, key=lambda c: getattr(conditions[c], metric))
        gain = relative_gain(
            getattr(conditions[best], metric), getattr(conditions["passage"], metric)
        )
        out["best_over_passage"] = {"condition": best, "relative_gain": gain}
        out["gain_at_least_seal"] = gain is not None and gain >= SEAL_RELATIVE_GAIN
    else:
        out["best_over_passage"] = None
        out["gain_at_least_seal"] = None
    return out


def table(result: LearningResult) -> str:
    """Markdown table of the conditions (percent, CIs in brackets)."""
    lines = [
        "| condition | F1 % [95% CI] | EM % | contains % [95% CI] | questions | passages |",
        "|---|---|---|---|---|---|",
    ]
    for name in CONDITIONS:
        if (c := result.conditions.get(name)) is not None:
            lines.append(
                f"| {name} | {100 * c.f1:.1f} [{100 * c.f1_ci[0]:.1f}, {100 * c.f1_ci[1]:.1f}] "
                f"| {100 * c.em:.1f} | {100 * c.contains:.1f} "
                f"[{100 * c.contains_ci[0]:.1f}, {100 * c.contains_ci[1]:.1f}] "
                f"| {c.n_questions} | {c.n_passages} |"
            )
        elif name in result.not_run:
            lines.append(f"| {name} | not run: {result.not_run[name]} | | | | |")
    return "\n".join(lines)
