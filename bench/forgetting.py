"""Forgetting benchmark: what a pipeline-style training run of one document costs the guard set.

For each variant (a JSON list of overrides: ``kl``, ``anchor_fraction``, ``lr``, ``rank``,
``alpha``, ``targets``, ``max_steps``, ``epochs``, ``sched``, ``threads``, ``seed``,
``edits``, ``sentences``, ``max_edit_segments``) a fresh LoRA is trained from the base the way
the train stage builds a job (`build_training_set`: passage, its sentences, <= 4 self-edit
lines; base-model anchor answers per sequence, `sample_anchors`), then the in-process engine
answers, without the document, its held-out questions and the bundled guard set
(`app/data/guard_qa.jsonl`, greedy, 64 tokens). Self-edits (sampled once from the base model
with the pipeline's prompts) and the anchor answers are cached in ``--work-dir``, so variants
differ only in what they set. One JSON row per variant is appended to ``--out``: guard and
probe scores, the guard answers that flipped from right to wrong, steps and training seconds.

Run from the repo root: ``.venv/bin/python -m bench.forgetting --variants V.json``
(default: the variants behind the README's table).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from app.signals import exit_on_sigterm

logger = logging.getLogger("bench.forgetting")
RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parent / "data" / "made_up_facts.jsonl"
DEFAULT_VARIANTS: list[dict[str, Any]] = [
    {"name": "ce_anchors_af1", "kl": 0.0, "anchor_fraction": 1.0},
    {"name": "kl1_af1", "kl": 1.0, "anchor_fraction": 1.0},
    {"name": "kl1_af2", "kl": 1.0, "anchor_fraction": 2.0},
    {"name": "kl1_af4", "kl": 1.0, "anchor_fraction": 4.0},
]


async def run(args: argparse.Namespace, variants: list[dict[str, Any]]) -> None:
    from app.model_prep import resolve_model_dir
    from app.settings import Settings
    from bench.doc_training import (
        WorkCache,
        anchor_pairs,
        job_examples,
        kept_self_edits,
        load_doc,
        start_engine,
        variant_hyper,
    )
    from workers.metrics import best_of, score_answers
    from workers.tasks.evaluate import GUARD_FILE, EvalItem, answer_all, load_guard
    from workers.training.datasets import DocumentData, build_training_set
    from workers.training.peft_trainer import train_lora

    doc = load_doc(args.data, args.doc)
    model_dir = args.model or resolve_model_dir(Settings(), progress=False)
    engine, chat = start_engine(model_dir)
    limit = asyncio.Semaphore(64)
    guard = load_guard(args.guard or GUARD_FILE)
    cache = WorkCache(args.work_dir)

    async def base_guard() -> list[str]:
        return await answer_all(chat, "base", guard, max_tokens=64, limit=limit)

    try:
        kept = await kept_self_edits(chat, doc, cache)
        pairs = await anchor_pairs(chat, cache, limit)
        # Keyed by the guard file's content: another --guard must not reuse these answers.
        guard_key = hashlib.sha256((args.guard or GUARD_FILE).read_bytes()).hexdigest()[:16]
        base = await cache.get(f"base_guard-{guard_key}.json", base_guard)
        probes = [EvalItem(doc.title, p.question, (p.answer,)) for p in doc.probes]
        for v in variants:
            seed = int(v.get("seed", 0))
            data = build_training_set(
                [DocumentData(doc.title, doc.text, tuple(kept) if v.get("edits", True) else ())],
                sentences=v.get("sentences", True),
                max_edit_segments=v.get("max_edit_segments", 4),
                seed=seed,
            )
            examples = job_examples(
                data.sequences, pairs, anchor_fraction=v.get("anchor_fraction", 2.0), seed=seed
            )
            hyper = variant_hyper(v, len(examples), seed=seed)
            out = args.work_dir / "adapters" / f"{v['name']}-{time.time_ns()}"
            started = time.monotonic()
            result = await asyncio.to_thread(train_lora, model_dir, examples, out, hyper)
            train_s = time.monotonic() - started
            chat.add_adapter(v["name"], out)
            guard_answers = await answer_all(chat, v["name"], guard, max_tokens=64, limit=limit)
            probe_answers = await answer_all(chat, v["name"], probes, max_tokens=64, limit=limit)
            g = score_answers((a, i.answers) for a, i in zip(guard_answers, guard, strict=True))
            p = score_answers((a, i.answers) for a, i in zip(probe_answers, probes, strict=True))
            flips = [
                (i.question, b, a)
                for i, b, a in zip(guard, base, guard_answers, strict=True)
                if best_of(b, i.answers)[2] and not best_of(a, i.answers)[2]
            ]
            record = {
                "name": v["name"],
                "v": v,
                "doc": doc.id,
                "n_seq": len(data.sequences),
                "anchors": len(examples) - len(data.sequences),
                "steps": hyper.steps,
                "train_s": round(train_s, 1),
                "loss": result.final_loss,
                "guard": g.contains,
                "probe_contains": p.contains,
                "probe_f1": p.f1,
                "probe_answers": probe_answers,
                "flips": flips,
            }
            logger.info("%s", json.dumps({k: record[k] for k in list(record)[:12] if k != "v"}))
            with args.out.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
    finally:
        await engine.shutdown()


def main() -> None:
    exit_on_sigterm()
    p = argparse.ArgumentParser(prog="python -m bench.forgetting", description=__doc__)
    p.add_argument("--variants", type=Path, help="JSON list of variants; default: README's")
    p.add_argument("--data", type=Path, default=DATA, help="SQuAD-schema JSONL")
    p.add_argument("--doc", type=int, default=0, help="index of the document in --data")
    p.add_argument("--model", type=Path, help="HF model dir (default: bundled)")
    p.add_argument("--guard", type=Path, help="guard QA JSONL (default: bundled)")
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache/selfadapt-bench/forget")
    p.add_argument("--out", type=Path, default=RESULTS / "forgetting.jsonl")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    variants = json.loads(args.variants.read_text()) if args.variants else DEFAULT_VARIANTS
    asyncio.run(run(args, variants))


if __name__ == "__main__":
    main()
