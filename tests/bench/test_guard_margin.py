"""The guard-set rule of bench/guard_margin.py, and that the shipped set was built by it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.guard_margin import firmly_known

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "guard_margin.json"


def _row(**kw: Any) -> dict[str, Any]:
    return {"greedy_right": True, "anchor": False, "sampled_right": 12, "flipped_by": 0, **kw}


@pytest.mark.parametrize(
    ("row", "kept"),
    [
        (_row(), True),
        (_row(greedy_right=False), False),
        (_row(anchor=True), False),
        (_row(sampled_right=11), False),
        (_row(flipped_by=1), False),
    ],
)
def test_a_guard_question_must_be_firmly_known(row: dict[str, Any], kept: bool) -> None:
    assert firmly_known(row, need=12) is kept


def test_the_shipped_guard_set_is_what_the_measurement_kept() -> None:
    from workers.tasks.evaluate import GUARD_FILE, load_guard

    measured = json.loads(RESULTS.read_text())
    need = measured["keep"] * measured["samples"]
    kept = [r["question"] for r in measured["rows"] if firmly_known(r, need=need)]
    assert [r["question"] for r in measured["rows"] if r["kept"]] == kept
    assert [g.question for g in load_guard(GUARD_FILE)] == kept
