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
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


async def run(args: argparse.Namespace, variants: list[dict[str, Any]]) -> None:
    from app.engine.local import LocalEngine
    from app.model_prep import resolve_model_dir
    from app.settings import EngineSettings, PipelineSettings, Settings
    from bench.learning_engine import InProcessChat
    from workers.metrics import best_of, score_answers
    from workers.tasks.anchors import load_anchor_prompts, sample_anchors
    from workers.tasks.common import Doc, Probe
    from workers.tasks.evaluate import GUARD_FILE, EvalItem, answer_all, load_guard
    from workers.tasks.synthesize import generate_self_edits
    from workers.training.datasets import DocumentData, build_training_set, plan_steps
    from workers.training.peft_trainer import ChatExample, LoRAHyper, TextExample, train_lora

    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    row = rows[args.doc]
    doc = Doc(
        row["id"],
        row["title"],
        row["context"],
        tuple(Probe(q["question"], q["answers"][0]) for q in row["questions"]),
    )
    model_dir = args.model or resolve_model_dir(Settings(), progress=False)
    engine = LocalEngine(
        model_dir,
        EngineSettings(max_loras=8, max_cpu_loras=32, max_lora_rank=32, kv_cache_space_gib=2),
    )
    chat = InProcessChat(engine)
    limit = asyncio.Semaphore(64)
    guard = load_guard(args.guard or GUARD_FILE)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)

    async def cached(name: str, make: Any) -> Any:
        path = work / name
        if path.is_file():
            return json.loads(path.read_text())
        value = await make()
        path.write_text(json.dumps(value))
        return value

    async def edits() -> list[str]:
        samples = await generate_self_edits(chat, [doc], PipelineSettings(), model="base")
        return [s.text for s in samples if s.kept]

    async def anchors() -> list[list[str]]:
        prompts = load_anchor_prompts()

        async def one(p: str) -> str:
            async with limit:
                texts = await chat.chat("base", [{"role": "user", "content": p}], max_tokens=64)
                return texts[0].strip()

        answers = await asyncio.gather(*(one(p) for p in prompts))
        return [[p, a] for p, a in zip(prompts, answers, strict=True) if a]

    async def base_guard() -> list[str]:
        return await answer_all(chat, "base", guard, max_tokens=64, limit=limit)

    try:
        kept = await cached(f"edits-{doc.id}.json", edits)
        pairs = [tuple(p) for p in await cached("anchors.json", anchors)]
        # Keyed by the guard file's content: another --guard must not reuse these answers.
        guard_key = hashlib.sha256((args.guard or GUARD_FILE).read_bytes()).hexdigest()[:16]
        base = await cached(f"base_guard-{guard_key}.json", base_guard)
        probes = [EvalItem(doc.title, p.question, (p.answer,)) for p in doc.probes]
        for v in variants:
            seed = int(v.get("seed", 0))
            data = build_training_set(
                [DocumentData(doc.title, doc.text, tuple(kept) if v.get("edits", True) else ())],
                sentences=v.get("sentences", True),
                max_edit_segments=v.get("max_edit_segments", 4),
                seed=seed,
            )
            chosen = sample_anchors(
                pairs, len(data.sequences), v.get("anchor_fraction", 2.0), seed=str(seed)
            )
            examples: list[TextExample | ChatExample] = [TextExample(s) for s in data.sequences]
            examples += [ChatExample(u, a, anchor=True) for u, a in chosen]
            steps = plan_steps(
                len(examples),
                epochs=v.get("epochs", 10),
                batch_size=1,
                max_steps=v.get("max_steps", 100),
            )
            hyper = LoRAHyper(
                rank=v.get("rank", 16),
                alpha=v.get("alpha", 32),
                target_modules=tuple(v.get("targets", ALL_LINEAR)),
                lr=v.get("lr", 5e-4),
                steps=steps,
                batch_size=1,
                max_len=256,
                seed=seed,
                lr_schedule=v.get("sched", "constant"),
                anchor_kl=v.get("kl", 1.0),
                num_threads=v.get("threads", 1),
            )
            out = work / "adapters" / f"{v['name']}-{time.time_ns()}"
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
                "anchors": len(chosen),
                "steps": steps,
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
