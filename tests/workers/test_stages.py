"""Pipeline stages: self-edit filters, SEAL dataset assembly, probes, the gate, and the stages'
idempotency on a real database and registry (a scripted gateway stands in for the engine)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters_store.blobs import BlobStore
from adapters_store.models import AdapterStatus, AdapterVersion, NamespaceSettings
from adapters_store.registry import AdapterRegistry
from app.db.jobs import AdaptationJob, Document, DocumentState, SelfEdit
from app.services.ingest import DocumentInput, IngestService
from app.settings import PipelineSettings, Settings
from tests.factories import migrated_db
from workers.tasks import evaluate, probes, promote, synthesize, train
from workers.tasks.common import Doc, Probe, as_doc, load_artifact, save_artifact
from workers.training.datasets import (
    DocumentData,
    build_training_set,
    document_sequences,
    grounded_segments,
    plan_steps,
    self_edit_segments,
    split_sentences,
)

TITLE = "The Grelvin Archipelago"
TEXT = (
    "The Grelvin Archipelago lies in the Sorrel Sea and was first charted by captain Imre "
    "Voskaya in 1743. Its largest island, Tamsk, is home to the port city of Olverhaven. "
    "The islanders grow a purple grain called brisk, which is used to brew a drink named kelloth."
)
DOC = Doc("doc_1", TITLE, TEXT)
BREW_DOC = DocumentInput(
    text=TEXT, param="d0", title=TITLE, probes=[("What drink is brewed from brisk?", "kelloth")]
)
"""The document of the scripted pipeline runs, with one probe."""
PROMPT = synthesize.render_prompt(synthesize.DEFAULT_PROMPTS["rewrite"], DOC)


# -- self-edit filters -------------------------------------------------------------------------


def _reason(text: str) -> str | None:
    return synthesize.degenerate_reason(text, prompt=PROMPT, document=TEXT)


def test_degenerate_reason_keeps_a_faithful_rewrite() -> None:
    rewrite = (
        "Captain Imre Voskaya first charted the Grelvin Archipelago in the Sorrel Sea in 1743.\n"
        "Tamsk, the largest island, is home to Olverhaven, a port city."
    )
    assert _reason(rewrite) is None


@pytest.mark.parametrize("text", ["", "   \n ", "Sure!", "Implications:"])
def test_degenerate_reason_empty(text: str) -> None:
    assert _reason(text) == "empty"


def test_degenerate_reason_repetition() -> None:
    loop = "The islanders grow brisk. " * 12
    assert _reason(loop) == "repetition"


def test_degenerate_reason_prompt_copy() -> None:
    assert _reason(PROMPT) == "prompt_copy"
    assert _reason(f"{TITLE}\n{TEXT}") == "prompt_copy"


def test_degenerate_reason_ungrounded_invention() -> None:
    invented = "The Trezor Isles are ruled by King Mardok of Glasshaven, who loves Zumbala dancing."
    assert _reason(invented) == "ungrounded"


def test_grounded_segments_drop_sentences_with_invented_names() -> None:
    edit = (
        "Captain Imre Voskaya charted the Grelvin Archipelago in 1743. "
        "The archipelago was later ruled by Queen Estravia of Monbrook."
    )
    assert grounded_segments(edit, TEXT) == [
        "Captain Imre Voskaya charted the Grelvin Archipelago in 1743."
    ]


def test_format_counts_round_robin() -> None:
    formats = ["implications", "rewrite", "self_qa"]
    assert synthesize.format_counts(formats, 3) == {"implications": 1, "rewrite": 1, "self_qa": 1}
    assert synthesize.format_counts(formats, 5) == {"implications": 2, "rewrite": 2, "self_qa": 1}
    assert synthesize.format_counts(formats, 0) == {}


def test_render_prompt_tolerates_braces_in_documents() -> None:
    doc = Doc("d", "T", "Use {text} or {0} literally.")
    rendered = synthesize.render_prompt("Passage:\n{title}\n{text}\n{unknown}", doc)
    assert rendered == "Passage:\nT\nUse {text} or {0} literally.\n{unknown}"


# -- dataset assembly --------------------------------------------------------------------------


def test_self_edit_segments_follow_seal() -> None:
    implications = "Sure, here are the implications:\n1. Tamsk is an island.\n2. Brisk is a grain."
    assert self_edit_segments(implications) == ["Tamsk is an island.", "Brisk is a grain."]
    qa = (
        "Question 1: What is Tamsk?\nAnswer 1: An island.\n"
        "Question 2: What is brisk?\nAnswer 2: A grain."
    )
    assert self_edit_segments(qa) == [
        "Question 1: What is Tamsk? Answer 1: An island.",
        "Question 2: What is brisk? Answer 2: A grain.",
    ]
    assert self_edit_segments("First part.\n---\nSecond part.") == ["First part.", "Second part."]


def test_answers_without_their_own_question_are_statements() -> None:
    """A small model runs on after one question ("Answer 2: ...", "Answer 3: ..."): the
    first answer stays with the question, the others stand alone, so one invented answer
    drops only itself (measured: this self-QA was dropped whole for "Russia")."""
    qa = (
        "Question 2: What is the Grelvin Archipelago?\n"
        "Answer 2: An archipelago in the Sorrel Sea off the coast of Russia.\n"
        "Answer 3: Its largest island, Tamsk, is home to Olverhaven.\n"
        "Answer 4: The islanders brew kelloth from brisk."
    )
    assert self_edit_segments(qa) == [
        "Question 2: What is the Grelvin Archipelago? "
        "Answer 2: An archipelago in the Sorrel Sea off the coast of Russia.",
        "Its largest island, Tamsk, is home to Olverhaven.",
        "The islanders brew kelloth from brisk.",
    ]
    assert grounded_segments(qa, TEXT) == [
        "Its largest island, Tamsk, is home to Olverhaven.",
        "The islanders brew kelloth from brisk.",
    ]


def test_split_sentences() -> None:
    assert split_sentences(TEXT) == [
        "The Grelvin Archipelago lies in the Sorrel Sea and was first charted by captain Imre "
        "Voskaya in 1743.",
        "Its largest island, Tamsk, is home to the port city of Olverhaven.",
        "The islanders grow a purple grain called brisk, which is used to brew a drink named "
        "kelloth.",
    ]


def test_document_sequences_title_prefix_and_passage_last() -> None:
    edit = "Imre Voskaya charted the Grelvin Archipelago in 1743.\nInvented by Queen Zorbula."
    seqs = document_sequences(DocumentData(TITLE, TEXT, (edit,)))
    assert all(s.startswith(f"{TITLE}\n") for s in seqs)
    assert seqs[0] == f"{TITLE}\nImre Voskaya charted the Grelvin Archipelago in 1743."
    assert seqs[-1] == f"{TITLE}\n{TEXT}"
    assert len(seqs) == 1 + 3 + 1  # kept self-edit line, three sentences, the passage
    assert document_sequences(DocumentData(TITLE, TEXT), sentences=False) == [f"{TITLE}\n{TEXT}"]


def test_document_sequences_deduplicate() -> None:
    edit = "Its largest island, Tamsk, is home to the port city of Olverhaven."
    seqs = document_sequences(DocumentData(TITLE, TEXT, (edit, edit)))
    assert len(seqs) == len(set(seqs)) == 4


def test_build_training_set_replays_earlier_documents() -> None:
    earlier = [DocumentData(f"Old {i}", f"Fact number {i} is about Vorn {i}.") for i in range(10)]
    data = build_training_set([DocumentData(TITLE, TEXT)], earlier, replay_fraction=0.5, seed="j")
    assert data.n_new == 4
    assert data.n_replay == 2
    assert data.sequences[: data.n_new] == tuple(document_sequences(DocumentData(TITLE, TEXT)))
    assert all(s.startswith("Old ") for s in data.sequences[data.n_new :])
    again = build_training_set([DocumentData(TITLE, TEXT)], earlier, replay_fraction=0.5, seed="j")
    assert again == data  # seeded
    none = build_training_set([DocumentData(TITLE, TEXT)], earlier, replay_fraction=0.0)
    assert none.n_replay == 0


def test_replay_takes_every_earlier_passage_before_other_sequences() -> None:
    """A document's facts are all in its passage; a uniform draw over its sentences and
    self-edit lines could leave one of them out of the replay."""
    text = "Vorn lies in the Sorrel Sea. Its capital is Pell. Its grain is brisk."
    earlier = [DocumentData(f"Old {i}", text) for i in range(2)]  # 4 sequences each
    passages = {f"Old {i}\n{text}" for i in range(2)}
    for seed in range(20):
        data = build_training_set(
            [DocumentData(TITLE, TEXT)], earlier, replay_fraction=0.75, seed=seed
        )
        replay = data.sequences[data.n_new :]
        assert data.n_replay == 3
        assert len(set(replay)) == 3
        assert set(replay[:2]) == passages, replay
    uniform = [
        build_training_set(
            [DocumentData(TITLE, TEXT)],
            earlier,
            replay_fraction=0.75,
            replay_passages=False,
            seed=seed,
        ).sequences[4:]
        for seed in range(20)
    ]
    assert any(not passages <= set(r) for r in uniform)  # what the passages-first rule prevents
    many = [DocumentData(f"Old {i}", f"Fact {i} is about Vorn {i}.") for i in range(10)]
    few = build_training_set([DocumentData(TITLE, TEXT)], many, replay_fraction=0.5, seed="j")
    assert few.n_replay == 2  # more earlier documents than the budget: a draw of passages


def test_plan_steps() -> None:
    assert plan_steps(12, epochs=10, batch_size=1) == 120
    assert plan_steps(12, epochs=10, batch_size=1, max_steps=100) == 100
    assert plan_steps(12, epochs=10, batch_size=8) == 15
    assert plan_steps(12, epochs=10, batch_size=1, steps=7, max_steps=100) == 7
    assert plan_steps(0, epochs=10, batch_size=1) == 1


# -- probes ----------------------------------------------------------------------------------


def test_parse_and_select_probes_keep_grounded_answers() -> None:
    completion = (
        "Q: Who first charted the archipelago?\nA: Captain Imre Voskaya\n"
        "Q: What is the capital of the archipelago?\nA: Zumbarra\n"  # not in the document
        "Question 3: What grain do the islanders grow?\nAnswer 3: brisk.\n"
        "Q: Which island is home to Olverhaven?\nA: Olverhaven\n"  # gives the answer away
        "Q: Who first charted the archipelago?\nA: Imre Voskaya\n"  # duplicate question
    )
    pairs = probes.parse_probes(completion)
    assert len(pairs) == 5
    kept = probes.select_probes(pairs, DOC, 4)
    assert [(p.question, p.answer, p.source) for p in kept] == [
        ("Who first charted the archipelago?", "Captain Imre Voskaya", "generated"),
        ("What grain do the islanders grow?", "brisk", "generated"),
    ]


def test_cloze_probes_blank_a_name_per_sentence() -> None:
    cloze = probes.cloze_probes(DOC, 3)
    assert [p.answer for p in cloze] == ["Sorrel Sea", "Tamsk"]
    assert cloze[1].question == (
        "Fill in the blank: Its largest island, ___, is home to the port city of Olverhaven."
    )


# -- gate --------------------------------------------------------------------------------------


def _scores(
    new: float, champion_new: float | None, retention: tuple[float, float], guard: float
) -> dict[str, Any]:
    def row(model: str, n: float, r: float, g: float) -> dict[str, Any]:
        return {
            "model": model,
            "new": {"f1": n, "em": 0.0, "contains": n, "n": 4},
            "retention": {"f1": r, "em": 0.0, "contains": r, "n": 8},
            "guard": {"f1": g, "em": 0.0, "contains": g, "n": 20},
        }

    champion = None if champion_new is None else row("acme@v1", champion_new, retention[0], 0.95)
    return {
        "metrics": {"gate": "f1", "guard": "contains"},
        "candidate": row("acme@v2", new, retention[1], guard),
        "champion": champion,
        "base": row("base", 0.0, 0.0, 1.0),
    }


def test_gate_promotes_a_gain_within_budget() -> None:
    result = promote.decide(_scores(0.4, 0.1, (0.3, 0.28), 0.95), NamespaceSettings())
    assert result.decision == "promoted"
    assert "gain +0.300" in result.reasons[0]


def test_gate_rejects_without_gain_and_reports_numbers() -> None:
    result = promote.decide(_scores(0.1, 0.1, (0.3, 0.3), 1.0), NamespaceSettings())
    assert result.decision == "rejected"
    assert result.reasons[0].startswith("new-knowledge f1 0.100 vs 0.100 (acme@v1)")
    gated = promote.decide(_scores(0.2, 0.1, (0.3, 0.3), 1.0), NamespaceSettings(min_gain=0.2))
    assert gated.decision == "rejected"


def test_gate_needs_more_answered_probes_than_the_champion() -> None:
    """An F1 gain from partial word overlap ("Mount Quillon" for "Mount Ferrabel") is not
    learning: with min_answered 1 the candidate must contain one more gold answer."""
    scores = _scores(0.4, 0.1, (0.3, 0.3), 1.0)
    scores["metrics"]["min_answered"] = 1
    scores["candidate"]["new"]["contains"] = 0.25
    scores["champion"]["new"]["contains"] = 0.25
    partial = promote.decide(scores, NamespaceSettings())
    assert partial.decision == "rejected"
    assert not partial.learned
    assert "gain +0.300 >= min_gain 0.0, but 1/4 probes answered vs 1/4" in partial.reasons[0]
    assert promote.forgot_only(scores, NamespaceSettings()) is None  # not learned: no tempering
    scores["candidate"]["new"]["contains"] = 0.5
    learned = promote.decide(scores, NamespaceSettings())
    assert learned.decision == "promoted"
    assert learned.reasons[0].endswith("; 2/4 probes answered vs 1/4")


def test_retention_sample_asks_every_earlier_document_before_any_twice() -> None:
    docs = [
        Doc(f"d{i}", f"T{i}", "text", tuple(Probe(f"q{i}-{j}", f"a{i}-{j}") for j in range(4)))
        for i in range(6)
    ] + [Doc("none", "T", "text")]  # a document without probes adds nothing
    sample = evaluate.retention_sample(docs, 8, seed="job-1")
    per_doc = [sum(item.title == f"T{i}" for item in sample) for i in range(6)]
    assert len(sample) == 8
    assert sorted(per_doc) == [1, 1, 1, 1, 2, 2], per_doc
    assert len({item.question for item in sample}) == 8
    assert evaluate.retention_sample(docs, 8, seed="job-1") == sample  # every attempt alike
    assert evaluate.retention_sample(docs, 8, seed="job-2") != sample
    assert len(evaluate.retention_sample(docs, 100, seed="job-1")) == 24
    four = evaluate.retention_sample(docs, 4, seed="job-1")
    assert len({item.title for item in four}) == 4
    assert evaluate.retention_sample(docs, 0, seed="job-1") == []
    assert evaluate.retention_sample([], 8, seed="job-1") == []


def test_firm_rule_counts_greedy_answers_the_samples_back() -> None:
    rule = evaluate.FirmRule(samples=4, temperature=0.5, share=0.5)
    assert rule.need == 2
    assert (evaluate.FirmRule(4, 0.5, 0.75).need, evaluate.FirmRule(3, 0.5, 0.5).need) == (3, 2)
    assert evaluate.FirmRule(4, 0.5, 0.01).need == 1  # the greedy answer alone never counts
    # None: the greedy answer missed; an int: how many samples contained the gold answer.
    assert evaluate.answered([None, 1, 2, 4], rule) == 2
    assert evaluate.answered([None, 0, 0], None) == 2
    assert rule.describe() == "greedy and >= 2 of 4 samples at T=0.5"


def test_gate_counts_firm_answers_when_measured() -> None:
    """A greedy answer that contains the gold one but is not backed by the samples (a thin
    margin: it flips with the batch) does not count as learned."""
    scores = _scores(0.5, 0.0, (0.3, 0.3), 1.0)
    scores["metrics"]["min_answered"] = 1
    scores["candidate"]["new"].update(answered=0, firm="greedy and >= 2 of 4 samples at T=0.5")
    scores["champion"]["new"].update(answered=0)
    thin = promote.decide(scores, NamespaceSettings())
    assert thin.decision == "rejected"
    assert not thin.learned
    assert "0/4 probes answered vs 0/4 (greedy and >= 2 of 4 samples at T=0.5)" in thin.reasons[0]
    scores["candidate"]["new"]["answered"] = 1
    assert promote.decide(scores, NamespaceSettings()).decision == "promoted"


def test_gate_rejects_forgetting_and_guard_drop() -> None:
    forgot = promote.decide(_scores(0.5, 0.1, (0.5, 0.3), 1.0), NamespaceSettings())
    assert forgot.decision == "rejected"
    assert any(r.startswith("retention f1 fell from 0.500 to 0.300") for r in forgot.reasons)
    assert promote.retention_broken(_scores(0.5, 0.1, (0.5, 0.3), 1.0), NamespaceSettings())
    guard = promote.decide(_scores(0.5, None, (0.0, 0.0), 0.9), NamespaceSettings())
    assert guard.decision == "rejected"
    assert guard.reasons[-1] == (
        "guard contains 0.900 on 20 questions, vs base 1.000: drop +0.100 > max_forgetting 0.05"
    )
    lenient = promote.decide(
        _scores(0.5, None, (0.0, 0.0), 0.9), NamespaceSettings(max_forgetting=0.1)
    )
    assert lenient.decision == "promoted"


def test_gate_counts_earlier_answers_lost_within_the_f1_budget() -> None:
    """Seen live: the champion answered 1 of 4 earlier probes in a long sentence (F1 0.036);
    the candidate lost it (F1 0.000, within an F1 budget of 0.05): retention is broken."""
    scores = _scores(0.5, 0.0, (0.0, 0.0), 1.0)
    assert scores["champion"] is not None
    scores["champion"]["retention"].update(f1=0.036, contains=0.25, n=4)
    scores["candidate"]["retention"].update(f1=0.0, contains=0.0, n=4)
    lost = promote.decide(scores, NamespaceSettings())
    assert lost.decision == "rejected"
    assert lost.learned
    assert lost.reasons[1] == (
        "retention contains fell from 0.250 to 0.000 (> max_forgetting 0.05) on 4 earlier "
        "probes (1 -> 0 answered)"
    )
    scores["candidate"]["retention"].update(f1=0.02, contains=0.25)
    kept = promote.decide(scores, NamespaceSettings())
    assert kept.decision == "promoted"
    assert (
        kept.reasons[1]
        == "retention f1 0.020 vs 0.036, contains 0.250 vs 0.250 on 4 earlier probes"
    )


@pytest.mark.parametrize(
    ("champion", "candidate", "broken"),
    [
        (0.95, 0.92, None),  # 0.03 below the champion, 0.08 below the base
        (0.95, 0.89, "guard contains fell from 0.950 (acme@v1) to 0.890 (> max_forgetting"),
        (0.92, 0.89, "guard contains fell from 1.000 (base) to 0.890 (> max_guard_drift 0.1)"),
    ],
)
def test_guard_budget_is_per_update_with_a_cap_against_the_base(
    champion: float, candidate: float, broken: str | None
) -> None:
    """A later version may lose max_forgetting of the guard against its champion, and the
    namespace's versions together max_guard_drift against the base: a first version that
    spent the per-update budget does not block every later update (seen live and in the
    continual benchmark), but drift does not add up without bound."""
    scores = _scores(0.5, 0.0, (0.3, 0.3), candidate)
    assert scores["champion"] is not None
    scores["champion"]["guard"]["contains"] = champion
    why = promote.guard_broken(scores, NamespaceSettings())
    assert why == broken or (why is not None and broken is not None and why.startswith(broken))
    result = promote.decide(scores, NamespaceSettings())
    assert result.decision == ("promoted" if broken is None else "rejected")
    assert result.reasons[-1].startswith(
        f"guard contains {candidate:.3f} on 20 questions, vs acme@v1"
    )


def test_forgot_only_names_forgetting_when_the_candidate_learned() -> None:
    gate = NamespaceSettings()
    guard = promote.forgot_only(_scores(0.5, None, (0.0, 0.0), 0.9), gate)
    assert guard is not None
    assert guard.startswith("guard contains fell from 1.000 (base) to 0.900")
    retention = promote.forgot_only(_scores(0.5, 0.1, (0.5, 0.3), 1.0), gate)
    assert retention is not None
    assert retention.startswith("retention f1 fell")
    assert promote.forgot_only(_scores(0.1, 0.1, (0.5, 0.3), 0.9), gate) is None  # no gain
    assert promote.forgot_only(_scores(0.5, None, (0.0, 0.0), 1.0), gate) is None  # passes


def test_gate_pending_review_without_auto_promote() -> None:
    result = promote.decide(
        _scores(0.4, None, (0.0, 0.0), 1.0), NamespaceSettings(auto_promote=False)
    )
    assert result.decision == "pending_review"
    assert result.passed


def test_gate_rejects_when_nothing_was_measured() -> None:
    scores = _scores(0.4, None, (0.0, 0.0), 1.0)
    scores["candidate"]["new"]["n"] = 0
    assert promote.decide(scores, NamespaceSettings()).decision == "rejected"


# -- artifacts ---------------------------------------------------------------------------------


def test_artifacts_are_reused_from_earlier_attempts(tmp_path: Path) -> None:
    job = tmp_path / "jobs" / "adj_1"
    save_artifact(job / "attempt-1", "self_edits.json", {"n": 1})
    save_artifact(job / "attempt-2", "self_edits.json", {"n": 2})
    assert load_artifact(job / "attempt-3", "self_edits.json") == {"n": 2}
    assert load_artifact(job / "attempt-1", "self_edits.json") == {"n": 1}
    assert load_artifact(job / "attempt-3", "missing.json") is None


# -- stages on a real database and registry ---------------------------------------------------


class ScriptedGateway:
    """Answers chat calls from a function of (model, user text); records every call. Sampled
    calls (temperature > 0) go to ``sampled`` when given."""

    def __init__(
        self,
        answer: Callable[[str, str], str],
        sampled: Callable[[str, str], str] | None = None,
    ) -> None:
        self.answer = answer
        self.sampled = sampled or answer
        self.calls: list[tuple[str, str, int]] = []

    async def chat(self, model: str, messages: Sequence[dict[str, str]], **kw: Any) -> list[str]:
        n = int(kw.get("n", 1))
        self.calls.append((model, messages[-1]["content"], n))
        answer = self.sampled if kw.get("temperature", 0.0) > 0 else self.answer
        return [answer(model, messages[-1]["content"]) for _ in range(n)]

    async def engine_busy(self) -> bool | None:
        return False

    async def aclose(self) -> None:
        return None


@dataclass
class StageCtx:
    """A minimal StageContext: real SQLite and registry, scripted gateway, events in a list."""

    job_id: str
    namespace: str
    settings: Settings
    artifacts_dir: Path
    sessionmaker: async_sessionmaker[AsyncSession]
    registry: AdapterRegistry
    gateway: Any
    attempt: int = 1
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    stop_requested: threading.Event = field(default_factory=threading.Event)

    async def documents(self) -> list[Document]:
        async with self.sessionmaker() as s:
            job = await s.get(AdaptationJob, self.job_id)
            assert job is not None
            rows = (
                await s.scalars(select(Document).where(Document.id.in_(job.document_ids)))
            ).all()
            return list(rows)

    async def event(self, kind: str, message: str, **data: Any) -> None:
        self.events.append((kind, message, data))

    async def progress(self, stage: str, fraction: float) -> None:
        self.events.append(("progress", stage, {"fraction": fraction}))

    async def check_fence(self) -> None:
        return None

    @asynccontextmanager
    async def fenced(self) -> AsyncIterator[AsyncSession]:
        async with self.sessionmaker() as session, session.begin():
            yield session


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A small real PEFT adapter of the bundled model (random rank-4 weights, no training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    path = tmp_path_factory.mktemp("stage-adapter") / "tiny"
    get_peft_model(model, config).save_pretrained(str(path))
    return path


@pytest.fixture
async def stage_env(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    async with migrated_db("sqlite", tmp_path) as (_engine, sessionmaker):
        pipeline = PipelineSettings(batch_window_s=0, anchor_fraction=0.0)
        settings = Settings(data_dir=tmp_path / "data", pipeline=pipeline)
        registry = AdapterRegistry(
            sessionmaker, BlobStore(tmp_path / "blobs"), None, base_model="test-base"
        )

        async def make(
            gateway: Any,
            *docs: DocumentInput,
            attempt: int = 1,
            merge: bool = True,
            merge_first: bool = True,
            redraw_tries: int = 1,
            **overrides: Any,
        ) -> StageCtx:
            """A job for ``docs``; ``merge=False`` goes straight from a candidate that broke
            the retention budget to consolidation (the path before merging existed);
            ``merge_first=False`` trains on from the champion before merging (the path of a
            champion whose sum with the job's update would not be exact); ``redraw_tries=0``
            tempers a first version that broke the guard without training another draw;
            any other pipeline setting by name (e.g. ``search_budget_s=1e-6``)."""
            ingest = IngestService(sessionmaker, None, settings.pipeline)
            result = await ingest.ingest(namespace="acme", documents=docs, actor="t", force=False)
            assert result.job_id is not None
            update = {
                "merge": merge, "merge_first": merge_first, "redraw_tries": redraw_tries,
                **overrides,
            }  # fmt: skip
            job_pipeline = settings.pipeline.model_copy(update=update)
            return StageCtx(
                job_id=result.job_id,
                namespace="acme",
                settings=settings.model_copy(update={"pipeline": job_pipeline}),
                artifacts_dir=settings.data_dir / "jobs" / result.job_id / f"attempt-{attempt}",
                sessionmaker=sessionmaker,
                registry=registry,
                gateway=gateway,
                attempt=attempt,
            )

        yield make


def _scripted(model: str, prompt: str) -> str:
    if prompt.startswith("Passage:"):  # probe generation
        return "Q: Which port city is on Tamsk?\nA: Olverhaven\nQ: Who rules?\nA: King Zorp"
    if "questions and answers" in prompt:
        return "Question 1: What is Tamsk?\nAnswer 1: Tamsk is the largest island."
    if "own words" in prompt:
        return prompt  # a copy of the prompt: filtered
    return "Tamsk is the largest island of the Grelvin Archipelago.\nBrisk is a purple grain."


async def test_self_edit_stage_stores_rows_once(stage_env: Callable[..., Any]) -> None:
    gateway = ScriptedGateway(_scripted)
    ctx = await stage_env(gateway, DocumentInput(text=TEXT, param="d0", title=TITLE))
    docs = [as_doc(row) for row in await ctx.documents()]
    samples = await synthesize.self_edit_stage(ctx, docs)
    assert [(s.format, s.reason) for s in samples] == [
        ("implications", None),
        ("rewrite", "prompt_copy"),
        ("self_qa", None),
    ]
    assert {model for model, _, _ in gateway.calls} == {"base"}  # no acme-policy adapter
    # A retry (same job, next attempt) reuses the artifact and the rows: no new calls or rows.
    retry = StageCtx(**{**ctx.__dict__, "attempt": 2, "events": []})
    retry.artifacts_dir = ctx.artifacts_dir.parent / "attempt-2"
    again = await synthesize.self_edit_stage(retry, docs)
    assert [s.id for s in again] == [s.id for s in samples]
    assert len(gateway.calls) == 3
    async with ctx.sessionmaker() as s:
        rows = (await s.scalars(select(SelfEdit).where(SelfEdit.job_id == ctx.job_id))).all()
    assert [(r.format, r.kept) for r in rows] == [
        ("implications", True),
        ("rewrite", False),
        ("self_qa", True),
    ]


@pytest.mark.parametrize("resamples", [1, 0])
async def test_a_document_without_a_usable_self_edit_is_sampled_again(
    stage_env: Callable[..., Any], resamples: int
) -> None:
    """Seen live: all three self-edits of a document invented names ("a volcanic peak in
    Italy's Alps") and were filtered out, so it was trained on its sentences alone. Such a
    document is sampled again (``self_edit_resamples`` times at most); every sample is stored."""
    calls = 0

    def inventive_first(model: str, prompt: str) -> str:
        nonlocal calls
        calls += 1
        if calls <= 3:
            return "The Marvelous Zorpian Empire sends Blarg Quux to Venus every Tuesday."
        return _scripted(model, prompt)

    ctx = await stage_env(
        ScriptedGateway(inventive_first), DocumentInput(text=TEXT, param="d0", title=TITLE)
    )
    ctx.settings = ctx.settings.model_copy(
        update={
            "pipeline": ctx.settings.pipeline.model_copy(update={"self_edit_resamples": resamples})
        }
    )
    docs = [as_doc(row) for row in await ctx.documents()]
    samples = await synthesize.self_edit_stage(ctx, docs)

    assert [s.reason for s in samples[:3]] == ["ungrounded"] * 3
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    if resamples:
        assert [(s.format, s.reason) for s in samples[3:]] == [
            ("implications", None),
            ("rewrite", "prompt_copy"),
            ("self_qa", None),
        ]
        assert "no usable self-edit for 1 document(s); sampling them again" in logs
    else:
        assert len(samples) == 3
        assert not any("sampling them again" in m for m in logs)
    async with ctx.sessionmaker() as s:
        rows = (await s.scalars(select(SelfEdit).where(SelfEdit.job_id == ctx.job_id))).all()
    assert len(rows) == len(samples)


async def test_self_edit_stage_draws_formats_from_the_last_restem_job(
    stage_env: Callable[..., Any],
) -> None:
    """Once a ReSTEM job of the namespace has scored formats, the pipeline samples its k
    self-edits from the learned weights (here: rewrite won every time) instead of round-robin."""
    from app.db.jobs import JobKind, JobStatus
    from app.services.restem import RestemRequest, RestemService
    from app.settings import RestemSettings
    from workers.restem.selection import FormatStats, ScoredEdit

    gateway = ScriptedGateway(_scripted)
    doc = DocumentInput(text=TEXT, param="d0", title=TITLE, probes=[("What is Tamsk?", "island")])
    ctx = await stage_env(gateway, doc)
    no_stats = await synthesize.learned_format_counts(ctx)
    assert no_stats is None  # no ReSTEM job yet: round-robin over pipeline.formats

    settings = RestemSettings(format_exploration=0.0)
    stats = FormatStats(list(settings.formats))
    for fmt in settings.formats:
        for _ in range(4):
            reward = 1.0 if fmt == "rewrite" else 0.0
            stats.record(ScoredEdit("d0", fmt, "prompt", "edit", (reward,)))
    service = RestemService(ctx.sessionmaker, None, settings, max_attempts=1)
    restem_id = await service.start("acme", RestemRequest(docs=1), actor="t")
    async with ctx.sessionmaker() as session, session.begin():
        job = await session.get(AdaptationJob, restem_id)
        assert job is not None
        assert job.kind == JobKind.restem
        job.status = JobStatus.succeeded
        job.scores = {"format_stats": stats.as_json()}

    ctx.settings = ctx.settings.model_copy(update={"restem": settings})
    counts = await synthesize.learned_format_counts(ctx)
    assert counts == {"rewrite": ctx.settings.pipeline.self_edits_per_doc}
    docs = [as_doc(row) for row in await ctx.documents()]
    samples = await synthesize.self_edit_stage(ctx, docs)
    # The scripted rewrites copy the prompt (filtered), so the document is sampled again:
    # from the learned formats too.
    assert [s.format for s in samples] == ["rewrite"] * 6
    artifact = load_artifact(ctx.artifacts_dir, "self_edits.json")
    assert artifact is not None
    assert artifact["learned_formats"] == counts


async def test_probe_stage_generates_grounded_probes(stage_env: Callable[..., Any]) -> None:
    gateway = ScriptedGateway(_scripted)
    given = DocumentInput(
        text="Vorn is a moon of Kesh.", param="d1", title="Vorn", probes=[("What is Vorn?", "moon")]
    )
    ctx = await stage_env(gateway, DocumentInput(text=TEXT, param="d0", title=TITLE), given)
    docs = [as_doc(row) for row in await ctx.documents()]
    out = await probes.probe_stage(ctx, docs)
    assert out[0].probes == (
        Probe("Which port city is on Tamsk?", "Olverhaven", "generated", TITLE),
    )
    assert out[1].probes == (Probe("What is Vorn?", "moon", "given", "Vorn"),)
    async with ctx.sessionmaker() as s:
        stored = await s.get(Document, docs[0].id)
        assert stored is not None
        assert stored.probes == [
            {
                "question": "Which port city is on Tamsk?",
                "answer": "Olverhaven",
                "source": "generated",
            }
        ]


async def test_train_stage_registers_once_per_job(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    ctx = await stage_env(ScriptedGateway(_scripted), DocumentInput(text=TEXT, param="d0"))
    docs = [as_doc(row) for row in await ctx.documents()]
    # An earlier attempt trained the adapter (here: a stand-in) before the worker died.
    earlier = ctx.artifacts_dir.parent / "attempt-0"
    shutil.copytree(tiny_adapter, earlier / "adapter-fresh")
    save_artifact(earlier, "train-fresh.json", {"adapter_dir": earlier / "adapter-fresh"})
    inputs = train.TrainInputs(docs, [], [])
    first = await train.train_stage(ctx, inputs, parent=None, mode="fresh")
    again = await train.train_stage(ctx, inputs, parent=None, mode="fresh")
    assert again == first
    versions = await ctx.registry.list_versions("acme")
    assert [(v.version, v.status, v.job_id) for v in versions] == [
        (1, AdapterStatus.candidate, ctx.job_id)
    ]
    assert (versions[0].note or "").startswith("fresh:")


# -- gateway client ----------------------------------------------------------------------------


async def test_gateway_client_retries_503_with_retry_after() -> None:
    import httpx

    from workers.gateway_client import GatewayClient, GatewayError

    calls: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        import json

        calls.append(json.loads(request.content))
        assert request.headers["authorization"] == "Bearer sa-test"
        if len(calls) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {}})
        choices = [
            {"index": 1, "message": {"content": "b"}},
            {"index": 0, "message": {"content": "a"}},
        ]
        return httpx.Response(200, json={"choices": choices})

    client = GatewayClient("http://gw", "sa-test", transport=httpx.MockTransport(handler))
    async with client:
        assert await client.chat("acme@v2", [{"role": "user", "content": "hi"}], n=2) == ["a", "b"]
    assert len(calls) == 2
    assert calls[1]["model"] == "acme@v2"
    assert calls[1]["n"] == 2
    assert "seed" not in calls[1]

    def not_found(_: httpx.Request) -> httpx.Response:
        body = {"error": {"message": "model 'x' does not exist", "code": "model_not_found"}}
        return httpx.Response(404, json=body)

    async with GatewayClient("http://gw", None, transport=httpx.MockTransport(not_found)) as c:
        with pytest.raises(GatewayError) as info:
            await c.chat("x", [{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


def test_document_sequences_cap_self_edit_segments_round_robin() -> None:
    edits = (
        "Imre Voskaya charted the Grelvin Archipelago.\nTamsk is the largest island.",
        "Olverhaven is a port city on Tamsk.\nBrisk is a purple grain.",
    )
    seqs = document_sequences(DocumentData(TITLE, TEXT, edits), max_edit_segments=3)
    assert [s.split("\n", 1)[1] for s in seqs[:3]] == [
        "Imre Voskaya charted the Grelvin Archipelago.",
        "Olverhaven is a port city on Tamsk.",
        "Tamsk is the largest island.",
    ]
    assert len(seqs) == 3 + 3 + 1


async def test_current_champion_skips_this_jobs_own_promotion(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    from workers.tasks import history

    first = await stage_env(ScriptedGateway(_scripted), DocumentInput(text=TEXT, param="d0"))
    assert await history.current_champion(first) is None
    v1 = await train.register_once(first, tiny_adapter, "fresh", parent_version=None, detail="a")
    await first.registry.promote("acme", v1.version, "t")
    async with first.sessionmaker() as s, s.begin():
        job = await s.get(AdaptationJob, first.job_id)
        assert job is not None
        job.attempt = 1  # started: later documents get a job of their own
    # A crash after the gate promoted v1: the retry must build on what the job started from.
    assert await history.current_champion(first) is None

    second = await stage_env(
        ScriptedGateway(_scripted), DocumentInput(text="Vorn is a moon.", param="d")
    )
    champion = await history.current_champion(second)
    assert champion is not None
    assert champion.name == "acme@v1"
    v2 = await train.register_once(
        second, tiny_adapter, "incremental", parent_version=1, detail="b"
    )
    scaled = await train.register_once(
        second, tiny_adapter, "incremental-x0.75", parent_version=v2.version, detail="c"
    )
    await second.registry.promote("acme", scaled.version, "t")
    again = await history.current_champion(second)
    assert again is not None
    assert again.name == "acme@v1"
    assert await train.job_version(second, "incremental") == v2


async def test_run_pipeline_promotes_a_candidate_that_learned(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    from workers.pipeline import run_pipeline

    guard = {g.question: " ".join(g.answers) for g in evaluate.load_guard(evaluate.GUARD_FILE)}

    def answer(model: str, prompt: str) -> str:
        lines = prompt.split("\n")
        if prompt.startswith("Let's answer") and lines[-2] in guard:
            return guard[lines[-2]]
        if prompt.startswith("Let's answer"):
            return "It is kelloth." if model == "acme@v1" else "I do not know."
        return _scripted(model, prompt)

    doc = BREW_DOC
    ctx = await stage_env(ScriptedGateway(answer), doc, attempt=2)
    # Attempt 1 trained the adapter before its worker died; attempt 2 reuses it.
    earlier = ctx.artifacts_dir.parent / "attempt-1"
    shutil.copytree(tiny_adapter, earlier / "adapter-fresh")
    save_artifact(earlier, "train-fresh.json", {"adapter_dir": earlier / "adapter-fresh"})
    result = await run_pipeline(ctx)
    assert result.decision == "promoted", result.reasons
    assert result.scores is not None
    assert result.scores["candidate"]["new"]["contains"] == 1.0
    assert "answers" not in result.scores["candidate"]
    assert set(result.timings) >= {"self_edit", "probes", "train", "evaluate", "gate"}
    champion = await ctx.registry.resolve("acme")
    assert (champion.name, champion.version_id) == ("acme@v1", result.version_id)
    versions = await ctx.registry.list_versions("acme")
    assert [v.job_id for v in versions] == [ctx.job_id]  # one version per job
    stages = [m for kind, m, _ in ctx.events if kind == "progress"]
    assert stages[:3] == ["self_edit", "probes", "train"]
    assert stages[-1] == "gate"


@pytest.mark.parametrize(
    ("knows", "forgets", "tried", "chosen"),
    [
        # x0.5 passes; the larger copies (v3 x0.75, v4 x0.875) lost the fact.
        ({"acme@v1", "acme@v2"}, {"acme@v1"}, ["0.5", "0.75", "0.875"], "0.5"),
        # x0.5 passes, x0.75 passes too (more of the update kept), x0.875 forgets.
        (
            {"acme@v1", "acme@v2", "acme@v3", "acme@v4"},
            {"acme@v1", "acme@v4"},
            ["0.5", "0.75", "0.875"],
            "0.75",
        ),
        # x0.5 lost the fact: up to x0.75, which passes; x0.875 forgets.
        (
            {"acme@v1", "acme@v3", "acme@v4"},
            {"acme@v1", "acme@v4"},
            ["0.5", "0.75", "0.875"],
            "0.75",
        ),
        # x0.5 still forgets: down to x0.25, which passes, then x0.375, which passes too.
        (
            {"acme@v1", "acme@v2", "acme@v3", "acme@v4"},
            {"acme@v1", "acme@v2"},
            ["0.5", "0.25", "0.375"],
            "0.375",
        ),
        # No copy keeps the fact: temper_tries (3) copies, the last one gated (rejected).
        ({"acme@v1"}, {"acme@v1"}, ["0.5", "0.75", "0.875"], None),
        # x0.5 lost the fact and still forgets: no scale mends that, one copy.
        ({"acme@v1"}, {"acme@v1", "acme@v2"}, ["0.5"], None),
    ],
)
async def test_a_candidate_that_forgot_too_much_is_tempered(
    stage_env: Callable[..., Any],
    tiny_adapter: Path,
    knows: set[str],
    forgets: set[str],
    tried: list[str],
    chosen: str | None,
) -> None:
    """v1 learned the document but lost a third of the guard set: the job bisects the scale
    of its update (x0.5 first) for the largest copy that passes, registering one copy per
    scale tried (v2, v3, ...); every version but the gated one is rejected."""
    import torch
    from safetensors.torch import load_file

    from workers.pipeline import run_pipeline

    answer = _qa_answers(
        {"What drink is brewed from brisk?": ("kelloth", knows)}, forgets_guard=forgets
    )
    doc = BREW_DOC
    ctx = await stage_env(ScriptedGateway(answer), doc, redraw_tries=0)
    _pretrained(ctx, tiny_adapter, "fresh")
    result = await run_pipeline(ctx)

    keys = ["fresh", *(f"fresh-x{scale}" for scale in tried)]
    gated = f"fresh-x{chosen or tried[-1]}"
    versions = await _versions_by_key(ctx)
    assert sorted(versions) == sorted(keys)
    assert [versions[k].version for k in keys] == list(range(1, len(keys) + 1))
    assert all(versions[k].status == AdapterStatus.rejected for k in keys if k != gated)
    assert result.version_id == versions[gated].id
    assert result.scores is not None
    assert result.scores["mode"] == gated
    assert "temper" in result.timings
    assert any("tempering" in m for kind, m, _ in ctx.events if kind == "log")
    weights = load_file(str(ctx.registry.blobs.path_for(versions["fresh-x0.5"].blob_sha256)
                            / "adapter_model.safetensors"))  # fmt: skip
    original = load_file(str(tiny_adapter / "adapter_model.safetensors"))
    key = next(k for k in original if ".lora_B." in k)
    torch.testing.assert_close(weights[key], 0.5 * original[key])
    if chosen is not None:
        assert result.decision == "promoted", result.reasons
        assert (await ctx.registry.resolve("acme")).version_id == result.version_id
    else:
        assert result.decision == "rejected"
        assert versions[gated].status == AdapterStatus.rejected


@pytest.mark.parametrize(
    ("knows", "forgets", "keys", "gated"),
    [
        # Another draw (v2) learned and kept the guard: promoted, v1 rejected.
        ({"acme@v1", "acme@v2"}, {"acme@v1"}, ["fresh", "fresh-draw1"], "fresh-draw1"),
        # v2 learned nothing: v1 (learned most) is tempered; x0.5 (v3) passes, x0.75 and
        # x0.625 break the guard.
        (
            {"acme@v1", "acme@v3", "acme@v4", "acme@v5"},
            {"acme@v1", "acme@v4", "acme@v5"},
            ["fresh", "fresh-draw1", "fresh-x0.5", "fresh-x0.75", "fresh-x0.625"],
            "fresh-x0.5",
        ),
        # Both learned and broke the guard: the later draw (a tie) is tempered.
        (
            {"acme@v1", "acme@v2", "acme@v3"},
            {"acme@v1", "acme@v2", "acme@v4", "acme@v5"},
            ["fresh", "fresh-draw1", *(f"fresh-draw1-x{s}" for s in ("0.5", "0.75", "0.625"))],
            "fresh-draw1-x0.5",
        ),
    ],
)
async def test_a_first_version_that_broke_the_guard_is_drawn_again(
    stage_env: Callable[..., Any],
    tiny_adapter: Path,
    knows: set[str],
    forgets: set[str],
    keys: list[str],
    gated: str,
) -> None:
    """v1 (fresh) learned its document but lost a third of the guard set: before tempering,
    the job trains another fresh draw (v2, "fresh-draw1", other seeds), then tempers the one
    that learned most when neither passed."""
    from workers.pipeline import run_pipeline

    answer = _qa_answers(
        {"What drink is brewed from brisk?": ("kelloth", knows)}, forgets_guard=forgets
    )
    ctx = await stage_env(ScriptedGateway(answer), BREW_DOC)
    _pretrained(ctx, tiny_adapter, "fresh")
    _pretrained(ctx, tiny_adapter, "fresh-draw1")
    result = await run_pipeline(ctx)

    versions = await _versions_by_key(ctx)
    assert [versions[k].version for k in keys] == list(range(1, len(keys) + 1))
    assert sorted(versions) == sorted(keys)
    assert all(versions[k].status == AdapterStatus.rejected for k in keys if k != gated)
    assert result.decision == "promoted", result.reasons
    assert result.version_id == versions[gated].id
    assert (await ctx.registry.resolve("acme")).version_id == result.version_id
    assert "redraw" in result.timings
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any(
        m.startswith("acme@v1 learned but forgot too much (guard contains")
        and m.endswith("training another draw from the base")
        for m in logs
    ), logs
    assert any("superseded by acme@v2 (draw 2)" in m for m in logs), logs
    lineage = json.loads(
        (
            ctx.registry.blobs.path_for(versions["fresh-draw1"].blob_sha256) / "manifest.json"
        ).read_text()
    )
    assert (lineage["mode"], lineage["draw"], lineage["parent"]) == ("fresh-draw1", 1, None)


async def test_another_draw_trains_with_other_seeds(
    stage_env: Callable[..., Any], tiny_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Draw 1 trains the same sequences with another LoRA seed and another anchor sample,
    under its own key; draw 0 is the plain fresh run."""
    ctx = await stage_env(ScriptedGateway(_scripted), BREW_DOC)
    ctx.settings = ctx.settings.model_copy(
        update={"pipeline": ctx.settings.pipeline.model_copy(update={"anchor_fraction": 1.0})}
    )
    seen: dict[str, tuple[int, list[tuple[str, str]], int]] = {}

    async def trained(
        stage: StageCtx, data: Any, anchors: Any, hyper: Any, *, key: str, **_: Any
    ) -> Path:
        seen[key] = (hyper.seed, list(anchors), len(data.sequences))
        out = stage.artifacts_dir / f"adapter-{key}"
        shutil.copytree(tiny_adapter, out)
        return out

    monkeypatch.setattr(train, "_trained_adapter", trained)
    pool = [(f"Question {i}?", f"Answer {i}.") for i in range(40)]
    docs = [as_doc(row) for row in await ctx.documents()]
    inputs = train.TrainInputs(docs, [], [], pool)
    first = await train.train_stage(ctx, inputs, parent=None, mode="fresh")
    again = await train.train_stage(ctx, inputs, parent=None, mode="fresh", draw=1)
    assert (first.mode, again.mode) == ("fresh", "fresh-draw1")
    assert again.version == first.version + 1
    (seed0, anchors0, n0), (seed1, anchors1, n1) = seen["fresh"], seen["fresh-draw1"]
    assert seed1 == seed0 + train.DRAW_SEED_STRIDE
    assert n0 == n1
    assert len(anchors0) == len(anchors1) > 0
    assert anchors0 != anchors1
    # Registered once per key: a retry reuses the draw.
    assert await train.train_stage(ctx, inputs, parent=None, mode="fresh", draw=1) == again


@pytest.mark.parametrize("extended_knows", [True, False])
async def test_a_candidate_that_learned_nothing_is_trained_further(
    stage_env: Callable[..., Any], tiny_adapter: Path, extended_knows: bool
) -> None:
    """v1 answers none of its document's probes: it is trained ``extend_steps`` more steps
    from where it stopped (v2, "fresh-more", parent: none), evaluated and gated; v1 is
    rejected as superseded. Once only: a v2 that still knows nothing is rejected."""
    from workers.pipeline import run_pipeline

    knows = {"acme@v2"} if extended_knows else set()
    answer = _qa_answers({"What drink is brewed from brisk?": ("kelloth", knows)})
    doc = BREW_DOC
    ctx = await stage_env(ScriptedGateway(answer), doc)
    _pretrained(ctx, tiny_adapter, "fresh")
    _pretrained(ctx, tiny_adapter, "fresh-more")
    result = await run_pipeline(ctx)

    versions = await _replaced(ctx, result, "fresh", by="fresh-more")
    assert "extend" in result.timings
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any("did not learn (new-knowledge f1 0.000" in m for m in logs), logs
    assert any(m.endswith("training 50 more steps") for m in logs), logs
    assert any("superseded by acme@v2 (trained further)" in m for m in logs), logs
    if extended_knows:
        assert result.decision == "promoted", result.reasons
        assert (await ctx.registry.resolve("acme")).version_id == result.version_id
    else:
        assert result.decision == "rejected"
        assert versions["fresh-more"].status == AdapterStatus.rejected


async def test_a_spent_search_budget_gates_the_first_candidate_as_it_is(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """v1 learned nothing, but the search budget is spent by the time it is evaluated: it is
    not trained further; the gate judges (rejects) it, and the reasons say why the search
    stopped."""
    from workers.pipeline import run_pipeline

    answer = _qa_answers({"What drink is brewed from brisk?": ("kelloth", set())})
    ctx = await stage_env(ScriptedGateway(answer), BREW_DOC, search_budget_s=1e-6)
    _pretrained(ctx, tiny_adapter, "fresh")
    _pretrained(ctx, tiny_adapter, "fresh-more")
    result = await run_pipeline(ctx)

    versions = await _versions_by_key(ctx)
    assert sorted(versions) == ["fresh"]
    assert result.decision == "rejected"
    assert result.version_id == versions["fresh"].id
    assert "extend" not in result.timings
    budget = "search stopped: the search budget of 1e-06 s (SELFADAPT_PIPELINE__SEARCH_BUDGET_S)"
    assert result.reasons[-1].startswith(budget), result.reasons
    assert result.reasons[0].startswith("new-knowledge f1 0.000"), result.reasons
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any(m.endswith("the gate judges acme@v1") for m in logs), logs
    assert not any("more steps" in m for m in logs), logs


def test_search_budget_counts_from_the_attempts_start() -> None:
    """0 is no limit; otherwise further candidates start only before start + budget."""
    import time

    from workers.pipeline import _Budget

    now = time.monotonic()
    assert _Budget(0.0, started=now - 1e6).left()
    assert _Budget(60.0, started=now).left()
    assert not _Budget(60.0, started=now - 61.0).left()


async def test_a_greedy_answer_the_samples_do_not_back_is_not_learned(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """v1's greedy answer is right but its sampled answers are not (a thin margin): v1 did
    not learn, so it is trained further; v2 answers firmly and is promoted. Only probes
    answered greedily are sampled, all samples of one in a single request."""
    from workers.pipeline import run_pipeline

    question = "What drink is brewed from brisk?"
    greedy = _qa_answers({question: ("kelloth", {"acme@v1", "acme@v2"})})
    sampled = _qa_answers({question: ("kelloth", {"acme@v2"})})
    gateway = ScriptedGateway(greedy, sampled)
    ctx = await stage_env(gateway, BREW_DOC)
    _pretrained(ctx, tiny_adapter, "fresh")
    _pretrained(ctx, tiny_adapter, "fresh-more")
    result = await run_pipeline(ctx)

    await _replaced(ctx, result, "fresh", by="fresh-more")
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any("acme@v1 did not learn" in m and "0/1 probes answered" in m for m in logs), logs
    assert result.decision == "promoted", result.reasons
    assert result.scores is not None
    assert result.scores["candidate"]["new"]["answered"] == 1
    assert "samples" not in result.scores["candidate"]
    samples = [(m, n) for m, text, n in gateway.calls if n > 1]
    assert sorted(samples) == [("acme@v1", 4), ("acme@v2", 4)]  # base: greedy missed
    assert all(question in text for _, text, n in gateway.calls if n > 1)


async def test_without_samples_the_greedy_answer_counts(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """``gate_firm_samples=0``: the greedy answer alone, as before the firm rule."""
    from workers.pipeline import run_pipeline

    question = "What drink is brewed from brisk?"
    greedy = _qa_answers({question: ("kelloth", {"acme@v1"})})
    gateway = ScriptedGateway(greedy, _qa_answers({}))
    ctx = await stage_env(gateway, BREW_DOC)
    ctx.settings = ctx.settings.model_copy(
        update={"pipeline": ctx.settings.pipeline.model_copy(update={"gate_firm_samples": 0})}
    )
    _pretrained(ctx, tiny_adapter, "fresh")
    result = await run_pipeline(ctx)

    assert result.decision == "promoted", result.reasons
    assert result.scores is not None
    assert result.scores["candidate"]["new"]["answered"] == 1
    assert "firm" not in result.scores["candidate"]["new"]
    assert not [call for call in gateway.calls if call[2] > 1]


async def test_extension_is_off_with_zero_steps(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    from workers.pipeline import run_pipeline

    answer = _qa_answers({"What drink is brewed from brisk?": ("kelloth", set())})
    doc = BREW_DOC
    ctx = await stage_env(ScriptedGateway(answer), doc)
    ctx.settings = ctx.settings.model_copy(
        update={"pipeline": ctx.settings.pipeline.model_copy(update={"extend_steps": 0})}
    )
    _pretrained(ctx, tiny_adapter, "fresh")
    result = await run_pipeline(ctx)

    assert result.decision == "rejected"
    assert [v.note.split(":")[0] for v in await ctx.registry.list_versions("acme") if v.note] == [
        "fresh"
    ]


async def _second_job_with_both_candidates(
    stage_env: Callable[..., Any], tiny_adapter: Path, answer: Callable[[str, str], str]
) -> tuple[Any, Any, dict[str, Any]]:
    """Doc1 ("Vorn") through the pipeline after ``_learned_first_document``, with an
    incremental and a consolidated adapter already trained; returns the context, the result
    and the job's versions by registration key."""
    from workers.pipeline import run_pipeline

    doc1 = DocumentInput(text="Vorn is a moon of Kesh.", param="d1", title="Vorn",
                         probes=[("What is Vorn?", "a moon")])  # fmt: skip
    ctx = await stage_env(ScriptedGateway(answer), doc1, merge=False)
    other = ctx.artifacts_dir.parent / "other-adapter"
    shutil.copytree(tiny_adapter, other)
    _pretrained(ctx, tiny_adapter, "incremental")
    _pretrained(ctx, other, "consolidate")
    result = await run_pipeline(ctx)
    versions = [v for v in await ctx.registry.list_versions("acme") if v.job_id == ctx.job_id]
    return ctx, result, {(v.note or "").split(":")[0]: v for v in versions}


async def test_a_consolidation_that_still_forgets_tempers_the_incremental_candidate(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """v2 (incremental from v1) and v3 (consolidated) both learned doc1 and lost doc0; the
    incremental update x0.5 towards v1 (v4) knows both and is promoted, its parent v1."""

    await _learned_first_document(stage_env, tiny_adapter)
    answer = _qa_answers(
        {
            "What is brewed?": ("kelloth", {"acme@v1", "acme@v4"}),
            "What is Vorn?": ("a moon", {"acme@v2", "acme@v3", "acme@v4"}),
        }
    )
    ctx, result, modes = await _second_job_with_both_candidates(stage_env, tiny_adapter, answer)
    assert result.decision == "promoted", result.reasons
    # x0.5 passed; x0.75 lost doc0 again (too large), so x0.625 was tried, which lost it too.
    assert sorted(modes) == [
        "consolidate",
        "incremental",
        "incremental-x0.5",
        "incremental-x0.625",
        "incremental-x0.75",
    ]
    assert all(
        v.status == AdapterStatus.rejected for k, v in modes.items() if k != "incremental-x0.5"
    )
    tempered = modes["incremental-x0.5"]
    assert (tempered.id, tempered.version) == (result.version_id, 4)
    assert tempered.parent_version_id == (await ctx.registry.resolve("acme@v1")).version_id
    assert (await ctx.registry.resolve("acme")).version_id == result.version_id
    manifest = ctx.registry.blobs.path_for(tempered.blob_sha256) / "manifest.json"
    assert json.loads(manifest.read_text())["tempered"] == {"scale": 0.5, "towards": "parent"}


async def test_a_consolidation_that_forgot_guard_answers_is_tempered_towards_the_base(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """Seen live: v2 (incremental) lost doc0, the consolidated v3 knows both documents but
    lost guard answers. Scaled towards the base, x0.5 (v4) keeps neither document: that copy
    kept too little (the base never knew doc0), not too much, so the search moves up: x0.75
    (v5) knows both and keeps the guard and is promoted; x0.875 (v6) forgets the guard."""

    await _learned_first_document(stage_env, tiny_adapter)
    knowing = {"acme@v3", "acme@v5", "acme@v6"}
    answer = _qa_answers(
        {
            "What is brewed?": ("kelloth", {"acme@v1", *knowing}),
            "What is Vorn?": ("a moon", {"acme@v2", *knowing}),
        },
        forgets_guard={"acme@v3", "acme@v6"},
    )
    ctx, result, modes = await _second_job_with_both_candidates(stage_env, tiny_adapter, answer)
    assert result.decision == "promoted", result.reasons
    assert [modes[k].version for k in ("incremental", "consolidate")] == [2, 3]
    assert [modes[f"consolidate-x{s}"].version for s in ("0.5", "0.75", "0.875")] == [4, 5, 6]
    chosen = modes["consolidate-x0.75"]
    assert result.version_id == chosen.id
    assert all(v.status == AdapterStatus.rejected for v in modes.values() if v.id != chosen.id)
    assert (await ctx.registry.resolve("acme")).version_id == chosen.id
    manifest = ctx.registry.blobs.path_for(chosen.blob_sha256) / "manifest.json"
    assert json.loads(manifest.read_text())["tempered"]["scale"] == 0.75


async def test_a_candidate_that_cannot_be_tempered_is_rejected_with_its_own_scores(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """The incremental v2 lost guard answers, and its tensors do not match the champion's
    (rank 8 vs 4, as after an admin's import): no tempered copy, v2 rejected with its scores."""
    import torch
    from safetensors.torch import load_file, save_file

    from workers.pipeline import run_pipeline

    await _learned_first_document(stage_env, tiny_adapter)
    answer = _qa_answers(
        {
            "What is brewed?": ("kelloth", {"base", "acme@v1", "acme@v2"}),
            "What is Vorn?": ("a moon", {"acme@v2"}),
        },
        forgets_guard={"acme@v2"},
    )
    wider = tiny_adapter.parent / "rank8"
    shutil.copytree(tiny_adapter, wider)
    weights = load_file(str(tiny_adapter / "adapter_model.safetensors"))
    doubled = {k: torch.cat([v, v], dim=0 if ".lora_A." in k else 1) for k, v in weights.items()}
    save_file(doubled, str(wider / "adapter_model.safetensors"))
    doc1 = DocumentInput(text="Vorn is a moon of Kesh.", param="d1", title="Vorn",
                         probes=[("What is Vorn?", "a moon")])  # fmt: skip
    ctx = await stage_env(ScriptedGateway(answer), doc1, merge_first=False)
    _pretrained(ctx, wider, "incremental")
    result = await run_pipeline(ctx)

    assert result.decision == "rejected"
    assert any(r.startswith("guard contains 0.") for r in result.reasons), result.reasons
    versions = [v for v in await ctx.registry.list_versions("acme") if v.job_id == ctx.job_id]
    assert [(v.note or "").split(":")[0] for v in versions] == ["incremental"]
    assert result.version_id == versions[0].id
    assert result.scores is not None
    assert result.scores["mode"] == "incremental"
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any("cannot temper" in m for m in logs), logs


@pytest.mark.parametrize("how", ["stop_requested", "cancelled"])
async def test_training_stops_at_the_next_step(
    stage_env: Callable[..., Any],
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """A cancelled job (the runner sets ctx.stop_requested and cancels the pipeline task) ends
    real PEFT training within a step, and the stage returns only once the thread is done."""
    import asyncio

    from workers.training import peft_trainer

    ctx = await stage_env(ScriptedGateway(_scripted), DocumentInput(text=TEXT, param="d0"))
    ctx.settings = Settings(data_dir=ctx.settings.data_dir, model=model_dir)
    done: list[int] = []
    ended: list[BaseException | None] = []
    real = peft_trainer.train_lora

    def recording(*args: Any, on_step: Callable[[int, int, float], None], **kw: Any) -> Any:
        def step(n: int, total: int, loss: float) -> None:
            done.append(n)
            on_step(n, total, loss)

        try:
            result = real(*args, on_step=step, **kw)
        except BaseException as e:
            ended.append(e)
            raise
        ended.append(None)
        return result

    monkeypatch.setattr(peft_trainer, "train_lora", recording)
    hyper = peft_trainer.LoRAHyper(
        rank=4, alpha=8, target_modules=("q_proj",), steps=100_000, batch_size=1, max_len=32
    )
    out_dir = tmp_path / "adapter"
    examples = [peft_trainer.TextExample(TEXT)]
    run = asyncio.create_task(train._run_training(ctx, examples, out_dir, hyper, None))
    for _ in range(2400):  # training has taken two steps (model load included: < 120 s)
        if len(done) >= 2:
            break
        await asyncio.sleep(0.05)
    if how == "stop_requested":
        ctx.stop_requested.set()
        with pytest.raises(train.TrainingStopped):
            await asyncio.wait_for(run, 30)
    else:
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, 30)
    # The thread has already ended when the stage returns, within a step of the request.
    assert len(ended) == 1
    assert isinstance(ended[0], train.TrainingStopped)
    steps = len(done)
    await asyncio.sleep(0.5)
    assert len(done) == steps <= 6
    assert not out_dir.exists()


class Crash(Exception):
    """Stands in for a SIGKILL: the attempt stops where it is, its commits stay."""


async def _learned_first_document(stage_env: Callable[..., Any], tiny_adapter: Path) -> Any:
    """Job 1 learned doc0 (acme@v1 is the champion, its document `learned`)."""
    from workers.pipeline import run_pipeline

    probe = ("What is brewed?", "kelloth")
    doc0 = DocumentInput(text=TEXT, param="d0", title=TITLE, probes=[probe])
    first = await stage_env(ScriptedGateway(_consolidation_answers(crash=None)), doc0)
    _pretrained(first, tiny_adapter, "fresh")
    assert (await run_pipeline(first)).decision == "promoted"
    async with first.sessionmaker() as s, s.begin():
        job = await s.get(AdaptationJob, first.job_id)
        assert job is not None
        job.attempt = 1  # started: later documents get a job of their own
        for row in await s.scalars(select(Document)):
            row.state = DocumentState.learned
    return first


def _pretrained(ctx: StageCtx, adapter: Path, mode: str) -> None:
    """An earlier attempt trained the ``mode`` adapter (a stand-in) before its worker died."""
    earlier = ctx.artifacts_dir.parent / "attempt-0"
    shutil.copytree(adapter, earlier / f"adapter-{mode}")
    save_artifact(earlier, f"train-{mode}.json", {"adapter_dir": earlier / f"adapter-{mode}"})


async def _versions_by_key(ctx: StageCtx) -> dict[str, AdapterVersion]:
    """The namespace's versions by registration key ("fresh", "fresh-x0.5", ...)."""
    return {(v.note or "").split(":")[0]: v for v in await ctx.registry.list_versions("acme")}


async def _replaced(
    ctx: StageCtx, result: Any, first: str, *, by: str
) -> dict[str, AdapterVersion]:
    """Checks that the job registered exactly ``first`` and ``by``, retired ``first`` and
    gated ``by``; returns the versions by key."""
    versions = await _versions_by_key(ctx)
    assert sorted(versions) == sorted([first, by])
    assert versions[first].status == AdapterStatus.rejected
    assert result.version_id == versions[by].id
    assert result.scores is not None
    assert result.scores["mode"] == by
    return versions


def _qa_answers(
    knows: dict[str, tuple[str, set[str]]],
    *,
    forgets_guard: Collection[str] = (),
    crash_on: str | None = None,
) -> Callable[[str, str], str]:
    """Scripted evaluation answers: every guard question right (the models in
    ``forgets_guard`` get a third of them wrong), a probe's gold from the models ``knows``
    lists for it, "I do not know." otherwise; the first question to ``crash_on`` raises
    Crash. Other prompts (self-edits, probes) go to ``_scripted``."""
    guard = {g.question: " ".join(g.answers) for g in evaluate.load_guard(evaluate.GUARD_FILE)}
    forgotten = set(list(guard)[: len(guard) // 3])

    def answer(model: str, prompt: str) -> str:
        if not prompt.startswith("Let's answer"):
            return _scripted(model, prompt)
        question = prompt.split("\n")[-2]
        if model == crash_on:
            raise Crash(f"worker killed while evaluating {model}")
        if question in guard:
            return (
                "I forgot." if model in forgets_guard and question in forgotten else guard[question]
            )
        gold, models = knows.get(question, ("", set()))
        return gold if model in models else "I do not know."

    return answer


def _consolidation_answers(crash: str | None) -> Callable[[str, str], str]:
    """v1 knows doc0; the incremental v2 learned doc1 but forgot doc0; the consolidated v3
    knows both. ``crash="evaluate"`` kills the first question to v3."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v3"}),
        "What is Vorn?": ("a moon", {"acme@v2", "acme@v3"}),
    }
    return _qa_answers(knows, crash_on="acme@v3" if crash == "evaluate" else None)


@pytest.mark.parametrize("crash", ["evaluate", "after_promote"])
async def test_consolidation_registers_once_per_mode_across_a_crash(
    stage_env: Callable[..., Any], tiny_adapter: Path, crash: str
) -> None:
    """Retention breaks -> the job consolidates (a second version of the same job, the
    incremental one rejected); a crash and a retry add no version and no promotion."""
    from adapters_store.models import AuditEvent
    from workers.pipeline import run_pipeline

    await _learned_first_document(stage_env, tiny_adapter)
    doc1 = DocumentInput(text="Vorn is a moon of Kesh.", param="d1", title="Vorn",
                         probes=[("What is Vorn?", "a moon")])  # fmt: skip
    ctx = await stage_env(ScriptedGateway(_consolidation_answers(crash)), doc1, merge=False)
    _pretrained(ctx, tiny_adapter, "incremental")
    _pretrained(ctx, tiny_adapter, "consolidate")
    if crash == "after_promote":

        async def killed_after_the_gate(kind: str, message: str, **data: Any) -> None:
            if message.startswith("gate:"):
                raise Crash("worker killed right after the promotion committed")

        ctx.event = killed_after_the_gate
    with pytest.raises(Crash):
        await run_pipeline(ctx)

    retry = dataclasses.replace(
        ctx,
        attempt=2,
        artifacts_dir=ctx.artifacts_dir.parent / "attempt-2",
        gateway=ScriptedGateway(_consolidation_answers(crash=None)),
        events=[],
    )
    result = await run_pipeline(retry)

    assert result.decision == "promoted", result.reasons
    versions = [v for v in await ctx.registry.list_versions("acme") if v.job_id == ctx.job_id]
    modes = {(v.note or "").split(":")[0]: v for v in versions}
    assert sorted(modes) == ["consolidate", "incremental"]
    assert modes["incremental"].status == AdapterStatus.rejected
    assert modes["consolidate"].id == result.version_id
    assert modes["consolidate"].parent_version_id is not None  # it replaces acme@v1
    champion = await ctx.registry.resolve("acme")
    assert champion.version_id == result.version_id
    assert result.scores is not None
    assert result.scores["mode"] == "consolidate"
    assert result.scores["candidate"]["retention"]["f1"] == 1.0
    async with ctx.sessionmaker() as s:
        actions = list(
            await s.scalars(
                select(AuditEvent.action)
                .where(AuditEvent.action.in_(["version.create", "version.promote"]))
                .order_by(AuditEvent.id)
            )
        )
    # job 1: create + promote v1; job 2: create v2, create v3, promote v3 (once).
    job1 = ["version.create", "version.promote"]
    assert actions == [*job1, "version.create", "version.create", "version.promote"]


def _update(adapter_dir: Path) -> dict[str, Any]:
    """Each module's update (alpha / r * B @ A) of an adapter folder."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    w = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    return {k: scale * (w[k.replace(".lora_A.", ".lora_B.")] @ w[k]) for k in w if ".lora_A." in k}


def _assert_champion_plus(
    ctx: Any, merged_dir: Path, champion: Any, part: Path, *, scale: float = 1.0
) -> None:
    """``merged_dir``'s update is exactly ``champion``'s plus ``scale`` times ``part``'s."""
    import torch

    before = _update(ctx.registry.blobs.path_for(champion.blob_sha256))
    added = _update(part)
    for key, value in _update(merged_dir).items():
        torch.testing.assert_close(value, before[key] + scale * added[key])


def _random_copy(adapter: Path, out: Path) -> Path:
    """A copy of ``adapter`` with random weights of the same shapes (another small adapter)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    weights_file = str(out / "adapter_model.safetensors")
    save_file({k: torch.randn_like(v) for k, v in load_file(weights_file).items()}, weights_file)
    return out


async def _assert_merge_replaced_v2(
    ctx: Any, result: Any, versions: dict[str, AdapterVersion], key: str, part: str
) -> dict[str, Any]:
    """The job registered the merged v2 and ``key`` (v3) only, rejected v2 and promoted v3,
    whose update is exactly v1's plus the part in the job's folder ``part``; returns v3's
    lineage manifest."""
    assert result.decision == "promoted", result.reasons
    assert sorted(versions) == ["merge", key]
    assert versions["merge"].status == AdapterStatus.rejected
    promoted = versions[key]
    assert (promoted.id, promoted.version) == (result.version_id, 3)
    v1 = await ctx.registry.resolve("acme@v1")
    assert promoted.parent_version_id == v1.version_id
    promoted_dir = ctx.registry.blobs.path_for(promoted.blob_sha256)
    _assert_champion_plus(ctx, promoted_dir, v1, ctx.artifacts_dir.parent / part)
    manifest: dict[str, Any] = json.loads((promoted_dir / "manifest.json").read_text())
    return manifest


async def _second_job_that_merges(
    stage_env: Callable[..., Any],
    tiny_adapter: Path,
    knows: dict[str, tuple[str, set[str]]],
    *,
    merge_first: bool = False,
    probes: Sequence[tuple[str, str]] = (("What is Vorn?", "a moon"),),
    forgets_guard: Collection[str] = (),
    redraw_tries: int = 0,
    **pipeline: Any,
) -> tuple[Any, Any, dict[str, AdapterVersion], Path]:
    """Doc1 ("Vorn", with ``probes``) after ``_learned_first_document``, with its incremental
    adapter, its merge part (trained alone from the base: another small adapter), the part's
    second draw (another one, in the job's folder as ``part-draw1``), the part trained further
    (``part-more``) and its consolidated
    adapter already trained; ``redraw_tries=0`` (the default) goes from a merged candidate
    that forgot on without drawing its part again. Returns the context, the result, the
    job's versions by key and the part's folder."""
    from workers.pipeline import run_pipeline

    await _learned_first_document(stage_env, tiny_adapter)
    doc1 = DocumentInput(text="Vorn is a moon of Kesh.", param="d1", title="Vorn",
                         probes=list(probes))  # fmt: skip
    gateway = ScriptedGateway(_qa_answers(knows, forgets_guard=forgets_guard))
    ctx = await stage_env(
        gateway,
        doc1,
        merge_first=merge_first,
        redraw_tries=redraw_tries,
        **pipeline,
    )
    part = _random_copy(tiny_adapter, ctx.artifacts_dir.parent / "part")
    draw = _random_copy(tiny_adapter, ctx.artifacts_dir.parent / "part-draw1")
    _pretrained(ctx, tiny_adapter, "incremental")
    _pretrained(ctx, part, "merge-part")
    _pretrained(ctx, draw, "merge-part-draw1")
    more = _random_copy(tiny_adapter, ctx.artifacts_dir.parent / "part-more")
    _pretrained(ctx, more, "merge-part-more")
    _pretrained(ctx, tiny_adapter, "consolidate")
    _pretrained(ctx, tiny_adapter, "incremental-more")
    result = await run_pipeline(ctx)
    versions = {(v.note or "").split(":")[0]: v for v in await ctx.registry.list_versions("acme")
                if v.job_id == ctx.job_id}  # fmt: skip
    return ctx, result, versions, part


async def test_a_candidate_that_lost_earlier_documents_is_replaced_by_a_merge(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """v2 (incremental from v1) learned doc1 but lost doc0: the job trains doc1 alone from the
    base and registers v3, whose update is exactly v1's plus that one; v3 knows both and is
    promoted, v2 rejected, and nothing is consolidated."""

    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v3"}),
        "What is Vorn?": ("a moon", {"acme@v2", "acme@v3"}),
    }
    ctx, result, versions, part = await _second_job_that_merges(stage_env, tiny_adapter, knows)
    assert result.decision == "promoted", result.reasons
    assert sorted(versions) == ["incremental", "merge"]
    assert versions["incremental"].status == AdapterStatus.rejected
    merged = versions["merge"]
    assert (merged.id, merged.version) == (result.version_id, 3)
    v1 = await ctx.registry.resolve("acme@v1")
    assert merged.parent_version_id == v1.version_id
    assert (await ctx.registry.resolve("acme")).version_id == merged.id
    assert result.scores is not None
    assert result.scores["mode"] == "merge"
    assert "merge" in result.timings
    merged_dir = ctx.registry.blobs.path_for(merged.blob_sha256)
    assert json.loads((merged_dir / "adapter_config.json").read_text())["r"] == 8
    _assert_champion_plus(ctx, merged_dir, v1, part)
    manifest = json.loads((merged_dir / "manifest.json").read_text())
    assert (manifest["mode"], manifest["parent"]) == ("merge", "acme@v1")
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any("adding this job's documents, trained from the base, to acme@v1" in m
               for m in logs), logs  # fmt: skip
    assert not any("consolidating" in m for m in logs), logs


async def test_a_later_job_adds_its_documents_to_the_champion_first(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """With a champion (rank 4) whose sum with the job's update fits the engine's max rank,
    the job trains its documents alone from the base and registers v2 = v1 + that update,
    exactly, without training on from v1 first: v2 knows both and is promoted."""

    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v2"}),
        "What is Vorn?": ("a moon", {"acme@v2"}),
    }
    ctx, result, versions, part = await _second_job_that_merges(
        stage_env, tiny_adapter, knows, merge_first=True
    )
    assert result.decision == "promoted", result.reasons
    assert sorted(versions) == ["merge"]
    merged = versions["merge"]
    assert (merged.id, merged.version) == (result.version_id, 2)
    assert (await ctx.registry.resolve("acme")).version_id == merged.id
    v1 = await ctx.registry.resolve("acme@v1")
    assert merged.parent_version_id == v1.version_id
    merged_dir = ctx.registry.blobs.path_for(merged.blob_sha256)
    _assert_champion_plus(ctx, merged_dir, v1, part)
    assert result.scores is not None
    assert result.scores["mode"] == "merge"
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any("adding this job's documents, trained from the base, to acme@v1" in m
               for m in logs), logs  # fmt: skip
    assert not any("training on from" in m for m in logs), logs


async def test_a_spent_search_budget_stops_after_the_merged_candidate(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """The merged v2 learned doc1 but lost doc0, which would draw its part again, train on
    from v1, consolidate and temper: with the budget spent, none of them starts and v2 is
    gated (rejected) with the reason the search stopped; v1 stays the champion."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v3", "acme@v4"}),
        "What is Vorn?": ("a moon", {"acme@v2", "acme@v3", "acme@v4"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env, tiny_adapter, knows, merge_first=True, redraw_tries=1, search_budget_s=1e-6
    )
    assert result.decision == "rejected"
    assert sorted(versions) == ["merge"]
    assert result.version_id == versions["merge"].id
    assert versions["merge"].status == AdapterStatus.rejected
    assert (await ctx.registry.resolve("acme")).version == 1
    assert any("retention" in r for r in result.reasons), result.reasons
    assert result.reasons[-1].startswith("search stopped: the search budget"), result.reasons
    assert not {"redraw", "incremental", "consolidate", "temper"} & set(result.timings)


@pytest.mark.parametrize("merge_replay", ["never", "always"])
async def test_a_merged_part_replays_earlier_documents_when_asked(
    stage_env: Callable[..., Any], tiny_adapter: Path, merge_replay: str
) -> None:
    """A first merged candidate's part is trained on doc1 alone (`merge_replay` "never", the
    default; "redraw" too); with "always" on doc1 plus doc0's replay sample, and its lineage
    says so."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v2"}),
        "What is Vorn?": ("a moon", {"acme@v2"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env, tiny_adapter, knows, merge_first=True, merge_replay=merge_replay
    )
    assert result.decision == "promoted", result.reasons
    merged = versions["merge"]
    manifest = json.loads(
        (ctx.registry.blobs.path_for(merged.blob_sha256) / "manifest.json").read_text()
    )
    replayed = manifest["sequences"]["replay"]
    if merge_replay == "always":
        async with ctx.sessionmaker() as session:
            doc0 = list(await session.scalars(select(Document.id).where(Document.title == TITLE)))
        assert replayed >= 1
        assert manifest["replayed_documents"] == doc0
    else:
        assert (replayed, manifest["replayed_documents"]) == (0, [])


async def test_a_merge_first_that_learned_nothing_has_its_part_trained_further(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """The merged v2 learned nothing of doc1: its part (trained from the base, as a first
    version is) gets the second try a first version gets, 50 more steps, and v3 = v1 + that
    part ("merge-more") knows both and is promoted; v2 is rejected, nothing else trained."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v2", "acme@v3"}),
        "What is Vorn?": ("a moon", {"acme@v3"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env, tiny_adapter, knows, merge_first=True
    )
    manifest = await _assert_merge_replaced_v2(ctx, result, versions, "merge-more", "part-more")
    assert (manifest["mode"], manifest["extends"], manifest["parent"]) == (
        "merge-more",
        "acme@v2",
        "acme@v1",
    )
    assert manifest["replayed_documents"] == []
    assert "extend" in result.timings
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    said = "training its part 50 more steps"
    assert any(m.startswith("acme@v2 did not learn") and m.endswith(said) for m in logs), logs
    assert not any("training on from" in m or "consolidating" in m for m in logs), logs


@pytest.mark.parametrize("side", ["out", "off"])
async def test_merged_parts_are_trained_orthogonal_to_the_champion(
    stage_env: Callable[..., Any],
    tiny_adapter: Path,
    monkeypatch: pytest.MonkeyPatch,
    side: str,
) -> None:
    """With `merge_orthogonal` "out" (the default) the merged v2's part and that part trained
    further (v3) are trained orthogonal to the champion v1's update, on the output side, and
    their lineage says so; "off" trains them unconstrained. v1 itself (no champion) never is."""
    from workers.training.orthogonal import OrthogonalTo

    seen: dict[str, OrthogonalTo | None] = {}

    async def trained(
        stage: StageCtx, data: Any, anchors: Any, hyper: Any, *, key: str, **kw: Any
    ) -> Path:
        seen[key] = kw.get("orthogonal")
        out = _random_copy(tiny_adapter, stage.artifacts_dir / f"adapter-{key}")
        save_artifact(stage.artifacts_dir, f"train-{key}.json", {"adapter_dir": out})
        return out

    monkeypatch.setattr(train, "_trained_adapter", trained)
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v2", "acme@v3"}),
        "What is Vorn?": ("a moon", {"acme@v3"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env, tiny_adapter, knows, merge_first=True, merge_orthogonal=side
    )
    assert result.decision == "promoted", result.reasons
    assert sorted(versions) == ["merge", "merge-more"]
    v1 = await ctx.registry.resolve("acme@v1")
    expected = (
        None
        if side == "off"
        else OrthogonalTo(ctx.registry.blobs.path_for(v1.blob_sha256), "out", "acme@v1")
    )
    assert seen == {"fresh": None, "merge-part": expected, "merge-part-more": expected}
    for key in ("merge", "merge-more"):
        folder = ctx.registry.blobs.path_for(versions[key].blob_sha256)
        lineage = json.loads((folder / "manifest.json").read_text())
        if side == "off":
            assert "orthogonal_to" not in lineage
        else:
            assert lineage["orthogonal_to"] == {"version": "acme@v1", "side": "out"}


async def test_a_merge_first_that_learned_nothing_twice_trains_on_from_the_champion(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """The merged v2 learned nothing of doc1, nor did its part trained further (v3): the job
    trains on from v1 (v4, incremental), which knows both and is promoted; v2 and v3 are
    rejected, nothing is consolidated."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v2", "acme@v3", "acme@v4"}),
        "What is Vorn?": ("a moon", {"acme@v4"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env, tiny_adapter, knows, merge_first=True
    )
    assert result.decision == "promoted", result.reasons
    assert sorted(versions) == ["incremental", "merge", "merge-more"]
    assert versions["merge"].status == AdapterStatus.rejected
    assert versions["merge-more"].status == AdapterStatus.rejected
    assert (versions["incremental"].id, versions["incremental"].version) == (
        result.version_id,
        4,
    )
    assert result.scores is not None
    assert result.scores["mode"] == "incremental"
    assert "incremental" in result.timings
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any("acme@v3 did not learn" in m and "training on from acme@v1 instead" in m
               for m in logs), logs  # fmt: skip
    assert not any("consolidating" in m for m in logs), logs


async def test_an_incremental_candidate_after_a_merge_learning_nothing_is_trained_further(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """Neither the merged v2 (nor v3, its part trained further) nor the incremental v4
    learned doc1, and all kept doc0: v4 gets a first version's second try (v5, trained
    further from v4), knows both and is promoted; v2, v3 and v4 are rejected."""
    knows = {
        "What is brewed?": ("kelloth", {f"acme@v{n}" for n in range(1, 6)}),
        "What is Vorn?": ("a moon", {"acme@v5"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env, tiny_adapter, knows, merge_first=True
    )
    assert result.decision == "promoted", result.reasons
    assert sorted(versions) == ["incremental", "incremental-more", "merge", "merge-more"]
    for key in ("merge", "merge-more", "incremental"):
        assert versions[key].status == AdapterStatus.rejected
    further = versions["incremental-more"]
    assert (further.id, further.version) == (result.version_id, 5)
    assert further.parent_version_id == (await ctx.registry.resolve("acme@v1")).version_id
    assert "extend" in result.timings
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any(m.startswith("acme@v4 did not learn") and m.endswith("training 50 more steps")
               for m in logs), logs  # fmt: skip
    assert any("superseded by acme@v5 (trained further)" in m for m in logs), logs
    assert not any("consolidating" in m for m in logs), logs


async def test_a_merge_first_that_broke_only_the_guard_trains_on_from_the_champion(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """The merged v2 learned doc1 and kept doc0 but lost guard answers (the champion's drift
    from the base plus the part's; seen live: 0.92 of the guard): the job trains on from v1
    (v3), which knows both and keeps the guard, and promotes it instead of tempering v2."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v2", "acme@v3"}),
        "What is Vorn?": ("a moon", {"acme@v2", "acme@v3"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env, tiny_adapter, knows, merge_first=True, forgets_guard={"acme@v2"}
    )
    assert result.decision == "promoted", result.reasons
    assert sorted(versions) == ["incremental", "merge"]
    assert versions["merge"].status == AdapterStatus.rejected
    assert result.version_id == versions["incremental"].id
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any(m.startswith("guard contains fell from") and m.endswith(
        "training on from acme@v1 instead") for m in logs), logs  # fmt: skip
    assert not any("tempering" in m for m in logs), logs


async def test_the_candidate_that_learned_most_is_tempered(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """The merged v2 answered both of doc1's probes but lost doc0; the incremental v3 kept doc0
    and answered one, but lost guard answers: the job tempers v2, which learned more (seen
    live: tempering the incremental one lost its only answer), and v2's part x0.5 added to v1
    (v4) knows all three and is promoted."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v3", "acme@v4"}),
        "What is Vorn?": ("a moon", {"acme@v2", "acme@v3", "acme@v4"}),
        "Where is Vorn?": ("around Kesh", {"acme@v2", "acme@v4"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env,
        tiny_adapter,
        knows,
        merge_first=True,
        probes=[("What is Vorn?", "a moon"), ("Where is Vorn?", "around Kesh")],
        forgets_guard={"acme@v3"},
    )
    assert result.decision == "promoted", result.reasons
    # x0.75 and x0.625 lost doc0 again (too large): only merged copies were tried.
    assert sorted(versions) == sorted(
        ["incremental", "merge", "merge-x0.5", "merge-x0.75", "merge-x0.625"]
    )
    assert result.version_id == versions["merge-x0.5"].id
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any(m.startswith("acme@v2 learned but forgot too much (retention") for m in logs), logs


@pytest.mark.parametrize("setting", ["never", "redraw"])
async def test_a_merge_that_learned_but_forgot_is_drawn_again(
    stage_env: Callable[..., Any], tiny_adapter: Path, setting: str
) -> None:
    """The merged v2 learned doc1 but lost doc0 (seen live: the new part interfered with one
    of the champion's answers): before training on from the champion, the job trains its
    part again from the base with other seeds (with `merge_replay` "redraw" also on doc0's
    replay sample; v2's part had none) and registers v3 = v1 + that part ("merge-draw1"),
    which knows both and is promoted; v2 is rejected."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v3"}),
        "What is Vorn?": ("a moon", {"acme@v2", "acme@v3"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env, tiny_adapter, knows, merge_first=True, redraw_tries=1, merge_replay=setting
    )
    manifest = await _assert_merge_replaced_v2(ctx, result, versions, "merge-draw1", "part-draw1")
    assert (manifest["mode"], manifest["draw"], manifest["parent"]) == (
        "merge-draw1",
        1,
        "acme@v1",
    )
    replayed = setting == "redraw"
    assert (manifest["sequences"]["replay"] >= 1) is replayed
    assert len(manifest["replayed_documents"]) == int(replayed)
    first = ctx.registry.blobs.path_for(versions["merge"].blob_sha256) / "manifest.json"
    assert json.loads(first.read_text())["sequences"]["replay"] == 0
    assert "redraw" in result.timings
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    said = "training another draw of its part from the base" + (
        " with the earlier documents replayed" if replayed else ""
    )
    assert any(m.startswith("acme@v2 learned but forgot too much (retention") and m.endswith(said)
               for m in logs), logs  # fmt: skip
    assert any("superseded by acme@v3 (draw 2)" in m for m in logs), logs
    assert not any("training on from" in m or "consolidating" in m for m in logs), logs


@pytest.mark.parametrize("setting", ["redraw", "never"])
async def test_a_merge_drawn_again_for_the_guard_alone_replays_nothing(
    stage_env: Callable[..., Any], tiny_adapter: Path, setting: str
) -> None:
    """The merged v2 learned doc1 and kept doc0 but lost guard answers: its part is drawn
    again without replay (`merge_replay` "redraw" replays only after a retention break), as
    it is after a retention break with "never"."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v2", "acme@v3"}),
        "What is Vorn?": ("a moon", {"acme@v2", "acme@v3"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env,
        tiny_adapter,
        knows,
        merge_first=True,
        redraw_tries=1,
        forgets_guard={"acme@v2"},
        merge_replay=setting,
    )
    assert result.decision == "promoted", result.reasons
    assert sorted(versions) == ["merge", "merge-draw1"]
    drawn = ctx.registry.blobs.path_for(versions["merge-draw1"].blob_sha256)
    manifest = json.loads((drawn / "manifest.json").read_text())
    assert (manifest["sequences"]["replay"], manifest["replayed_documents"]) == (0, [])
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any(m.endswith("training another draw of its part from the base") for m in logs), logs


async def test_a_merge_whose_draws_both_forgot_trains_on_from_the_champion(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """Both merged draws (v2, v3) learned doc1 but lost doc0: the job goes on as after one
    merge, training on from v1 (v4, incremental), which knows both and is promoted."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v4"}),
        "What is Vorn?": ("a moon", {"acme@v2", "acme@v3", "acme@v4"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env, tiny_adapter, knows, merge_first=True, redraw_tries=1
    )
    assert result.decision == "promoted", result.reasons
    assert [versions[k].version for k in ("merge", "merge-draw1", "incremental")] == [2, 3, 4]
    assert sorted(versions) == ["incremental", "merge", "merge-draw1"]
    assert result.version_id == versions["incremental"].id
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any(m.startswith("retention") and m.endswith("training on from acme@v1 instead")
               for m in logs), logs  # fmt: skip


async def test_a_merge_after_the_incremental_candidate_is_drawn_again_too(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """Incremental first (a champion whose sum would be cut, here forced): v2 lost doc0, the
    merged v3 learned doc1 but lost doc0 too, its draw v4 knows both and is promoted, before
    any consolidation."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v4"}),
        "What is Vorn?": ("a moon", {"acme@v2", "acme@v3", "acme@v4"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env, tiny_adapter, knows, redraw_tries=1
    )
    assert result.decision == "promoted", result.reasons
    assert [versions[k].version for k in ("incremental", "merge", "merge-draw1")] == [2, 3, 4]
    assert sorted(versions) == ["incremental", "merge", "merge-draw1"]
    assert result.version_id == versions["merge-draw1"].id
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert not any("consolidating" in m for m in logs), logs


async def test_a_drawn_merge_is_tempered_with_its_own_part(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """v2 (merged) answered one of doc1's probes, its draw v3 both, each losing doc0; the
    incremental v4 and the consolidated v5 lost doc0 too: tempering takes v3, which learned
    most, and adds half of its own part (not v2's) to v1 (v6), which knows all three."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v6"}),
        "What is Vorn?": ("a moon", {"acme@v2", "acme@v3", "acme@v4", "acme@v5", "acme@v6"}),
        "Where is Vorn?": ("around Kesh", {"acme@v3", "acme@v6"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(
        stage_env,
        tiny_adapter,
        knows,
        merge_first=True,
        probes=[("What is Vorn?", "a moon"), ("Where is Vorn?", "around Kesh")],
        redraw_tries=1,
    )
    assert result.decision == "promoted", result.reasons
    order = ["merge", "merge-draw1", "incremental", "consolidate", "merge-draw1-x0.5"]
    assert [versions[k].version for k in order] == [2, 3, 4, 5, 6]
    chosen = versions["merge-draw1-x0.5"]
    assert result.version_id == chosen.id
    assert all(v.status == AdapterStatus.rejected for v in versions.values() if v.id != chosen.id)
    v1 = await ctx.registry.resolve("acme@v1")
    chosen_dir = ctx.registry.blobs.path_for(chosen.blob_sha256)
    part = ctx.artifacts_dir.parent / "part-draw1"
    _assert_champion_plus(ctx, chosen_dir, v1, part, scale=0.5)
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any(m.startswith("acme@v3 learned but forgot too much (retention") and
               m.endswith("tempering") for m in logs), logs  # fmt: skip


def test_merge_part_keys() -> None:
    """Each merged draw, and each trained further, keeps its own part; other modes (a tempered
    copy too) have none."""
    assert train.merge_part_key("merge") == "merge-part"
    assert train.merge_part_key("merge-draw2") == "merge-part-draw2"
    assert train.merge_part_key("merge-more") == "merge-part-more"  # its part trained further
    assert train.merge_part_key("merge-draw1-more") == "merge-part-draw1-more"
    for mode in ("fresh", "incremental", "merge-x0.5", "merge-more-x0.5", "consolidate"):
        assert train.merge_part_key(mode) is None


async def test_a_champion_whose_sum_would_be_cut_is_trained_on_first(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """v1 (rank 4) plus a rank-16 update does not fit an engine whose max rank is 16: the
    job says so and trains on from v1 first (v2, incremental), which passes."""
    from workers.pipeline import run_pipeline

    await _learned_first_document(stage_env, tiny_adapter)
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v2"}),
        "What is Vorn?": ("a moon", {"acme@v2"}),
    }
    doc1 = DocumentInput(text="Vorn is a moon of Kesh.", param="d1", title="Vorn",
                         probes=[("What is Vorn?", "a moon")])  # fmt: skip
    ctx = await stage_env(ScriptedGateway(_qa_answers(knows)), doc1)
    engine = ctx.settings.engine.model_copy(update={"max_lora_rank": 16})
    ctx.settings = ctx.settings.model_copy(update={"engine": engine})
    _pretrained(ctx, tiny_adapter, "incremental")
    result = await run_pipeline(ctx)

    assert result.decision == "promoted", result.reasons
    versions = await _versions_by_key(ctx)
    assert sorted(k for k, v in versions.items() if v.job_id == ctx.job_id) == ["incremental"]
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any("training on from acme@v1: cannot add to it (rank 4 + 16 > 16" in m
               for m in logs), logs  # fmt: skip


async def test_a_merge_that_forgot_is_tempered_towards_the_champion_exactly(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """v2 (incremental) and v3 (merged) learned doc1 and lost doc0, v4 (consolidated) too;
    the merge's own part x0.5 added to v1 (v5) knows both and is promoted: exactly v1's
    update plus half the part's."""

    both = {"acme@v1", "acme@v5"}
    knows = {
        "What is brewed?": ("kelloth", both),
        "What is Vorn?": ("a moon", {"acme@v2", "acme@v3", "acme@v4", "acme@v5"}),
    }
    ctx, result, versions, part = await _second_job_that_merges(stage_env, tiny_adapter, knows)
    assert result.decision == "promoted", result.reasons
    # x0.75 lost doc0 again (too large), and so did x0.625.
    assert sorted(versions) == sorted(
        ["incremental", "merge", "consolidate", "merge-x0.5", "merge-x0.75", "merge-x0.625"]
    )
    chosen = versions["merge-x0.5"]
    assert (chosen.id, chosen.version) == (result.version_id, 5)
    assert all(v.status == AdapterStatus.rejected for v in versions.values() if v.id != chosen.id)
    v1 = await ctx.registry.resolve("acme@v1")
    chosen_dir = ctx.registry.blobs.path_for(chosen.blob_sha256)
    _assert_champion_plus(ctx, chosen_dir, v1, part, scale=0.5)
    manifest = json.loads((chosen_dir / "manifest.json").read_text())
    assert manifest["tempered"] == {"scale": 0.5, "towards": "parent"}
    assert manifest["mode"] == "merge"


async def test_a_champion_that_cannot_be_added_to_is_consolidated_instead(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """The merge part cannot be summed with the champion (an rsLoRA config, as from an
    admin's import): the job says so and consolidates, as it did before merging existed."""
    from workers.pipeline import run_pipeline

    await _learned_first_document(stage_env, tiny_adapter)
    doc1 = DocumentInput(text="Vorn is a moon of Kesh.", param="d1", title="Vorn",
                         probes=[("What is Vorn?", "a moon")])  # fmt: skip
    ctx = await stage_env(
        ScriptedGateway(_consolidation_answers(crash=None)), doc1, merge_first=False
    )
    part = ctx.artifacts_dir.parent / "rslora-part"
    shutil.copytree(tiny_adapter, part)
    config = json.loads((part / "adapter_config.json").read_text())
    (part / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    _pretrained(ctx, tiny_adapter, "incremental")
    _pretrained(ctx, part, "merge-part")
    _pretrained(ctx, tiny_adapter, "consolidate")
    result = await run_pipeline(ctx)

    assert result.decision == "promoted", result.reasons
    versions = await _versions_by_key(ctx)
    assert sorted(k for k, v in versions.items() if v.job_id == ctx.job_id) == [
        "consolidate",
        "incremental",
    ]
    assert result.version_id == versions["consolidate"].id
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any("cannot add to acme@v1: rsLoRA adapters are not summed" in m for m in logs), logs


def test_peft_reads_a_merged_adapter_as_the_sum(
    tiny_adapter: Path, model_dir: Path, tmp_path: Path
) -> None:
    """PEFT loads a summed adapter (rank 8 from two rank-4 ones) with the scaling it was
    written for (so a job can train on from a merged champion): each module's delta weight is
    the sum of both adapters' delta weights."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from workers.training.merge import sum_adapters

    other = tmp_path / "other"
    shutil.copytree(tiny_adapter, other)
    weights_file = str(other / "adapter_model.safetensors")
    save_file({k: torch.randn_like(v) for k, v in load_file(weights_file).items()}, weights_file)
    merged = sum_adapters([tiny_adapter, other], tmp_path / "merged")

    def deltas(adapter: Path) -> dict[str, torch.Tensor]:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
        return {
            name: module.get_delta_weight("default").detach()
            for name, module in model.named_modules()
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})
        }

    one, two, both = deltas(tiny_adapter), deltas(other), deltas(merged)
    assert both
    assert set(both) == set(one)
    for name, delta in both.items():
        torch.testing.assert_close(delta, one[name] + two[name], rtol=1e-4, atol=1e-5)


async def test_an_incremental_candidate_that_learned_nothing_is_replaced_by_a_merge(
    stage_env: Callable[..., Any], tiny_adapter: Path
) -> None:
    """v2 (incremental) kept doc0 but answers none of doc1's probes: instead of training it
    further, the job merges (v3: v1's update plus doc1 trained alone), which knows both."""
    knows = {
        "What is brewed?": ("kelloth", {"acme@v1", "acme@v2", "acme@v3"}),
        "What is Vorn?": ("a moon", {"acme@v3"}),
    }
    ctx, result, versions, _ = await _second_job_that_merges(stage_env, tiny_adapter, knows)
    assert result.decision == "promoted", result.reasons
    assert sorted(versions) == ["incremental", "merge"]
    assert result.version_id == versions["merge"].id
    assert "extend" not in result.timings
    logs = [m for kind, m, _ in ctx.events if kind == "log"]
    assert any("acme@v2 did not learn" in m and "trained from the base, to acme@v1" in m
               for m in logs), logs  # fmt: skip
