"""Probe stage: held-out QA pairs generated with the document in context, kept only when
their answer appears in the document (a cloze question per sentence as the fallback)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from app.settings import PipelineSettings
from workers.metrics import answer_in_text, normalize_answer
from workers.tasks.common import Doc, Probe, load_artifact, probes_from_json, save_artifact
from workers.tasks.synthesize import render_prompt
from workers.training.datasets import split_sentences

if TYPE_CHECKING:
    from workers.gateway_client import GatewayClient
    from workers.pipeline import StageContext

logger = logging.getLogger(__name__)

PROBE_PROMPT = (
    "Passage:\n{title}\n{text}\n\nWrite {n} questions about facts in the passage. After each "
    "question write its short answer, copied from the passage.\n\n"
    "Example:\nQ: In which year was the bridge opened?\nA: 1932"
)
PROBE_TEMPERATURE = 0.7
PROBE_SAMPLES = 2
_QA_PAIR = re.compile(
    r"(?:^|\n)\s*(?:Q|Question)\s*\d*\s*[:.)]\s*(?P<q>[^\n]+?)\s*\n+"
    r"\s*(?:A|Answer)\s*\d*\s*[:.)]\s*(?P<a>[^\n]+)",
    re.IGNORECASE,
)
MAX_PROBE_ANSWER_WORDS = 8
PROBES_ARTIFACT = "probes.json"


def parse_probes(completion: str) -> list[tuple[str, str]]:
    """``Q: ... / A: ...`` (or ``Question N:`` / ``Answer N:``) pairs from a completion."""
    return [(m["q"].strip(), m["a"].strip()) for m in _QA_PAIR.finditer(completion)]


def select_probes(pairs: Sequence[tuple[str, str]], doc: Doc, n: int) -> list[Probe]:
    """Grounded, distinct probes: the answer is short and appears in the document, and the
    question does not give it away."""
    out: list[Probe] = []
    seen: set[str] = set()
    for question, answer in pairs:
        answer = answer.strip().rstrip(".")
        key = normalize_answer(question)
        if not key or key in seen or not question.rstrip().endswith("?"):
            continue
        if not 0 < len(normalize_answer(answer).split()) <= MAX_PROBE_ANSWER_WORDS:
            continue
        if not answer_in_text(answer, doc.text) or answer_in_text(answer, question):
            continue
        seen.add(key)
        out.append(Probe(question, answer, "generated", doc.title))
        if len(out) >= n:
            break
    return out


async def generate_probes(
    gateway: GatewayClient, doc: Doc, settings: PipelineSettings, *, model: str
) -> list[Probe]:
    """Up to ``probe_count`` QA pairs generated with the document in context."""
    if settings.probe_count <= 0:
        return []
    prompt = render_prompt(PROBE_PROMPT, doc, n=settings.probe_count)
    texts = await gateway.chat(
        model,
        [{"role": "user", "content": prompt}],
        temperature=PROBE_TEMPERATURE,
        top_p=0.95,
        max_tokens=settings.probe_max_tokens,
        n=PROBE_SAMPLES,
    )
    pairs = [pair for text in texts for pair in parse_probes(text)]
    probes = select_probes(pairs, doc, settings.probe_count)
    logger.info("document %s: %d of %d generated probes kept", doc.id, len(probes), len(pairs))
    return probes


_CLOZE_TARGET = re.compile(r"(?<=\s)(?:[A-Z][\w'-]+(?:\s+[A-Z][\w'-]+)*|\d[\d,.]*)")


def cloze_probes(doc: Doc, n: int) -> list[Probe]:
    """Fallback when generation yields no grounded probe: blank out a name or number of a
    document sentence ("Fill in the blank: ..."). Grounded by construction."""
    out: list[Probe] = []
    title_words = set(normalize_answer(doc.title).split())
    for sentence in split_sentences(doc.text):
        for match in _CLOZE_TARGET.finditer(sentence):
            answer = match.group(0).rstrip(".,")
            if set(normalize_answer(answer).split()) <= title_words:
                continue
            blanked = sentence[: match.start()] + "___" + sentence[match.start() + len(answer) :]
            out.append(Probe(f"Fill in the blank: {blanked}", answer, "generated", doc.title))
            break
        if len(out) >= n:
            break
    return out


async def probe_stage(ctx: StageContext, docs: Sequence[Doc]) -> list[Doc]:
    """Generates probes for documents that have none and stores them on the documents
    (source "generated"); they are only ever asked, never trained on."""
    missing = [d for d in docs if not d.probes]
    if not missing:
        return list(docs)
    cached = load_artifact(ctx.artifacts_dir, PROBES_ARTIFACT)
    if cached is None:
        model = ctx.settings.engine.served_model_name
        found = await asyncio.gather(
            *(generate_probes(ctx.gateway, d, ctx.settings.pipeline, model=model) for d in missing)
        )
        n = ctx.settings.pipeline.probe_count
        generated = {
            d.id: [p.as_json() for p in (probes or cloze_probes(d, n))]
            for d, probes in zip(missing, found, strict=True)
        }
        save_artifact(ctx.artifacts_dir, PROBES_ARTIFACT, generated)
    else:
        generated = cached
    await _store_probes(ctx, generated)
    out = [replace(d, probes=probes_from_json(generated.get(d.id), d.title)) for d in missing]
    by_id = {d.id: d for d in out}
    await ctx.event(
        "metric",
        f"probes generated for {len(missing)} document(s)",
        counts={d.id: len(d.probes) for d in out},
    )
    return [by_id.get(d.id, d) for d in docs]


async def _store_probes(ctx: StageContext, generated: dict[str, list[dict[str, str]]]) -> None:
    from app.db.jobs import Document

    async with ctx.fenced() as session:
        for doc_id, probes in generated.items():
            row = await session.get(Document, doc_id)
            if row is not None and not row.probes:
                row.probes = probes
