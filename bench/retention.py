"""Retention benchmark: does a second document's incremental training keep the first one?

The pipeline's second job in a namespace trains the champion (an adapter that learned document
A) on document B plus a replay sample of A's sequences. This benchmark does exactly that in
process, several times per variant (seeds change the replay draw, the anchors and the step
order), and asks every result A's and B's held-out questions without context, as the
evaluate stage does: greedy answers for token-F1, and a question counts as answered when the
greedy answer and enough sampled ones contain the gold answer (the gate's firm-answer rule).
A run "passes" when it would clear the registry's default gate on new knowledge and retention:
B's F1 above the champion's and at least one more B question answered, A's F1 down by at most
``max_forgetting``. The guard set is not asked (`bench.forgetting` measures it).

A variant is a JSON object: ``name`` plus overrides of ``replay_fraction``,
``replay_passages``, ``anchor_fraction``, ``merge`` (true: B trained from the base, its
update summed with A's, `workers.training.merge`; alone, or with A's replay sample when
``merge_replay`` is true), ``stack`` (the same, B trained on top of A's adapter folded into
the weights, `train_lora(stack_on_dir=)`), ``extend_steps`` (a run that did not learn B
is trained that many steps more, as the pipeline trains such a candidate further; the row
keeps what it answered before under ``before_extending``),
``hold_earlier`` (with ``stack``: KL anchors on A's self-QA questions, held to the
champion's answers, `held_answers`), ``orthogonal`` (with ``merge``: B's part kept orthogonal
to A's adapter on the ``in``put side of each module, the ``out``put side or ``both``,
`workers.training.orthogonal`) and the LoRA keys
`bench.doc_training.variant_hyper` reads. Document A's adapter is trained once (pipeline
defaults) and kept in ``--work-dir``. Writes ``--out`` (default
``bench/results/retention.json``) after every run.

Run from the repo root: ``.venv/bin/python -m bench.retention --seeds 4``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.signals import exit_on_sigterm
from bench.live import machine
from workers.training.orthogonal import SIDES, OrthogonalTo

if TYPE_CHECKING:
    from bench.learning_engine import InProcessChat
    from workers.tasks.common import Doc
    from workers.tasks.evaluate import EvalItem, FirmRule
    from workers.tasks.promote import GateResult

logger = logging.getLogger("bench.retention")
RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parent / "data" / "made_up_facts.jsonl"
DEFAULT_VARIANTS: list[dict[str, Any]] = [
    {"name": "uniform_replay", "replay_passages": False},
    {"name": "passages_first", "replay_passages": True},
]


@dataclass(frozen=True)
class Asked:
    """One adapter's answers to one document's questions."""

    f1: float
    answered: int
    n: int


async def ask(
    chat: InProcessChat, model: str, items: list[EvalItem], rule: FirmRule | None
) -> Asked:
    from workers.metrics import score_answers
    from workers.tasks.evaluate import answer_firmly, answered

    limit = asyncio.Semaphore(32)
    greedy, hits = await answer_firmly(chat, model, items, rule=rule, max_tokens=64, limit=limit)
    score = score_answers((a, i.answers) for a, i in zip(greedy, items, strict=True))
    return Asked(round(score.f1, 4), answered(hits, rule), len(items))


QUESTION_LINE = re.compile(r"^\**Question \d+:\**\s*(.+?)\s*$", re.MULTILINE)


async def held_answers(chat: InProcessChat, doc: Doc, edits: list[str]) -> list[tuple[str, str]]:
    """(prompt, the champion's greedy answer) for each question of ``doc``'s self-QA
    self-edits, asked without the document as the evaluation asks (the document's probes,
    held out, left out): KL anchors that hold a part trained on top of the champion to what
    it answered about the earlier document (learning without forgetting)."""
    from workers.tasks.common import qa_messages

    probes = {p.question.strip().lower() for p in doc.probes}
    questions = dict.fromkeys(q for e in edits for q in QUESTION_LINE.findall(e))
    held = []
    for question in (q for q in questions if q.lower() not in probes):
        messages = qa_messages(doc.title, question)
        (answer,) = await chat.chat("champion", messages, max_tokens=64)
        if answer.strip():
            held.append((messages[0]["content"], answer.strip()))
    return held


def orthogonal_to(variant: dict[str, Any], champion_dir: Path) -> OrthogonalTo | None:
    """How a variant's part is kept orthogonal to the champion (None: it is not)."""
    side = variant.get("orthogonal")
    return OrthogonalTo(champion_dir, side, "champion") if side else None


def gate_scores(champion: dict[str, Asked], run: dict[str, Asked]) -> dict[str, Any]:
    """The champion's and a run's answers as the scores the pipeline's gate reads: B as the
    new documents, A as the earlier ones (A's answered share counted firmly, as the bench asks
    it; the pipeline counts retention answers greedily), no guard (`bench/forgetting.py`)."""

    def row(model: str, asked: dict[str, Asked]) -> dict[str, Any]:
        a, b = asked["A"], asked["B"]
        return {
            "model": model,
            "new": {"f1": b.f1, "n": b.n, "answered": b.answered},
            "retention": {"f1": a.f1, "contains": a.answered / max(a.n, 1), "n": a.n},
        }

    return {
        "metrics": {"gate": "f1", "guard": "contains", "min_answered": 1},
        "base": {},
        "champion": row("champion", champion),
        "candidate": row("run", run),
    }


def _decide(
    champion: dict[str, Asked], run: dict[str, Asked], max_forgetting: float | None = None
) -> GateResult:
    """The gate's result (`GateResult`) at the registry's default thresholds."""
    from adapters_store.models import NamespaceSettings
    from workers.tasks.promote import decide

    gate = NamespaceSettings()
    if max_forgetting is not None:
        gate = gate.model_copy(update={"max_forgetting": max_forgetting})
    return decide(gate_scores(champion, run), gate)


def learned(champion: dict[str, Asked], run: dict[str, Asked]) -> bool:
    """The gate's new-knowledge rule on B: F1 above the champion's and one more answered."""
    return _decide(champion, run).learned


def passes(champion: dict[str, Asked], run: dict[str, Asked], max_forgetting: float) -> bool:
    """The registry's default gate (`workers.tasks.promote.decide`) on new knowledge (B) and
    retention (A), guard aside: A's F1 and the share of A's questions answered each down by
    at most ``max_forgetting``."""
    return _decide(champion, run, max_forgetting).passed


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: runs, gate passes, mean A/B answered and F1."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        rows = [r for r in runs if r["variant"] == name]
        out[name] = {
            "runs": len(rows),
            "passes": sum(r["passes"] for r in rows),
            "kept_every_a_answer": sum(
                r["A"]["answered"] >= r["champion_a_answered"] for r in rows
            ),
            "a_answered_mean": statistics.fmean(r["A"]["answered"] for r in rows),
            "b_answered_mean": statistics.fmean(r["B"]["answered"] for r in rows),
            "a_f1_mean": round(statistics.fmean(r["A"]["f1"] for r in rows), 4),
            "b_f1_mean": round(statistics.fmean(r["B"]["f1"] for r in rows), 4),
            "train_s_mean": round(statistics.fmean(r["train_s"] for r in rows), 1),
            "extended": sum("before_extending" in r for r in rows),
        }
    return out


async def run(args: argparse.Namespace, variants: list[dict[str, Any]]) -> None:
    from dataclasses import asdict, replace

    from adapters_store.models import NamespaceSettings
    from app.model_prep import resolve_model_dir
    from app.settings import Settings
    from bench import doc_training as dt
    from workers.tasks.evaluate import EvalItem, firm_rule
    from workers.training.datasets import DocumentData, build_training_set
    from workers.training.merge import sum_adapters
    from workers.training.peft_trainer import ChatExample, train_lora

    settings = Settings()
    pipeline = settings.pipeline
    rule = firm_rule(settings)
    budget = NamespaceSettings().max_forgetting
    doc_a, doc_b = dt.load_doc(args.data, args.first), dt.load_doc(args.data, args.second)
    items = {
        key: [EvalItem(d.title, p.question, (p.answer,)) for p in d.probes]
        for key, d in (("A", doc_a), ("B", doc_b))
    }
    model_dir = args.model or resolve_model_dir(settings, progress=False)
    engine, chat = dt.start_engine(model_dir)
    cache = dt.WorkCache(args.work_dir)
    result: dict[str, Any] = {
        "first": doc_a.id,
        "second": doc_b.id,
        "firm": rule.describe() if rule else "greedy",
        "max_forgetting": budget,
        "variants": variants,
        "runs": [],
    }

    async def answers(model: str) -> dict[str, Asked]:
        return {key: await ask(chat, model, its, rule) for key, its in items.items()}

    async def answers_of(name: str, adapter: Path, *, summed: bool) -> dict[str, Asked]:
        """``adapter``'s answers (``summed``: A's adapter plus it)."""
        if summed:
            adapter = sum_adapters([first_dir, adapter], adapter.with_name(adapter.name + "-sum"))
        chat.add_adapter(name, adapter)
        try:
            return await answers(name)
        finally:
            chat.remove_adapter(name)

    try:
        pairs = await dt.anchor_pairs(chat, cache, asyncio.Semaphore(64))
        edits_a = await dt.kept_self_edits(chat, doc_a, cache)
        edits_b = await dt.kept_self_edits(chat, doc_b, cache)
        data_a = DocumentData(doc_a.title, doc_a.text, tuple(edits_a))
        data_b = DocumentData(doc_b.title, doc_b.text, tuple(edits_b))
        first_dir = args.work_dir / f"first-{doc_a.id}"
        if not (first_dir / "adapter_config.json").is_file():
            seqs = build_training_set([data_a], seed="first").sequences
            examples = dt.job_examples(
                seqs, pairs, anchor_fraction=pipeline.anchor_fraction, seed="first"
            )
            hyper = dt.variant_hyper({"threads": 2}, len(examples), seed=pipeline.seed)
            logger.info("training document A's adapter (%d steps)", hyper.steps)
            await asyncio.to_thread(train_lora, model_dir, examples, first_dir, hyper)
        chat.add_adapter("champion", first_dir)
        champion = await answers("champion")
        result["champion"] = {k: asdict(v) for k, v in champion.items()}
        logger.info("champion (A's adapter): %s", result["champion"])
        if champion["A"].answered == 0:
            logger.warning("the champion answers none of A's questions: retention is moot")
        held: list[tuple[str, str]] = []
        if any(v.get("hold_earlier") for v in variants):
            held = await held_answers(chat, doc_a, edits_a)
            result["held_earlier"] = [{"prompt": u, "answer": a} for u, a in held]
            logger.info("holding %d of the champion's answers on A's self-QA", len(held))
        for v in variants:
            for seed in range(args.seeds):
                merge = bool(v.get("merge"))  # B from the base, summed with A's
                stack = bool(v.get("stack"))  # B on top of A's (frozen), summed with A's
                replay = not (merge or stack) or bool(v.get("merge_replay"))
                data = build_training_set(
                    [data_b],
                    [data_a] if replay else [],
                    replay_fraction=v.get("replay_fraction", pipeline.replay_fraction),
                    replay_passages=v.get("replay_passages", pipeline.replay_passages),
                    max_edit_segments=pipeline.max_edit_segments,
                    seed=seed,
                )
                fraction = v.get("anchor_fraction", pipeline.anchor_fraction)
                examples = dt.job_examples(
                    data.sequences, pairs, anchor_fraction=fraction, seed=seed
                )
                if v.get("hold_earlier"):
                    examples += [ChatExample(u, a, anchor=True) for u, a in held]
                hyper = dt.variant_hyper({"threads": 2, **v}, len(examples), seed=seed)
                orthogonal = orthogonal_to(v, first_dir)
                out = args.work_dir / "adapters" / f"{v['name']}-{seed}-{time.time_ns()}"
                started = time.monotonic()
                trained = await asyncio.to_thread(
                    train_lora,
                    model_dir,
                    examples,
                    out,
                    hyper,
                    init_adapter_dir=None if merge or stack else first_dir,
                    stack_on_dir=first_dir if stack else None,
                    orthogonal=orthogonal,
                )
                train_s = time.monotonic() - started
                name = f"{v['name']}-{seed}"
                asked = await answers_of(name, out, summed=merge or stack)
                first_try: dict[str, Any] = {}
                more = int(v.get("extend_steps", 0))
                if more and not learned(champion, asked):
                    # As the pipeline trains a candidate that learned nothing further: the same
                    # examples, ``more`` steps from where it stopped, in another order.
                    first_try = {"before_extending": {k: asdict(a) for k, a in asked.items()}}
                    started = time.monotonic()
                    extended = out.with_name(out.name + "-more")
                    again = replace(hyper, steps=more, seed=hyper.seed + 1)
                    await asyncio.to_thread(
                        train_lora,
                        model_dir,
                        examples,
                        extended,
                        again,
                        init_adapter_dir=out,
                        stack_on_dir=first_dir if stack else None,
                        orthogonal=orthogonal,
                    )
                    train_s += time.monotonic() - started
                    asked = await answers_of(name + "-more", extended, summed=merge or stack)
                row = {
                    "variant": v["name"],
                    "seed": seed,
                    "sequences": data.sources,
                    "steps": hyper.steps,
                    "train_s": round(train_s, 1),
                    "loss": round(trained.final_loss, 4),
                    "A": asdict(asked["A"]),
                    "B": asdict(asked["B"]),
                    "champion_a_answered": champion["A"].answered,
                    "passes": passes(champion, asked, budget),
                    **first_try,
                }
                logger.info("%s", json.dumps(row))
                result["runs"].append(row)
                result["summary"] = summarize(result["runs"])
                result["machine"] = machine()
                args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        await engine.shutdown()
    for name, s in result.get("summary", {}).items():
        logger.info("%s: %s", name, json.dumps(s))


def main() -> None:
    exit_on_sigterm()
    p = argparse.ArgumentParser(prog="python -m bench.retention", description=__doc__)
    p.add_argument("--variants", type=Path, help="JSON list of variants (default: replay rules)")
    p.add_argument("--seeds", type=int, default=4, help="trainings per variant")
    p.add_argument("--data", type=Path, default=DATA, help="SQuAD-schema JSONL")
    p.add_argument("--first", type=int, default=0, help="document A's index in --data")
    p.add_argument("--second", type=int, default=1, help="document B's index in --data")
    p.add_argument("--model", type=Path, help="HF model dir (default: bundled)")
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache/selfadapt-bench/retain")
    p.add_argument("--out", type=Path, default=RESULTS / "retention.json")
    args = p.parse_args()
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    variants = json.loads(args.variants.read_text()) if args.variants else DEFAULT_VARIANTS
    if any(v.get("hold_earlier") and not v.get("stack") for v in variants):
        p.error("'hold_earlier' needs 'stack' (its anchors are held to the champion)")
    for v in variants:
        if v.get("orthogonal") and (not v.get("merge") or v["orthogonal"] not in SIDES):
            p.error(f"'orthogonal' needs 'merge' and one of {', '.join(SIDES)}: {v}")
    asyncio.run(run(args, variants))


if __name__ == "__main__":
    main()
