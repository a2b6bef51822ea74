"""The ReSTEM loop's logic with scripted parts (fast): sampling plans, degenerate samples,
rewards over repeats, winners, policy training data, the held-out gate and format learning.
The same loop runs on the real engine and PEFT in test_restem_live.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from app.settings import RestemSettings
from tests.support.restem import (
    DOCS,
    GAIN,
    Recorder,
    ScriptedInnerLoop,
    ScriptedSampler,
    ScriptedTrainer,
)
from workers.restem import (
    PolicyRef,
    RestemLoop,
    RestemParts,
    RunShape,
    SampleRequest,
    SamplingOptions,
    split_documents,
)
from workers.tasks.common import Doc
from workers.tasks.synthesize import DEFAULT_PROMPTS, render_prompt


def _loop(**settings: Any) -> tuple[RestemLoop, ScriptedSampler, ScriptedInnerLoop,
                                    ScriptedTrainer, Recorder]:  # fmt: skip
    sampler, inner, trainer, recorder = (
        ScriptedSampler(), ScriptedInnerLoop(), ScriptedTrainer(), Recorder()
    )  # fmt: skip
    config = RestemSettings(**{"docs": 2, "samples": 4, "heldout_docs": 1, **settings})
    loop = RestemLoop(RestemParts(sampler, inner, trainer, recorder), config)
    return loop, sampler, inner, trainer, recorder


def test_split_documents_holds_out_documents_with_probes() -> None:
    no_probes = Doc("doc_x", "X", "Nothing to ask.")
    pool, heldout = split_documents([*DOCS, no_probes], heldout=1, seed=0)
    assert len(pool) == 3
    assert len(heldout) == 1
    assert no_probes not in pool
    assert {d.id for d in pool} | {heldout[0].id} == {d.id for d in DOCS}
    assert split_documents(DOCS, heldout=1, seed=0) == (pool, heldout)  # seeded
    only = split_documents(DOCS[:1], heldout=2, seed=0)
    assert only == ([DOCS[0]], [])  # one document: nothing to hold out


def test_documents_a_policy_was_trained_on_are_never_held_out() -> None:
    docs = [replace(DOCS[0], id=f"doc_{i:03d}") for i in range(40)]
    trained: set[str] = set()
    for n in range(2, len(docs) + 1):  # documents arrive one at a time; a job after each
        pool, heldout = split_documents(docs[:n], heldout=3, seed=7, trained=trained)
        assert not {d.id for d in heldout} & trained
        assert len(pool) + len(heldout) == n
        trained |= {d.id for d in pool[:2]}  # what this job's policy trained on
    # Without that record the hash order still keeps the held-out set stable over arrivals.
    first = {d.id for d in split_documents(docs[:10], heldout=3, seed=7)[1]}
    later = {d.id for d in split_documents(docs, heldout=3, seed=7)[1]}
    assert len(first) == len(later) == 3
    assert later <= first | {d.id for d in docs[10:]}


async def test_round_rewards_select_winners_and_train_the_policy() -> None:
    loop, _, inner, trainer, recorder = _loop(rounds=1, repeats=2)
    result = await loop.run(DOCS, policy=None)
    (round0,) = result.rounds
    assert len(round0.documents) == 2
    assert not set(round0.documents) & set(result.heldout)
    # Every non-degenerate sample was trained `repeats` times; degenerate ones never.
    trained = [e for e in round0.edits if e.trained]
    assert all(e.reason == "empty" for e in round0.edits if not e.trained)
    assert len([t for t in inner.trials if t[0] in round0.documents]) == 2 * len(trained)
    for edit in trained:
        expected = max(v for f, v in GAIN.items() if f.replace("_", " ") in edit.text) + 0.01
        assert edit.reward == pytest.approx(expected)  # mean of +0 and +0.02 noise
    # Winners: the best edit of each document, only where its reward is positive.
    for doc_id, winner in round0.winners.items():
        assert winner.reward == max(e.reward or 0 for e in round0.edits if e.doc_id == doc_id)
        assert (winner.reward or 0) > 0
    # Behaviour cloning data: the rendered self-edit prompt -> the kept self-edit.
    (examples,) = trainer.examples
    assert len(examples) == len(round0.winners)
    by_doc = {d.id: d for d in DOCS}
    for ex in examples:
        assert ex.completion == round0.winners[ex.document_id].text
        assert ex.prompt == render_prompt(DEFAULT_PROMPTS[ex.format], by_doc[ex.document_id])
    assert trainer.parents == [None]
    assert round0.candidate == "policy0"
    kinds = [m for k, m, _ in recorder.events if k == "metric"]
    assert any("reward" in m for m in kinds)
    assert recorder.fractions == sorted(recorder.fractions)
    assert recorder.fractions[-1] == 1.0


async def test_gate_promotes_a_better_policy_and_next_round_samples_from_it() -> None:
    loop, sampler, inner, trainer, _ = _loop(rounds=2)
    inner.good_policies = {"policy0"}  # the first trained policy writes better self-edits
    result = await loop.run(DOCS, policy=None)
    first, second = result.rounds
    assert first.gate is not None
    assert first.gate.decision == "promoted", first.gate.reason
    assert first.gate.after is not None
    assert first.gate.before is not None
    assert first.gate.after > first.gate.before
    assert trainer.parents == [None, "policy0"]
    assert {p for p, doc, _, _ in sampler.calls if doc in second.documents} >= {"policy0"}
    assert second.gate is not None
    assert second.gate.decision == "rejected"  # policy1 is no better than policy0
    assert result.policy == "policy0"
    # Held-out self-edits of the current policy are measured once, then reused.
    heldout = result.heldout[0]
    policies = [p for p, doc, _, _ in sampler.calls if doc == heldout]
    assert policies.count(None) == 4  # base: one request per format, made once
    # Training documents never include the held-out one.
    assert all(heldout not in r.documents for r in result.rounds)


async def test_gate_rejects_a_policy_that_does_not_help() -> None:
    loop, *_ = _loop(rounds=1)
    result = await loop.run(DOCS, policy="acme-policy@v1")
    gate = result.rounds[0].gate
    assert gate is not None
    assert gate.decision == "rejected"
    assert "gain +0.0000 <=" in gate.reason
    assert result.policy == "acme-policy@v1"


async def test_without_heldout_documents_the_policy_waits_for_review() -> None:
    loop, *_ = _loop(rounds=1, heldout_docs=0)
    result = await loop.run(DOCS, policy=None)
    gate = result.rounds[0].gate
    assert gate is not None
    assert gate.decision == "pending_review"
    assert result.policy is None


async def test_no_winner_means_no_policy_training() -> None:
    loop, _, _, trainer, _ = _loop(rounds=1, formats=["implications", "self_qa"])
    result = await loop.run(DOCS, policy=None)
    assert result.rounds[0].winners == {}
    assert result.rounds[0].candidate is None
    assert result.rounds[0].gate is None
    assert trainer.examples == []


class _BlankFirstSampler(ScriptedSampler):
    """The first request of every document comes back blank (a degenerate draw)."""

    def __init__(self) -> None:
        super().__init__()
        self.blanked: set[str] = set()

    async def sample(
        self, policy: PolicyRef, request: SampleRequest, options: SamplingOptions
    ) -> list[str]:
        texts = await super().sample(policy, request, options)
        if request.doc.id in self.blanked:
            return texts
        self.blanked.add(request.doc.id)
        return [""] * request.n


@pytest.mark.parametrize("resamples", [0, 1])
async def test_a_document_with_only_degenerate_samples_is_sampled_again(resamples: int) -> None:
    sampler, inner, trainer, recorder = (
        _BlankFirstSampler(), ScriptedInnerLoop(), ScriptedTrainer(), Recorder()
    )  # fmt: skip
    config = RestemSettings(
        docs=2, samples=1, heldout_docs=1, formats=["rewrite"], resamples=resamples
    )
    loop = RestemLoop(RestemParts(sampler, inner, trainer, recorder), config)
    result = await loop.run(DOCS, policy=None)
    (round0,) = result.rounds
    if resamples == 0:  # one blank draw per document: nothing to train the policy on
        assert round0.winners == {}
        assert round0.candidate is None
        return
    # Each document: its blank draw (kept in the round, counted against its format), then a
    # second draw that trains and wins.
    for doc_id in round0.documents:
        edits = [e for e in round0.edits if e.doc_id == doc_id]
        assert [e.reason for e in edits] == ["empty", None]
        assert round0.winners[doc_id] is edits[1]
    assert result.format_stats.as_json()["rewrite"]["degenerate"] == 2
    assert round0.candidate == "policy0"
    logs = [m for k, m, _ in recorder.events if k == "log"]
    assert any("no usable self-edit for 2 document(s); sampling them again" in m for m in logs)
    assert recorder.fractions == sorted(recorder.fractions)
    assert recorder.fractions[-1] == 1.0


async def test_format_weights_learn_the_winning_format() -> None:
    loop, *_ = _loop(rounds=3, docs=3, heldout_docs=1, format_exploration=0.1)
    result = await loop.run(DOCS, policy=None)
    weights = result.format_stats.weights(exploration=0.1, temperature=0.05)
    assert max(weights, key=lambda f: weights[f]) == "rewrite"
    stats = result.format_stats.as_json()
    assert stats["rewrite"]["wins"] >= 1
    assert stats["self_qa"]["degenerate"] == stats["self_qa"]["count"]
    # Later rounds sample the winner more often than the first round did.
    counts = [sum(fmt == "rewrite" for e in r.edits for fmt in [e.format]) for r in result.rounds]
    assert counts[-1] >= counts[0]


async def test_loop_refuses_documents_without_probes_and_unknown_formats() -> None:
    loop, *_ = _loop()
    with pytest.raises(ValueError, match="probes"):
        await loop.run([Doc("d", "T", "text")], policy=None)
    with pytest.raises(ValueError, match="no prompt"):
        _loop(formats=["haiku"])


def test_run_shape_from_settings() -> None:
    assert RunShape.of(RestemSettings(rounds=2, docs=3, samples=4)) == RunShape(2, 3, 4)
