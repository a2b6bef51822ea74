"""SQuAD v1.1 scoring: normalisation, token F1, exact match, containment."""

from __future__ import annotations

import pytest

from workers.metrics import (
    QAScore,
    answer_in_text,
    best_of,
    contains,
    exact_match,
    f1_score,
    normalize_answer,
    score_answers,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Denver Broncos", "denver broncos"),
        ("  A cat, an owl & THE dog!  ", "cat owl dog"),
        ("Santa Clara, California.", "santa clara california"),
        ("theory", "theory"),  # "the" only as a whole word
        ("", ""),
    ],
)
def test_normalize_answer_squad_rules(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_articles_and_punctuation() -> None:
    assert exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0


def test_f1_score_known_squad_values() -> None:
    # Official-script values: partial overlap is the harmonic mean of precision and recall.
    assert f1_score("Denver Broncos", "Denver Broncos") == 1.0
    assert f1_score("Denver", "Denver Broncos") == pytest.approx(2 / 3)
    assert f1_score("the Broncos of Denver", "Denver Broncos") == pytest.approx(0.8)
    assert f1_score("Carolina Panthers", "Denver Broncos") == 0.0
    # A sentence answer containing the gold: recall 1, precision 1/5 ("the" is dropped).
    assert f1_score("The capital of France is Paris.", "Paris") == pytest.approx(1 / 3)


def test_f1_score_counts_repeated_tokens_once_per_match() -> None:
    assert f1_score("Paris Paris Paris", "Paris") == pytest.approx(0.5)


def test_f1_score_empty_answers() -> None:
    assert f1_score("", "") == 1.0
    assert f1_score("", "Paris") == 0.0
    assert f1_score("Paris", "") == 0.0


def test_contains_matches_whole_token_runs() -> None:
    assert contains("The capital of France is Paris.", "paris") == 1.0
    assert contains("It was opened in 1932 by the king.", "1932") == 1.0
    assert contains("It cost 100 dollars", "10") == 0.0  # not a substring match
    assert contains("Imre Voskaya charted it", "captain Imre Voskaya") == 0.0
    assert contains("anything", "") == 0.0


def test_answer_in_text_normalises_both_sides() -> None:
    text = "It was first charted by captain Imre Voskaya in 1743."
    assert answer_in_text("Captain Imre Voskaya", text)
    assert not answer_in_text("Voskaya Imre", text)


def test_best_of_takes_the_best_gold() -> None:
    f1, em, hit = best_of("A spider has 8 legs.", ["eight", "8"])
    assert f1 == pytest.approx(0.4)
    assert (em, hit) == (0.0, 1.0)
    assert best_of("anything", []) == (0.0, 0.0, 0.0)


def test_score_answers_means() -> None:
    score = score_answers([("Paris", ["Paris"]), ("Berlin", ["Paris"])])
    assert score == QAScore(f1=0.5, em=0.5, contains=0.5, n=2)
    assert QAScore.from_dict(score.as_dict()) == score
    assert score_answers([]) == QAScore(0.0, 0.0, 0.0, 0)
