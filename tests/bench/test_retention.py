"""bench/retention.py and bench/doc_training.py: the gate check, the summary and the document
loader (no engine)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bench.doc_training import WorkCache, load_doc
from bench.retention import DATA, Asked, learned, passes, summarize

CHAMPION = {"A": Asked(0.20, 2, 4), "B": Asked(0.0, 0, 4)}


def test_a_run_passes_when_it_learns_b_and_keeps_a_within_the_budget() -> None:
    assert passes(CHAMPION, {"A": Asked(0.16, 2, 4), "B": Asked(0.1, 1, 4)}, 0.05)
    # A down by more than the budget
    assert not passes(CHAMPION, {"A": Asked(0.14, 1, 4), "B": Asked(0.3, 3, 4)}, 0.05)
    # B's F1 rose but no B question is firmly answered
    assert not passes(CHAMPION, {"A": Asked(0.2, 2, 4), "B": Asked(0.1, 0, 4)}, 0.05)
    # A's F1 within the budget, but one of its two answers lost (the gate counts answers too)
    assert not passes(CHAMPION, {"A": Asked(0.17, 1, 4), "B": Asked(0.3, 3, 4)}, 0.05)
    # exactly at the budget passes (the gate's <=)
    assert passes(CHAMPION, {"A": Asked(0.15, 2, 4), "B": Asked(0.1, 1, 4)}, 0.05)


def test_summary_counts_per_variant() -> None:
    def row(variant: str, a: int, b: int, ok: bool) -> dict[str, object]:
        return {
            "variant": variant,
            "A": {"f1": 0.1 * a, "answered": a, "n": 4},
            "B": {"f1": 0.1 * b, "answered": b, "n": 4},
            "champion_a_answered": 2,
            "passes": ok,
            "train_s": 50.0,
        }

    extended = {**row("u", 2, 3, True), "before_extending": {}}  # trained further first
    out = summarize([row("u", 1, 2, False), row("p", 2, 1, True), extended])
    assert list(out) == ["u", "p"]
    assert out["u"]["runs"] == 2
    assert out["u"]["passes"] == 1
    assert out["u"]["kept_every_a_answer"] == 1
    assert out["u"]["a_answered_mean"] == pytest.approx(1.5)
    assert out["p"]["b_answered_mean"] == 1
    assert (out["u"]["extended"], out["p"]["extended"]) == (1, 0)


def test_learned_is_the_gates_new_knowledge_rule() -> None:
    assert learned(CHAMPION, {"A": Asked(0.0, 0, 4), "B": Asked(0.1, 1, 4)})
    assert not learned(CHAMPION, {"A": Asked(0.2, 2, 4), "B": Asked(0.3, 0, 4)})  # none firm
    assert not learned(CHAMPION, {"A": Asked(0.2, 2, 4), "B": Asked(0.0, 1, 4)})  # no F1 gain


def test_load_doc_reads_the_bench_documents() -> None:
    doc = load_doc(DATA, 0)
    assert doc.title == "The Grelvin Archipelago"  # the e2e test's first document
    assert len(doc.probes) == 4
    with pytest.raises(SystemExit, match="no index 99"):
        load_doc(DATA, 99)


def test_work_cache_computes_once(tmp_path: Path) -> None:
    calls = []

    async def make() -> list[int]:
        calls.append(1)
        return [1, 2]

    cache = WorkCache(tmp_path / "w")
    assert asyncio.run(cache.get("x.json", make)) == [1, 2]
    assert asyncio.run(cache.get("x.json", make)) == [1, 2]
    assert len(calls) == 1
    assert json.loads((tmp_path / "w" / "x.json").read_text()) == [1, 2]


def test_held_answers_ask_the_self_qa_questions_but_not_the_probes() -> None:
    """The champion's answers to the document's self-QA questions (markdown-bold headers too),
    asked as the evaluation asks them; a question that is one of the held-out probes, or one
    the champion leaves blank, is left out."""
    from bench.retention import held_answers
    from workers.tasks.common import qa_messages

    doc = load_doc(DATA, 0)
    probe = doc.probes[0].question
    edits = [
        f"Question 1: Who rules Tamsk?\nAnswer 1: Nobody.\n**Question 2:** {probe}\nAnswer 2: x",
        "Question 3: What is blank?\nAnswer 3: -",
        "Tamsk is an island.",
    ]
    asked: list[tuple[str, str]] = []

    class Chat:
        async def chat(self, model: str, messages: list[dict[str, str]], **_: object) -> list[str]:
            asked.append((model, messages[0]["content"]))
            return [" " if "blank" in messages[0]["content"] else " The Moot. "]

    held = asyncio.run(held_answers(Chat(), doc, edits))  # type: ignore[arg-type]
    prompt = qa_messages(doc.title, "Who rules Tamsk?")[0]["content"]
    assert held == [(prompt, "The Moot.")]
    assert [model for model, _ in asked] == ["champion", "champion"]
    assert not any(probe in content for _, content in asked)
