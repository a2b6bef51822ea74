"""bench.firmness: its pure logic (which questions, which answers were lost, the re-gate) and
how it reads a kept continual run."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from adapters_store.models import NamespaceSettings
from bench.firmness import earlier_documents, firm_regate, lost, plan, summarize


def _update(doc: str, decision: str, job: str = "") -> dict[str, Any]:
    return {"document": doc, "decision": decision, "job_id": job or f"adj_{doc}"}


def test_earlier_documents_are_the_promoted_ones_before() -> None:
    updates = [_update("d1", "promoted"), _update("d2", "rejected"), _update("d3", "promoted"),
               _update("d4", "rejected")]  # fmt: skip
    assert earlier_documents(updates) == [[], ["d1"], ["d1"], ["d1", "d3"]]


def test_lost_answers_are_split_by_the_champions_firmness() -> None:
    champion = [4, 2, None, 3, 1]
    candidate = [None, None, 4, 3, None]
    assert lost(champion, candidate, need=3) == {"firm": 1, "thin": 2}
    assert lost(champion, champion, need=3) == {"firm": 0, "thin": 0}


def _scores(champion_contains: float, candidate_contains: float) -> dict[str, Any]:
    def row(model: str, new: float, answered: int, retention: float) -> dict[str, Any]:
        return {
            "model": model,
            "new": {"f1": new, "em": 0.0, "contains": new, "n": 4, "answered": answered},
            "retention": {"f1": 0.1, "em": 0.0, "contains": retention, "n": 16},
            "guard": {"f1": 0.3, "em": 0.0, "contains": 0.96, "n": 75},
        }

    return {
        "metrics": {"gate": "f1", "guard": "contains", "min_answered": 1},
        "candidate": row("ns@v3", 0.25, 1, candidate_contains),
        "champion": row("ns@v2", 0.0, 0, champion_contains),
        "base": row("base", 0.0, 0, 0.0),
    }


@pytest.mark.parametrize(
    ("champion_firm", "candidate_firm", "decision"),
    [(6, 6, "promoted"), (6, 5, "rejected"), (5, 6, "promoted")],
)
def test_regate_counts_retention_in_firm_answers(
    champion_firm: int, candidate_firm: int, decision: str
) -> None:
    """9 -> 8 greedy answers on 16 earlier probes breaks the 0.05 budget; counted firmly
    only a firm answer lost does. The stored scores are left as they were."""
    scores = _scores(9 / 16, 8 / 16)
    gate = NamespaceSettings()
    assert firm_regate(scores, champion_firm, candidate_firm, gate).decision == decision
    assert scores["candidate"]["retention"]["contains"] == 8 / 16


def test_summary_counts_lost_answers_and_changed_decisions() -> None:
    rows = [
        {"document": "d2", "version": 3, "mode": "merge", "lost": {"firm": 1, "thin": 0},
         "decision": "rejected", "decision_firm_retention": "rejected"},
        {"document": "d3", "version": 5, "mode": "merge", "lost": {"firm": 0, "thin": 1},
         "decision": "promoted", "decision_firm_retention": "rejected"},
    ]  # fmt: skip
    summary = summarize(rows, "greedy and >= 3 of 4 samples at T=0.5")
    assert summary["lost"] == {"firm": 1, "thin": 1}
    assert summary["decisions_changed"] == [
        {"document": "d3", "version": 5, "mode": "merge", "decision": "promoted",
         "decision_firm_retention": "rejected"}
    ]  # fmt: skip


def test_plan_reads_a_kept_run(tmp_path: Path) -> None:
    """Each later job: the earlier promoted documents' questions, the champion's folder (in
    the job that made it) and each evaluated candidate's."""
    data = tmp_path / "docs.jsonl"
    docs = [
        {"id": d, "title": f"T{d}", "context": "x", "questions": [
            {"question": f"q{d}", "answers": [f"a{d}"]}]}
        for d in ("d1", "d2")
    ]  # fmt: skip
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    jobs = tmp_path / "run" / "data" / "jobs"
    for job, key, version in (("adj_d1", "fresh", 1), ("adj_d2", "merge", 2)):
        attempt = jobs / job / "attempt-1"
        (attempt / f"adapter-{key}").mkdir(parents=True)
        (attempt / f"evaluate-v{version}.json").write_text(json.dumps({"mode": key}))
    (jobs / "adj_d2" / "attempt-1" / "reference_scores.json").write_text(
        json.dumps({"champion": {"model": "ns@v1"}})
    )
    with sqlite3.connect(tmp_path / "run" / "data" / "selfadapt.db") as db:
        db.execute("create table adapter_version (version int, job_id text, note text)")
        db.executemany(
            "insert into adapter_version values (?, ?, ?)",
            [(1, "adj_d1", "fresh: job adj_d1"), (2, "adj_d2", "merge: job adj_d2")],
        )
    updates = [_update("d1", "promoted"), _update("d2", "rejected")]

    result = {"data": str(data), "documents": [{"id": "d1"}, {"id": "d2"}], "updates": updates}
    (later,) = plan(tmp_path / "run", result)

    assert later.document == "d2"
    assert [(i.title, i.question, i.answers) for i in later.items] == [("Td1", "qd1", ("ad1",))]
    champion = ("ns@v1", jobs / "adj_d1/attempt-1/adapter-fresh")
    assert (later.champion, later.champion_dir) == champion
    assert later.candidates == [(2, {"mode": "merge"}, jobs / "adj_d2/attempt-1/adapter-merge")]
    # A data file that no longer holds the run's documents (or another sample of it) is refused.
    with pytest.raises(SystemExit, match="no longer holds"):
        plan(tmp_path / "run", {**result, "documents": [{"id": "d2"}, {"id": "d1"}]})
