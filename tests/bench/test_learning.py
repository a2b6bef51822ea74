"""Fast tests of the learning benchmark's pure logic: scoring, bootstrap CIs, targets, data
loading, settings, the in-process chat client (fake engine) and the result files."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from app.engine.fake import FakeEngine
from app.settings import RestemSettings
from bench.learning import build_parser, finish
from bench.learning_engine import InProcessChat, adapter_key, lora_rank_limit
from bench.learning_restem import summarize_rounds
from bench.learning_run import ConditionRun, SquadPassage, load_passages, write_outputs
from bench.learning_stats import (
    ConditionScore,
    LearningResult,
    PassageScore,
    bootstrap_ci,
    check_targets,
    pooled,
    score_passage,
    summarize,
    table,
)
from workers.restem import FormatStats, GateOutcome, RestemResult, RoundResult, ScoredEdit
from workers.training.peft_trainer import LoRAHyper


def _passage(pid: str, values: list[float]) -> PassageScore:
    scores = tuple(values)
    return PassageScore(pid, f1=scores, em=scores, contains=scores)


def _condition(value: float, ci: tuple[float, float]) -> ConditionScore:
    return ConditionScore(
        f1=value,
        f1_ci=ci,
        em=value,
        em_ci=ci,
        contains=value,
        contains_ci=ci,
        n_questions=10,
        n_passages=2,
    )


def test_score_passage_uses_best_gold_and_squad_normalisation() -> None:
    score = score_passage(
        "p1",
        ["The Broncos won.", "It was in 1999", "no idea"],
        [["Denver Broncos", "Broncos"], ["1999"], ["Paris"]],
    )
    assert score.em == (0.0, 0.0, 0.0)
    assert score.contains == (1.0, 1.0, 0.0)
    assert score.f1[0] == pytest.approx(2 / 3)  # "broncos won" vs "broncos"
    assert score.f1[2] == 0.0
    assert score.n == 3


def test_pooled_weights_passages_by_question_count() -> None:
    scores = [_passage("a", [1.0]), _passage("b", [0.0, 0.0, 0.0])]
    assert pooled(scores, "f1") == pytest.approx(0.25)  # not the mean of passage means (0.5)


def test_bootstrap_ci_brackets_the_estimate_and_is_seeded() -> None:
    scores = [_passage(str(i), [float(i % 3 == 0), 0.5]) for i in range(20)]
    lo, hi = bootstrap_ci(scores, "f1", n_boot=500, seed=1)
    assert lo < pooled(scores, "f1") < hi
    assert bootstrap_ci(scores, "f1", n_boot=500, seed=1) == (lo, hi)


def test_bootstrap_ci_is_a_point_when_every_passage_scores_the_same() -> None:
    scores = [_passage(str(i), [0.5, 0.5]) for i in range(5)]
    lo, hi = bootstrap_ci(scores, "em", n_boot=200)
    assert lo == pytest.approx(0.5)
    assert hi == pytest.approx(0.5)


def test_bootstrap_ci_narrows_with_more_passages() -> None:
    few = [_passage(str(i), [float(i % 2)]) for i in range(6)]
    many = [_passage(str(i), [float(i % 2)]) for i in range(60)]
    width = [hi - lo for lo, hi in (bootstrap_ci(s, "f1", n_boot=1000) for s in (few, many))]
    assert width[1] < width[0]


def test_summarize_reports_scores_cis_counts_and_per_passage_means() -> None:
    result = summarize([_passage("a", [1.0, 0.0]), _passage("b", [1.0])], n_boot=200)
    assert result.f1 == pytest.approx(2 / 3)
    assert result.f1_ci[0] <= result.f1 <= result.f1_ci[1]
    assert (result.n_questions, result.n_passages) == (3, 2)
    assert result.per_passage["a"]["f1"] == pytest.approx(0.5)


def test_targets_need_disjoint_cis() -> None:
    conditions = {
        "base": _condition(0.05, (0.03, 0.07)),
        "passage": _condition(0.10, (0.08, 0.12)),
        "self_edit": _condition(0.13, (0.11, 0.15)),  # overlaps passage's CI
    }
    targets = check_targets(conditions, "f1")
    assert targets["passage_gt_base"] is True
    assert targets["self_edit_gt_passage"] is False
    assert targets["restem_2_gt_self_edit"] is None  # not run
    assert targets["best_over_passage"]["condition"] == "self_edit"
    assert targets["best_over_passage"]["relative_gain"] == pytest.approx(0.3)
    assert targets["gain_at_least_seal"] is False


def test_lora_rank_limit_picks_a_rank_vllm_accepts() -> None:
    assert lora_rank_limit(16, 16) == 16
    assert lora_rank_limit(16, 20) == 32
    assert lora_rank_limit(64) == 64


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


PASSAGE = {
    "id": "p1",
    "title": "Super Bowl 50",
    "context": "Thomas Davis broke his arm.",
    "questions": [{"question": "Who broke his arm?", "answers": ["Thomas Davis"]}],
}


def test_load_passages_limit_and_doc_view(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [PASSAGE, {**PASSAGE, "id": "p2"}])
    passages = load_passages(path, limit=1)
    assert [p.id for p in passages] == ["p1"]
    doc = passages[0].as_doc()
    assert (doc.title, doc.probes[0].answer) == ("Super Bowl 50", "Thomas Davis")
    assert passages[0].items()[0].answers == ("Thomas Davis",)


def test_load_passages_names_the_bad_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [PASSAGE, {**PASSAGE, "questions": []}])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not a passage"):
        load_passages(path)


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    data = _write_jsonl(tmp_path / "d.jsonl", [PASSAGE])
    return finish(
        build_parser().parse_args(
            [
                "--data",
                str(data),
                "--train",
                str(data),
                "--model",
                str(tmp_path / "model"),
                "--out-dir",
                str(tmp_path / "out"),
                "--name",
                "t",
                *extra,
            ]
        )
    )


def test_settings_flags_reach_hyperparameters_restem_and_the_cache_key(tmp_path: Path) -> None:
    args = _args(tmp_path, "--rank", "32", "--restem-docs", "7", "--restem", "policy_lr=0.001")
    assert (args.hyper.rank, args.restem_settings.docs) == (32, 7)
    assert args.restem_settings.policy_lr == pytest.approx(1e-3)
    other = _args(tmp_path, "--rank", "16")
    assert args.work_dir != other.work_dir  # different settings never share cached adapters
    same_but_named = _args(
        tmp_path,
        "--rank",
        "32",
        "--restem-docs",
        "7",
        "--restem",
        "policy_lr=0.001",
        "--name",
        "other",
    )
    assert same_but_named.work_dir == args.work_dir


def test_settings_reject_a_malformed_pair(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--prompt expects KEY=VALUE"):
        _args(tmp_path, "--prompt", "no-equals-sign")


async def test_in_process_chat_routes_adapters_by_name(tmp_path: Path) -> None:
    engine = FakeEngine(ready=False)
    chat = InProcessChat(engine)
    assert not engine.ready  # a run whose conditions are all cached never starts it
    chat.add_adapter("a", tmp_path / "a")
    texts = await chat.chat("a", [{"role": "user", "content": "hi"}], max_tokens=3, n=2)
    assert engine.ready
    assert len(texts) == 2
    assert all(t.strip() for t in texts)
    assert engine.requests[-1][2] is not None
    assert engine.requests[-1][2].path == tmp_path / "a"
    await chat.chat("base", [{"role": "user", "content": "hi"}], max_tokens=2)
    assert engine.requests[-1][2] is None
    with pytest.raises(ValueError, match="already bound"):
        chat.add_adapter("a", tmp_path / "other")
    chat.remove_adapter("a")
    with pytest.raises(ValueError, match="unknown model"):
        await chat.chat("a", [{"role": "user", "content": "hi"}])


def test_write_outputs_json_matches_the_schema(tmp_path: Path) -> None:
    args = _args(tmp_path, "--n-boot", "100")
    passages = [SquadPassage.model_validate(PASSAGE)]

    class _Bench:  # write_outputs reads only the passages and their scores
        def __init__(self) -> None:
            self.passages = passages

        def scores(self, answers: list[list[str]]) -> list[PassageScore]:
            golds = [i.answers for i in passages[0].items()]
            return [score_passage("p1", answers[0], golds)]

    runs = {
        "base": ConditionRun(passages=["p1"], answers=[["I do not know."]], seconds=1.0),
        "in_context": ConditionRun(passages=["p1"], answers=[["Thomas Davis!"]], seconds=2.0),
    }
    not_run = {"restem_1": "the ReSTEM run failed: RuntimeError: x"}
    result = write_outputs(args, _Bench(), runs, not_run, {}, 0.0)  # type: ignore[arg-type]
    doc = json.loads((tmp_path / "out" / "t.json").read_text())
    assert LearningResult.model_validate(doc) == result
    for name in ("base", "in_context"):
        row = doc["conditions"][name]
        assert {"f1", "f1_ci", "em", "contains", "n_questions"} <= set(row)
    assert doc["conditions"]["in_context"]["contains"] == 1.0
    assert doc["conditions"]["base"]["contains"] == 0.0
    assert doc["not_run"] == not_run
    assert doc["n_passages"] == 1
    assert (tmp_path / "out" / "t.png").stat().st_size > 0
    answers = json.loads((tmp_path / "out" / "t-answers.json").read_text())
    assert answers["base"]["p1"]["replies"] == ["I do not know."]
    assert "not run" in table(result)


def _round(index: int, decision: str) -> RoundResult:
    edit = ScoredEdit("d1", "rewrite", "prompt", "text", rewards=(0.2,))
    return RoundResult(
        round_index=index,
        policy=None,
        documents=["d1"],
        edits=[edit, ScoredEdit("d1", "self_qa", "prompt", "x", reason="empty")],
        winners={"d1": edit},
        baselines={},
        candidate=f"policy-r{index}",
        gate=GateOutcome(decision, 0.0, 0.1, "test"),  # type: ignore[arg-type]
    )


def test_summarize_rounds_policy_in_force_and_format_stats_per_round(tmp_path: Path) -> None:
    settings = RestemSettings(formats=["rewrite", "self_qa"])
    result = RestemResult(
        rounds=[_round(0, "rejected"), _round(1, "promoted")],
        policy="policy-r1",
        format_stats=FormatStats(["rewrite", "self_qa"]),
    )
    paths = {"policy-r0": tmp_path / "r0", "policy-r1": tmp_path / "r1"}
    promoted = summarize_rounds(result, paths, settings, use="promoted")["after_round"]
    assert [r["policy"] for r in promoted] == [None, "policy-r1"]  # round 1 was rejected
    assert promoted[1]["path"] == str(tmp_path / "r1")
    assert promoted[0]["format_stats"]["rewrite"]["count"] == 1
    assert promoted[1]["format_stats"]["rewrite"]["wins"] == 2
    assert promoted[1]["format_stats"]["self_qa"]["degenerate"] == 2
    candidate = summarize_rounds(result, paths, settings, use="candidate")["after_round"]
    assert [r["policy"] for r in candidate] == ["policy-r0", "policy-r1"]


def test_adapter_key_is_a_content_address() -> None:
    hyper = LoRAHyper(steps=15)
    key = adapter_key(["T\\npassage"], hyper)
    assert adapter_key(["T\\npassage"], replace(hyper, num_threads=1)) == key  # same weights
    assert adapter_key(["T\\npassage", "T\\nfact"], hyper) != key
    assert adapter_key(["T\\npassage"], replace(hyper, lr=5e-4)) != key
