"""Self-edit length benchmark: how many tokens a self-edit needs before training stops using it.

Training takes only the first ``max_edit_segments`` grounded segments of a document's self-edits
(round-robin over them), so tokens sampled past those are never trained on, yet a sample
caught in a repetition loop runs to ``self_edit_max_tokens`` and holds up the whole stage.
This samples the pipeline's self-edits (its prompts, formats, temperature and filters) for
the made-up-fact documents with a long ceiling, then cuts every sample at each ``--limits``
token count (re-tokenised with the model's tokenizer and decoded, as a generation stopped there
would read), re-applies the degenerate filter and builds the document's training sequences
the pipeline's way. It reports, per limit, in how many (document, round) draws the training
sequences are exactly those of the uncut samples, in how many there are fewer of them, and the
samples' token lengths.

Run from the repo root: ``.venv/bin/python -m bench.self_edit_length``; writes
``bench/results/self_edit_length.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from app.signals import exit_on_sigterm

logger = logging.getLogger("bench.self_edit_length")
RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parent / "data" / "made_up_facts.jsonl"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="JSONL: title, context per line")
    p.add_argument("--rounds", type=int, default=6, help="self-edit draws per document")
    p.add_argument("--ceiling", type=int, default=320, help="max_tokens of the uncut samples")
    p.add_argument("--limits", type=int, nargs="+", default=[96, 128, 160, 192, 256])
    p.add_argument("--model", type=Path, default=None, help="HF model dir (default: bundled)")
    p.add_argument("--out", type=Path, default=RESULTS / "self_edit_length.json")
    return p


def _cut(tokenizer: Any, text: str, ids: list[int], limit: int) -> str:
    """``text`` as a generation stopped after ``limit`` of its tokens ``ids`` would read."""
    if len(ids) <= limit:
        return text
    return str(tokenizer.decode(ids[:limit], skip_special_tokens=True))


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from app.engine.local import LocalEngine
    from app.model_prep import resolve_model_dir
    from app.settings import EngineSettings, PipelineSettings, Settings
    from bench.learning_engine import BASE, InProcessChat
    from workers.tasks.common import Doc
    from workers.tasks.synthesize import (
        DEFAULT_PROMPTS,
        degenerate_reason,
        generate_self_edits,
        render_prompt,
    )
    from workers.training.datasets import DocumentData, document_sequences

    model_dir = args.model or resolve_model_dir(Settings(), progress=False)
    settings = PipelineSettings(self_edit_max_tokens=args.ceiling)
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    docs = [Doc(id=str(i), title=r["title"], text=r["context"]) for i, r in enumerate(rows)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = LocalEngine(model_dir, EngineSettings(kv_cache_space_gib=2))
    chat = InProcessChat(engine)
    started = time.monotonic()
    try:
        draws = await asyncio.gather(
            *(generate_self_edits(chat, docs, settings, model=BASE) for _ in range(args.rounds))
        )
    finally:
        await engine.shutdown()
    sampling_s = time.monotonic() - started
    prompts = {fmt: DEFAULT_PROMPTS[fmt] for fmt in settings.formats}
    # Each (draw, document): its samples as (format, text, token ids), tokenised once.
    pairs = [
        (
            doc,
            [
                (s.format, s.text, tokenizer.encode(s.text, add_special_tokens=False))
                for s in draw
                if s.document_id == doc.id
            ],
        )
        for draw in draws
        for doc in docs
    ]
    lengths = [len(ids) for _, samples in pairs for _, _, ids in samples]

    def sequences(doc: Doc, texts: list[tuple[str, str]]) -> list[str]:
        kept = tuple(
            text
            for fmt, text in texts
            if degenerate_reason(text, prompt=render_prompt(prompts[fmt], doc), document=doc.text)
            is None
        )
        data = DocumentData(doc.title, doc.text, kept)
        return document_sequences(
            data,
            sentences=settings.sentence_sequences,
            max_edit_segments=settings.max_edit_segments,
        )

    uncut = [sequences(doc, [(fmt, text) for fmt, text, _ in samples]) for doc, samples in pairs]
    per_limit: dict[str, Any] = {}
    for limit in [*args.limits, args.ceiling]:
        same = fewer = 0
        for (doc, samples), full in zip(pairs, uncut, strict=True):
            cut = [(fmt, _cut(tokenizer, text, ids, limit)) for fmt, text, ids in samples]
            shorter = sequences(doc, cut)
            same += shorter == full
            fewer += len(shorter) < len(full)
        total = len(pairs)
        per_limit[str(limit)] = {
            "identical_training_sequences": same,
            "fewer_training_sequences": fewer,
            "draws": total,
            "samples_cut": sum(n > limit for n in lengths),
        }
        logger.info("limit %d: %d/%d draws train on the same sequences", limit, same, total)
    ordered = sorted(lengths)
    return {
        "ceiling": args.ceiling,
        "documents": len(docs),
        "rounds": args.rounds,
        "formats": settings.formats,
        "max_edit_segments": settings.max_edit_segments,
        "temperature": settings.self_edit_temperature,
        "samples": len(lengths),
        "token_length": {
            "median": statistics.median(ordered),
            "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "max": ordered[-1],
            "at_ceiling": sum(n >= args.ceiling for n in ordered),
        },
        "limits": per_limit,
        "sampling_s": round(sampling_s, 1),
    }


def main() -> None:
    exit_on_sigterm()
    args = _parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from bench.live import machine

    result = {**asyncio.run(_run(args)), "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
