"""Anchor examples against forgetting: general prompts answered by the base model itself.

Training on raw document text shifts how a small model answers *every* question (measured:
"Le Grand Paris" for the capital of France after 9 steps on a made-up archipelago). Mixing in
the base model's own greedy answers to general prompts (self-distillation, disjoint from the
guard set so the guard still measures) keeps its chat behaviour where the document says
nothing. The answers depend only on the base model, so they are generated once and cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING

from workers.tasks.common import qa_messages, save_artifact

if TYPE_CHECKING:
    from workers.pipeline import StageContext

logger = logging.getLogger(__name__)

ANCHOR_FILE = Path(__file__).resolve().parents[2] / "app" / "data" / "anchor_prompts.jsonl"


def load_anchor_prompts(path: Path = ANCHOR_FILE) -> list[str]:
    """User turns: ``{title, question}`` rows in the evaluation's QA format, ``{prompt}`` as is."""
    prompts = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "prompt" in row:
                prompts.append(str(row["prompt"]))
            else:
                prompts.append(qa_messages(row.get("title", ""), row["question"])[0]["content"])
    return prompts


async def anchor_pairs(ctx: StageContext) -> list[tuple[str, str]]:
    """(prompt, base answer) for every anchor prompt; cached per base model and prompt set."""
    prompts = load_anchor_prompts()
    max_tokens = ctx.settings.pipeline.eval_max_tokens
    payload = json.dumps([ctx.registry.base_model, max_tokens, prompts])
    key = hashlib.sha256(payload.encode()).hexdigest()[:16]
    cache = ctx.settings.data_dir / "cache" / f"anchors-{key}.json"
    if cache.is_file():
        return [(p, a) for p, a in json.loads(cache.read_text())]
    base = ctx.settings.engine.served_model_name
    limit = asyncio.Semaphore(ctx.settings.pipeline.eval_concurrency)

    async def one(prompt: str) -> str:
        async with limit:
            texts = await ctx.gateway.chat(
                base, [{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens
            )
            return texts[0].strip()

    answers = await asyncio.gather(*(one(p) for p in prompts))
    pairs = [(p, a) for p, a in zip(prompts, answers, strict=True) if a]
    save_artifact(cache.parent, cache.name, pairs)
    logger.info("cached %d anchor answers of the base model in %s", len(pairs), cache)
    return pairs


def sample_anchors(
    pairs: list[tuple[str, str]], n_sequences: int, fraction: float, *, seed: str
) -> list[tuple[str, str]]:
    """``fraction`` x ``n_sequences`` anchors (at most all of them), seeded by the job."""
    n = min(len(pairs), math.ceil(fraction * n_sequences))
    return random.Random(seed).sample(pairs, n) if n > 0 else []
