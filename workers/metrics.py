"""QA scoring with SQuAD v1.1 normalisation: token F1, exact match and answer containment."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """SQuAD token F1 between one prediction and one gold answer."""
    pred, ref = _tokens(prediction), _tokens(gold)
    if not pred or not ref:
        # SQuAD v2 convention: two empty answers agree, one empty answer scores 0.
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred)
    recall = overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold tokens occur as a contiguous run in the prediction.

    Token-level rather than substring matching so that "10" is not found in "100".
    """
    pred, ref = _tokens(prediction), _tokens(gold)
    if not ref:
        return 0.0
    width = len(ref)
    return float(any(pred[i : i + width] == ref for i in range(len(pred) - width + 1)))


def answer_in_text(answer: str, text: str) -> bool:
    """Whether ``answer`` appears in ``text`` after normalisation (probe grounding check)."""
    return contains(text, answer) == 1.0


@dataclass(frozen=True)
class QAScore:
    """Mean scores over a set of questions (each 0..1); ``n`` = number of questions."""

    f1: float
    em: float
    contains: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"f1": self.f1, "em": self.em, "contains": self.contains, "n": self.n}

    @classmethod
    def from_dict(cls, data: dict[str, float | int]) -> QAScore:
        return cls(
            f1=float(data["f1"]),
            em=float(data["em"]),
            contains=float(data["contains"]),
            n=int(data["n"]),
        )


def best_of(prediction: str, golds: Sequence[str]) -> tuple[float, float, float]:
    """(F1, EM, contains) against the best-matching gold answer, as SQuAD does."""
    if not golds:
        return 0.0, 0.0, 0.0
    return (
        max(f1_score(prediction, g) for g in golds),
        max(exact_match(prediction, g) for g in golds),
        max(contains(prediction, g) for g in golds),
    )


def score_answers(pairs: Iterable[tuple[str, Sequence[str]]]) -> QAScore:
    """Mean F1/EM/contains over ``(prediction, gold answers)`` pairs; empty input scores 0."""
    rows = [best_of(prediction, golds) for prediction, golds in pairs]
    if not rows:
        return QAScore(0.0, 0.0, 0.0, 0)
    n = len(rows)
    return QAScore(
        f1=sum(r[0] for r in rows) / n,
        em=sum(r[1] for r in rows) / n,
        contains=sum(r[2] for r in rows) / n,
        n=n,
    )
