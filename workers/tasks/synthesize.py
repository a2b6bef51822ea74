"""Self-edit stage (SEAL formats sampled through the gateway) and probe generation."""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from adapters_store.models import policy_namespace
from app.errors import NotFound
from app.settings import PipelineSettings
from workers.metrics import normalize_answer
from workers.tasks.common import Doc, load_artifact, save_artifact
from workers.training.datasets import grounded_segments

if TYPE_CHECKING:
    from workers.gateway_client import ChatClient
    from workers.pipeline import StageContext

logger = logging.getLogger(__name__)

# Chat versions of SEAL's completion prompts: an instruct model asked to continue
# "Implications:" only repeats the header, so the instruction says what to write.
DEFAULT_PROMPTS: dict[str, str] = {
    "implications": (
        "Read the passage below and list the facts it states or implies, one short sentence "
        "per line. Repeat the names from the passage in every sentence.\n\n"
        "Passage:\n{title}\n{text}"
    ),
    "implications_long": (
        "Read the passage below and write a long list of the facts it states or implies: "
        "every name, number, date, place and relation, one short sentence per line. Repeat "
        "the names from the passage in every sentence.\n\nPassage:\n{title}\n{text}"
    ),
    "rewrite": (
        "Rewrite the following passage in your own words. Keep every name, number and fact."
        "\n\nPassage:\n{title}\n{text}"
    ),
    "self_qa": (
        "Read the passage and rewrite it as a list of questions and answers about its facts."
        "\n\nPassage:\n{title}\n{text}\n\nUse this format:\nQuestion 1: ...\nAnswer 1: ..."
    ),
}
SELF_EDITS_ARTIFACT = "self_edits.json"


@dataclass(frozen=True)
class SelfEditSample:
    """One sampled self-edit; ``reason`` says why it was filtered out (None = kept)."""

    document_id: str
    format: str
    text: str
    reason: str | None = None
    id: int | None = None  # the self_edit row, once stored

    @property
    def kept(self) -> bool:
        return self.reason is None


def format_counts(formats: Sequence[str], k: int) -> dict[str, int]:
    """``k`` samples spread over ``formats`` round-robin (k=3 over three formats: one each)."""
    counts: Counter[str] = Counter()
    for i in range(k):
        counts[formats[i % len(formats)]] += 1
    return dict(counts)


_PLACEHOLDER = re.compile(r"\{(title|text|n)\}")


def render_prompt(template: str, doc: Doc, **extra: object) -> str:
    """Fills ``{title}``, ``{text}`` (and ``{n}``) in one pass: document text may contain
    braces, and operator templates may contain other ones, so no str.format."""
    values = {"title": doc.title, "text": doc.text.strip(), **{k: str(v) for k, v in extra.items()}}
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 = none, near 1 = a loop)."""
    words = normalize_answer(text).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 4:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def copy_ratio(text: str, source: str, n: int = 6) -> float:
    """Share of the text's word n-grams found in ``source`` (near 1 = a verbatim copy)."""
    words = normalize_answer(text).split()
    grams = {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
    if not grams:
        return 0.0
    src = normalize_answer(source).split()
    src_grams = {tuple(src[i : i + n]) for i in range(len(src) - n + 1)}
    return len(grams & src_grams) / len(grams)


def degenerate_reason(text: str, *, prompt: str, document: str) -> str | None:
    """Why a sampled self-edit is useless for training, or None when it is kept.

    empty: nothing (or almost nothing) but whitespace; repetition: a sampling loop;
    prompt_copy: the instruction and/or passage echoed back (adds nothing the passage
    sequence does not already teach); ungrounded: no line restates the document.
    """
    if len(normalize_answer(text).split()) < 3:
        return "empty"
    if repetition_ratio(text) > 0.5:
        return "repetition"
    if copy_ratio(text, prompt) > 0.9:
        return "prompt_copy"
    if not grounded_segments(text, document):
        return "ungrounded"
    return None


async def policy_model(registry: Any, namespace: str, base_name: str) -> str:
    """The namespace's self-edit policy adapter (`<ns>-policy` champion) or the base model."""
    name = policy_namespace(namespace)
    try:
        await registry.resolve(name)
    except NotFound:
        return base_name
    return name


async def generate_self_edits(
    gateway: ChatClient,
    docs: Sequence[Doc],
    settings: PipelineSettings,
    *,
    model: str,
    counts: dict[str, int] | None = None,
) -> list[SelfEditSample]:
    """k samples per document, spread over the configured formats (or ``counts`` per format,
    e.g. drawn from the formats ReSTEM found to work), all requests concurrent.

    No sampling seed is sent: vLLM's CPU runner crashes the engine on a seeded request that
    is prefilled in chunks ("CPU Generator does not use offset"). A retried attempt reuses
    the stored samples instead (see self_edit_stage), which is what a seed was for.
    """
    prompts = {**DEFAULT_PROMPTS, **settings.prompts}
    if counts is None:
        counts = format_counts(settings.formats, settings.self_edits_per_doc)
    jobs = [(doc, fmt, n) for doc in docs for fmt, n in counts.items()]

    async def sample(doc: Doc, fmt: str, n: int) -> list[SelfEditSample]:
        if fmt not in prompts:
            raise ValueError(f"no prompt for self-edit format {fmt!r}; set pipeline.prompts")
        prompt = render_prompt(prompts[fmt], doc)
        texts = await gateway.chat(
            model,
            [{"role": "user", "content": prompt}],
            temperature=settings.self_edit_temperature,
            top_p=settings.self_edit_top_p,
            max_tokens=settings.self_edit_max_tokens,
            n=n,
        )
        return [
            SelfEditSample(doc.id, fmt, t, degenerate_reason(t, prompt=prompt, document=doc.text))
            for t in texts
        ]

    batches = await asyncio.gather(*(sample(*job) for job in jobs))
    return [s for batch in batches for s in batch]


# -- stages ----------------------------------------------------------------------------------


async def self_edit_stage(ctx: StageContext, docs: Sequence[Doc]) -> list[SelfEditSample]:
    """Samples (or reuses) the job's self-edits and records them as `self_edit` rows."""
    settings = ctx.settings.pipeline
    cached = load_artifact(ctx.artifacts_dir, SELF_EDITS_ARTIFACT)
    if cached is not None:
        samples = [SelfEditSample(**s) for s in cached["samples"]]
        model = cached["model"]
    else:
        samples, model, counts = [], ctx.settings.engine.served_model_name, None
        if settings.self_edits_per_doc > 0 and settings.formats:
            model = await policy_model(ctx.registry, ctx.namespace, model)
            counts = await learned_format_counts(ctx)
            samples = await generate_self_edits(
                ctx.gateway, docs, settings, model=model, counts=counts
            )
            for _ in range(settings.self_edit_resamples):
                kept = {s.document_id for s in samples if s.kept}
                bare = [d for d in docs if d.id not in kept]
                if not bare:
                    break
                await ctx.event(
                    "log",
                    f"no usable self-edit for {len(bare)} document(s); sampling them again",
                    documents=[d.id for d in bare],
                )
                samples += await generate_self_edits(
                    ctx.gateway, bare, settings, model=model, counts=counts
                )
        save_artifact(
            ctx.artifacts_dir,
            SELF_EDITS_ARTIFACT,
            {"model": model, "samples": samples, "learned_formats": counts},
        )
    ids = await _store_self_edits(ctx, samples)
    samples = [replace(s, id=i) for s, i in zip(samples, ids, strict=True)]
    dropped = Counter(s.reason for s in samples if not s.kept)
    await ctx.event(
        "metric",
        f"self-edits: {sum(s.kept for s in samples)} of {len(samples)} kept",
        model=model,
        kept=sum(s.kept for s in samples),
        total=len(samples),
        dropped=dict(dropped),
    )
    return samples


async def learned_format_counts(ctx: StageContext) -> dict[str, int] | None:
    """Self-edits per format drawn from the format weights the namespace's last ReSTEM job
    learned (seeded by the job), over the ReSTEM formats this worker has prompts for; None
    (round-robin over ``pipeline.formats``) until a ReSTEM job has scored any format."""
    from workers.restem.history import latest_format_stats
    from workers.restem.selection import FormatStats

    restem = ctx.settings.restem
    prompts = {**DEFAULT_PROMPTS, **ctx.settings.pipeline.prompts}
    formats = [f for f in restem.formats if f in prompts]
    if not formats:
        return None
    async with ctx.sessionmaker() as session:
        data = await latest_format_stats(session, ctx.namespace)
    if not data:
        return None
    stats = FormatStats.from_json(formats, data)
    if not any(stats.stats[f].count for f in formats):
        return None
    rng = random.Random(f"formats:{ctx.job_id}")
    chosen = stats.choose(
        ctx.settings.pipeline.self_edits_per_doc,
        rng,
        exploration=restem.format_exploration,
        temperature=restem.format_temperature,
    )
    return dict(Counter(chosen))


async def _store_self_edits(ctx: StageContext, samples: Sequence[SelfEditSample]) -> list[int]:
    """Inserts the rows once per job (a retry finds those of the attempt that got here)."""
    from app.db.jobs import SelfEdit

    async with ctx.fenced() as session:
        query = select(SelfEdit).where(SelfEdit.job_id == ctx.job_id).order_by(SelfEdit.id)
        existing = list((await session.scalars(query)).all())
        if len(existing) == len(samples):
            return [row.id for row in existing]
        for row in existing:  # a different sample set (changed settings): replace it
            await session.delete(row)
        rows = [
            SelfEdit(
                job_id=ctx.job_id,
                attempt=ctx.attempt,
                document_id=s.document_id,
                format=s.format,
                text=s.text,
                kept=s.kept,
            )
            for s in samples
        ]
        session.add_all(rows)
        await session.flush()
        return [row.id for row in rows]
