"""ReSTEM's pure logic: rewards, the best self-edit per document, and format weighting.

Format rule (documented in the README): every format keeps the sum and count of the rewards
of its samples (a degenerate sample, which is never trained, counts as reward 0). Its score
is the shrunk mean ``total / (count + PRIOR_COUNT)``, so a format with few samples sits near
0 rather than at one lucky draw. Sampling weights are a softmax of those scores at
``temperature``, mixed with a uniform share ``exploration`` so that no format ever drops to
zero and a format that was unlucky early can come back:

    weight(f) = exploration / |F| + (1 - exploration) * softmax(score / temperature)(f)

Each document's K formats are drawn from these weights (with replacement, seeded).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.metrics import QAScore

PRIOR_COUNT = 1.0
"""Pseudo-samples of reward 0 behind every format's mean."""


def reward_of(score: QAScore, baseline: QAScore, metric: str) -> float:
    """The gain of a trained adapter over the starting adapter on the same probes."""
    return float(getattr(score, metric)) - float(getattr(baseline, metric))


@dataclass(frozen=True)
class ScoredEdit:
    """A sampled self-edit with its rewards (one per repeat; none when it was filtered)."""

    doc_id: str
    format: str
    prompt: str
    text: str
    rewards: tuple[float, ...] = ()
    reason: str | None = None
    """Why it was not trained (degenerate sample), else None."""

    @property
    def trained(self) -> bool:
        return bool(self.rewards)

    @property
    def reward(self) -> float | None:
        """Mean reward over the repeats (None when not trained)."""
        return sum(self.rewards) / len(self.rewards) if self.rewards else None

    def as_json(self) -> dict[str, Any]:
        return {
            "doc_id": self.doc_id,
            "format": self.format,
            "reward": self.reward,
            "rewards": list(self.rewards),
            "reason": self.reason,
            "chars": len(self.text),
        }


def best_per_document(
    edits: Iterable[ScoredEdit], *, min_reward: float = 0.0
) -> dict[str, ScoredEdit]:
    """doc id -> its best trained self-edit, only where that reward exceeds ``min_reward``.

    Ties go to the edit sampled first (stable). SEAL keeps the top-1 of K even when it did
    not beat the baseline; we keep it only when it did, as the issue asks.
    """
    best: dict[str, ScoredEdit] = {}
    for edit in edits:
        reward = edit.reward
        if reward is None:
            continue
        current = best.get(edit.doc_id)
        if current is None or reward > (current.reward or 0.0):
            best[edit.doc_id] = edit
    return {d: e for d, e in best.items() if (e.reward or 0.0) > min_reward}


def mean_reward(edits: Iterable[ScoredEdit]) -> float | None:
    """Mean over trained edits, degenerate ones counted as 0 (None when there are none)."""
    values = [e.reward if e.reward is not None else 0.0 for e in edits]
    return sum(values) / len(values) if values else None


@dataclass
class FormatStat:
    """Running reward totals of one self-edit format."""

    count: int = 0
    total: float = 0.0
    wins: int = 0
    degenerate: int = 0

    @property
    def score(self) -> float:
        """Mean reward shrunk towards 0 by PRIOR_COUNT pseudo-samples."""
        return self.total / (self.count + PRIOR_COUNT)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


@dataclass
class FormatStats:
    """Reward per format and the sampling weights derived from it (see the module doc)."""

    formats: list[str]
    stats: dict[str, FormatStat] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.formats:
            raise ValueError("at least one self-edit format is needed")
        for fmt in self.formats:
            self.stats.setdefault(fmt, FormatStat())

    def record(self, edit: ScoredEdit) -> None:
        """Adds one scored sample (a filtered one counts as reward 0)."""
        stat = self.stats.setdefault(edit.format, FormatStat())
        stat.count += 1
        stat.total += edit.reward if edit.reward is not None else 0.0
        if not edit.trained:
            stat.degenerate += 1

    def record_win(self, fmt: str) -> None:
        self.stats.setdefault(fmt, FormatStat()).wins += 1

    def weights(self, *, exploration: float, temperature: float) -> dict[str, float]:
        """Sampling probability of each configured format (they sum to 1)."""
        scores = [self.stats[f].score / temperature for f in self.formats]
        top = max(scores)
        exps = [math.exp(s - top) for s in scores]
        total = sum(exps)
        uniform = 1.0 / len(self.formats)
        return {
            f: exploration * uniform + (1.0 - exploration) * e / total
            for f, e in zip(self.formats, exps, strict=True)
        }

    def choose(
        self, k: int, rng: random.Random, *, exploration: float, temperature: float
    ) -> list[str]:
        """``k`` formats drawn (with replacement) from the current weights."""
        weights = self.weights(exploration=exploration, temperature=temperature)
        return rng.choices(self.formats, weights=[weights[f] for f in self.formats], k=k)

    def as_json(self) -> dict[str, dict[str, Any]]:
        return {
            fmt: {
                "count": s.count,
                "total": round(s.total, 6),
                "mean": None if s.mean is None else round(s.mean, 6),
                "wins": s.wins,
                "degenerate": s.degenerate,
            }
            for fmt, s in self.stats.items()
        }

    @classmethod
    def from_json(
        cls, formats: Sequence[str], data: Mapping[str, Mapping[str, Any]] | None
    ) -> FormatStats:
        """Stats saved by ``as_json`` (e.g. by an earlier job), for ``formats``."""
        stats = {
            fmt: FormatStat(
                count=int(row.get("count", 0)),
                total=float(row.get("total", 0.0)),
                wins=int(row.get("wins", 0)),
                degenerate=int(row.get("degenerate", 0)),
            )
            for fmt, row in (data or {}).items()
        }
        return cls(list(formats), stats)
