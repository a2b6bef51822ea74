"""ReSTEM's pure logic: rewards, the best self-edit per document, and format weighting."""

from __future__ import annotations

import random

import pytest

from workers.metrics import QAScore
from workers.restem.selection import (
    FormatStats,
    ScoredEdit,
    best_per_document,
    mean_reward,
    reward_of,
)

FORMATS = ["implications", "implications_long", "rewrite", "self_qa"]


def _edit(doc: str, fmt: str, *rewards: float, reason: str | None = None) -> ScoredEdit:
    return ScoredEdit(doc, fmt, f"prompt {fmt}", f"{doc} {fmt} {rewards}", rewards, reason)


def test_reward_of_is_the_gain_in_the_chosen_metric() -> None:
    before, after = QAScore(0.25, 0.0, 0.25, 4), QAScore(0.5, 0.25, 0.75, 4)
    assert reward_of(after, before, "f1") == pytest.approx(0.25)
    assert reward_of(after, before, "contains") == pytest.approx(0.5)
    assert reward_of(before, after, "em") == pytest.approx(-0.25)


def test_scored_edit_reward_averages_repeats() -> None:
    assert _edit("d", "rewrite", 0.1, 0.3).reward == pytest.approx(0.2)
    assert _edit("d", "rewrite", reason="empty").reward is None


def test_best_per_document_keeps_only_positive_winners() -> None:
    edits = [
        _edit("a", "implications", 0.1),
        _edit("a", "rewrite", 0.3),
        _edit("a", "self_qa", reason="repetition"),
        _edit("b", "implications", 0.0),
        _edit("b", "rewrite", -0.2),
        _edit("c", "self_qa", reason="empty"),
    ]
    best = best_per_document(edits)
    assert set(best) == {"a"}  # b's best reward is 0 (not > 0); c has no trained edit
    assert best["a"].format == "rewrite"
    assert best_per_document(edits, min_reward=0.5) == {}
    assert set(best_per_document(edits, min_reward=-1.0)) == {"a", "b"}


def test_best_per_document_ties_go_to_the_first_sample() -> None:
    first, second = _edit("a", "implications", 0.2), _edit("a", "rewrite", 0.2)
    assert best_per_document([first, second])["a"] is first


def test_mean_reward_counts_degenerate_samples_as_zero() -> None:
    assert mean_reward([_edit("a", "rewrite", 0.4), _edit("a", "x", reason="empty")]) == 0.2
    assert mean_reward([]) is None


def test_format_weights_favour_winners_and_keep_exploring() -> None:
    stats = FormatStats(FORMATS)
    uniform = stats.weights(exploration=0.2, temperature=0.05)
    assert uniform == pytest.approx(dict.fromkeys(FORMATS, 0.25))
    for _ in range(4):
        stats.record(_edit("d", "rewrite", 0.2))
        stats.record(_edit("d", "implications", -0.1))
        stats.record(_edit("d", "self_qa", reason="empty"))
    weights = stats.weights(exploration=0.2, temperature=0.05)
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["rewrite"] == max(weights.values())
    assert weights["rewrite"] > 0.7
    assert min(weights.values()) >= 0.2 / len(FORMATS) - 1e-12  # the exploration floor
    assert weights["implications"] < weights["implications_long"]  # negative < untried
    assert stats.stats["self_qa"].degenerate == 4
    assert stats.stats["self_qa"].mean == 0.0


def test_format_score_is_shrunk_towards_zero() -> None:
    stats = FormatStats(FORMATS)
    stats.record(_edit("d", "rewrite", 0.4))
    assert stats.stats["rewrite"].mean == pytest.approx(0.4)
    assert stats.stats["rewrite"].score == pytest.approx(0.2)  # one pseudo-sample of 0


def test_format_choice_is_seeded_and_follows_weights() -> None:
    stats = FormatStats(FORMATS)
    for _ in range(10):
        stats.record(_edit("d", "self_qa", 0.3))
    a = stats.choose(200, random.Random(1), exploration=0.2, temperature=0.05)
    b = stats.choose(200, random.Random(1), exploration=0.2, temperature=0.05)
    assert a == b
    assert a.count("self_qa") > 140
    assert set(a) == set(FORMATS)  # exploration still samples every format


def test_format_stats_round_trip_json() -> None:
    stats = FormatStats(FORMATS)
    stats.record(_edit("d", "rewrite", 0.25))
    stats.record_win("rewrite")
    again = FormatStats.from_json(FORMATS, stats.as_json())
    assert again.as_json() == stats.as_json()
    assert again.weights(exploration=0.1, temperature=0.1) == stats.weights(
        exploration=0.1, temperature=0.1
    )
    assert FormatStats.from_json(["rewrite"], None).formats == ["rewrite"]
    with pytest.raises(ValueError, match="format"):
        FormatStats([])
