"""Evaluate stage: no-context QA through the gateway with each model pinned (base, champion,
candidate) on the new documents' probes, a retention sample of earlier probes and the guard set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.metrics import QAScore, best_of, score_answers
from workers.tasks.common import Doc, load_artifact, qa_messages, save_artifact

if TYPE_CHECKING:
    from adapters_store.registry import ResolvedVersion
    from app.settings import Settings
    from workers.gateway_client import ChatClient
    from workers.pipeline import StageContext
    from workers.tasks.history import LearnedDoc
    from workers.tasks.train import Candidate

logger = logging.getLogger(__name__)

GUARD_FILE = Path(__file__).resolve().parents[2] / "app" / "data" / "guard_qa.jsonl"
SETS = ("new", "retention", "guard")
REFERENCE_ARTIFACT = "reference_scores.json"
DETAIL_KEYS = ("answers", "samples")
"""Per-question detail kept in the job's artifacts, not in the stored scores."""


@dataclass(frozen=True)
class EvalItem:
    """One question asked without its document."""

    title: str
    question: str
    answers: tuple[str, ...]


def guard_path(settings: Settings) -> Path:
    return settings.pipeline.guard_path or GUARD_FILE


def load_guard(path: Path) -> list[EvalItem]:
    """The guard QA set: JSONL of {title, question, answers: [...]} (or answer: str)."""
    items = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            answers = row.get("answers") or [row["answer"]]
            items.append(EvalItem(row.get("title", ""), row["question"], tuple(answers)))
    return items


def probe_items(docs: Sequence[Doc]) -> list[EvalItem]:
    return [EvalItem(d.title, p.question, (p.answer,)) for d in docs for p in d.probes]


def build_eval_sets(
    ctx: StageContext, docs: Sequence[Doc], history: Sequence[LearnedDoc]
) -> dict[str, list[EvalItem]]:
    """new: this job's probes; retention: a sample of earlier probes spread over the earlier
    documents (`retention_sample`); guard."""
    return {
        "new": probe_items(docs),
        "retention": retention_sample(
            [h.doc for h in history], ctx.settings.pipeline.retention_sample, seed=ctx.job_id
        ),
        "guard": load_guard(guard_path(ctx.settings)),
    }


def retention_sample(earlier: Sequence[Doc], n: int, *, seed: str) -> list[EvalItem]:
    """Up to ``n`` of the earlier documents' probes, taken round-robin over the documents (in
    a seeded order, each one's probes in a seeded order): every earlier document is re-asked
    once before any is re-asked twice. A uniform draw of 8 of 24 earlier probes in the
    continual benchmark asked nothing of two documents that the promoted merge had halved.
    Seeded by the job, so every attempt of a job asks the same questions."""
    rng = random.Random(seed)
    queues = [probe_items([doc]) for doc in earlier]
    queues = [q for q in queues if q]
    for q in queues:
        rng.shuffle(q)
    rng.shuffle(queues)
    picked: list[EvalItem] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        picked.extend(q[depth] for q in queues if depth < len(q))
    return picked[:n]


async def answer_all(
    gateway: ChatClient,
    model: str,
    items: Sequence[EvalItem],
    *,
    max_tokens: int,
    limit: asyncio.Semaphore,
) -> list[str]:
    """Greedy answers of ``model`` to every item (concurrent; the engine batches them)."""

    async def one(item: EvalItem) -> str:
        async with limit:
            texts = await gateway.chat(
                model,
                qa_messages(item.title, item.question),
                temperature=0.0,
                max_tokens=max_tokens,
            )
            return texts[0]

    return list(await asyncio.gather(*(one(i) for i in items)))


@dataclass(frozen=True)
class FirmRule:
    """When an answer to a new probe counts as answered: the greedy answer contains the gold
    answer and so do at least ``need`` of ``samples`` answers sampled at ``temperature``.

    A greedy answer won by a thin margin is not one users reliably get: on a CPU engine in
    bf16 it can flip with the batch it is computed in. Sampling tests the margin.
    """

    samples: int
    temperature: float
    share: float

    @property
    def need(self) -> int:
        return max(1, math.ceil(self.share * self.samples - 1e-9))

    def describe(self) -> str:
        return f"greedy and >= {self.need} of {self.samples} samples at T={self.temperature:g}"


def firm_rule(settings: Settings) -> FirmRule | None:
    p = settings.pipeline
    if p.gate_firm_samples == 0:
        return None
    return FirmRule(p.gate_firm_samples, p.gate_firm_temperature, p.gate_firm_share)


def _seed(item: EvalItem) -> int:
    """One sampling seed per question (the same for every model, so they are compared on the
    same random draws)."""
    digest = hashlib.sha256(f"{item.title}\n{item.question}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


async def answer_firmly(
    gateway: ChatClient,
    model: str,
    items: Sequence[EvalItem],
    *,
    rule: FirmRule | None,
    max_tokens: int,
    limit: asyncio.Semaphore,
) -> tuple[list[str], list[int | None]]:
    """Greedy answers of ``model`` to every item and, for each item whose greedy answer
    contains a gold answer, how many of ``rule.samples`` sampled answers do too (None where
    the greedy answer missed; 0 without a rule). Each item is sampled as soon as its greedy
    answer is in, so the samples overlap the rest of the evaluation."""

    async def one(item: EvalItem) -> tuple[str, int | None]:
        (greedy,) = await answer_all(gateway, model, [item], max_tokens=max_tokens, limit=limit)
        if best_of(greedy, item.answers)[2] < 1.0:
            return greedy, None
        if rule is None:
            return greedy, 0
        async with limit:
            texts = await gateway.chat(
                model,
                qa_messages(item.title, item.question),
                temperature=rule.temperature,
                max_tokens=max_tokens,
                n=rule.samples,
                seed=_seed(item),
            )
        return greedy, sum(best_of(t, item.answers)[2] == 1.0 for t in texts)

    rows = await asyncio.gather(*(one(i) for i in items))
    return [greedy for greedy, _ in rows], [hits for _, hits in rows]


def answered(hits: Sequence[int | None], rule: FirmRule | None) -> int:
    """Items answered under ``rule`` given their sample hits (None: greedy missed)."""
    need = rule.need if rule is not None else 0
    return sum(h is not None and h >= need for h in hits)


async def _score(
    ctx: StageContext,
    model: str,
    sets: dict[str, list[EvalItem]],
    names: Sequence[str],
    limit: asyncio.Semaphore,
) -> dict[str, Any]:
    """Greedy scores of ``model`` on the named sets; on the new probes, also how many it
    answers firmly (see FirmRule)."""
    max_tokens = ctx.settings.pipeline.eval_max_tokens
    rule = firm_rule(ctx.settings)
    others = [name for name in names if name != "new"]

    async def new() -> tuple[list[str], list[int | None]] | None:
        if "new" not in names:
            return None
        return await answer_firmly(
            ctx.gateway, model, sets["new"], rule=rule, max_tokens=max_tokens, limit=limit
        )

    async def rest() -> list[list[str]]:
        return list(
            await asyncio.gather(
                *(
                    answer_all(ctx.gateway, model, sets[n], max_tokens=max_tokens, limit=limit)
                    for n in others
                )
            )
        )

    firm, plain = await asyncio.gather(new(), rest())
    preds_of = dict(zip(others, plain, strict=True))
    if firm is not None:
        preds_of["new"] = firm[0]
    out: dict[str, Any] = {"model": model}
    for name in names:
        preds = preds_of[name]
        score = score_answers((p, i.answers) for p, i in zip(preds, sets[name], strict=True))
        out[name] = score.as_dict()
        out.setdefault("answers", {})[name] = preds
    if firm is not None:
        hits = firm[1]
        out["new"]["answered"] = answered(hits, rule)
        if rule is not None:
            out["new"]["firm"] = rule.describe()
        out["samples"] = {"new": hits}
    return out


async def reference_scores(
    ctx: StageContext, sets: dict[str, list[EvalItem]], *, champion: ResolvedVersion | None
) -> dict[str, Any]:
    """Base and champion scores: they do not depend on the candidate, so the pipeline runs
    this while the candidate trains (the engine idles then, on its own core).

    The base's guard score is cached per base model and guard set; the champion's comes from
    its own evaluation when stored.
    """
    cached = load_artifact(ctx.artifacts_dir, REFERENCE_ARTIFACT)
    if cached is not None:
        return dict(cached)
    limit = asyncio.Semaphore(ctx.settings.pipeline.eval_concurrency)
    runs: dict[str, Any] = {}
    known: dict[str, dict[str, Any]] = {"base": {}, "champion": {}}
    guard_cache = _base_guard_cache(ctx, sets["guard"])
    base_sets = ["new", "retention"]
    if guard_cache.is_file():
        known["base"]["guard"] = json.loads(guard_cache.read_text())
    else:
        base_sets.append("guard")
    runs["base"] = _score(ctx, ctx.settings.engine.served_model_name, sets, base_sets, limit)
    if champion is not None:
        stored = await _stored_guard(ctx, champion, len(sets["guard"]))
        if stored:
            known["champion"]["guard"] = stored
        champion_sets = ["new", "retention"] if stored else list(SETS)
        runs["champion"] = _score(ctx, champion.name, sets, champion_sets, limit)
    results = dict(zip(runs, await asyncio.gather(*runs.values()), strict=True))
    reference: dict[str, Any] = {who: {**known[who], **row} for who, row in results.items()}
    if not guard_cache.is_file():
        save_artifact(guard_cache.parent, guard_cache.name, reference["base"]["guard"])
    reference.setdefault("champion", None)
    save_artifact(ctx.artifacts_dir, REFERENCE_ARTIFACT, reference)
    return reference


async def evaluate_stage(
    ctx: StageContext,
    sets: dict[str, list[EvalItem]],
    *,
    candidate: Candidate,
    reference: dict[str, Any],
) -> dict[str, Any]:
    """Scores the candidate (pinned as `ns@vN`) on every set and stores candidate, champion
    and base scores on the candidate version."""
    artifact = f"evaluate-v{candidate.version}.json"
    cached = load_artifact(ctx.artifacts_dir, artifact)
    if cached is not None:
        return dict(cached)
    limit = asyncio.Semaphore(ctx.settings.pipeline.eval_concurrency)
    scores = {
        "metrics": {
            "gate": ctx.settings.pipeline.gate_metric,
            "guard": ctx.settings.pipeline.guard_metric,
            "min_answered": ctx.settings.pipeline.gate_min_answered,
        },
        "mode": candidate.mode,
        "candidate": await _score(ctx, candidate.name, sets, SETS, limit),
        "champion": reference.get("champion"),
        "base": reference["base"],
    }
    for who in ("candidate", "champion", "base"):
        if (row := scores.get(who)) is not None:
            summary = f"{who} {row['model']}: {_summary(row)}"
            await ctx.event("metric", summary, who=who, **{k: row.get(k) for k in SETS})
    async with ctx.fenced():
        await ctx.registry.set_scores(candidate.version_id, without_answers(scores))
    save_artifact(ctx.artifacts_dir, artifact, scores)
    return scores


def _summary(row: dict[str, Any]) -> str:
    parts = []
    for name in SETS:
        if isinstance(row.get(name), dict) and row[name].get("n"):
            s = QAScore.from_dict(row[name])
            part = f"{name} f1={s.f1:.3f} em={s.em:.2f} contains={s.contains:.2f} n={s.n}"
            if "answered" in row[name]:
                part += f" answered={row[name]['answered']}"
            parts.append(part)
    return "; ".join(parts) or "no questions"


def without_answers(scores: dict[str, Any]) -> dict[str, Any]:
    """``scores`` without each model's per-question detail (``DETAIL_KEYS``)."""
    return {
        k: ({kk: vv for kk, vv in v.items() if kk not in DETAIL_KEYS} if isinstance(v, dict) else v)
        for k, v in scores.items()
    }


def _base_guard_cache(ctx: StageContext, items: list[EvalItem]) -> Path:
    """Where the base model's guard score is cached: it is constant for one base model,
    guard set and answer length."""
    payload = [
        ctx.registry.base_model,
        ctx.settings.pipeline.eval_max_tokens,
        [(i.title, i.question, i.answers) for i in items],
    ]
    key = hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]
    return ctx.settings.data_dir / "cache" / f"guard-base-{key}.json"


async def _stored_guard(
    ctx: StageContext, champion: ResolvedVersion, n: int
) -> dict[str, Any] | None:
    """The champion's guard score from its own evaluation, when it used this guard set."""
    try:
        row = await ctx.registry.get_version_by_id(champion.version_id)
    except Exception:  # stored scores are an optimisation; measuring is always correct
        logger.warning("cannot read the scores of %s", champion.name, exc_info=True)
        return None
    stored = ((row.scores or {}).get("candidate") or {}).get("guard")
    return stored if isinstance(stored, dict) and stored.get("n") == n else None
