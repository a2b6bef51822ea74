"""What a namespace already knows: its champion, its learned documents and their self-edits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select

from app.errors import NotFound
from workers.tasks.common import Doc, as_doc

if TYPE_CHECKING:
    from adapters_store.registry import ResolvedVersion
    from workers.pipeline import StageContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnedDoc:
    """An earlier document of the namespace with the self-edits it was learned with."""

    doc: Doc
    self_edits: tuple[str, ...]


async def current_champion(ctx: StageContext) -> ResolvedVersion | None:
    """The champion this job builds on: the namespace's champion, or, when an earlier
    attempt of this job already promoted its own candidate, the champion before it (so a
    retry takes the same path and reuses what that attempt registered)."""
    from adapters_store.registry import ResolvedVersion

    try:
        champion = await ctx.registry.resolve(ctx.namespace)
    except NotFound:
        return None
    row = await ctx.registry.get_version_by_id(champion.version_id)
    while row.job_id == ctx.job_id:
        if row.parent_version_id is None:
            return None
        row = await ctx.registry.get_version_by_id(row.parent_version_id)
    if row.base_model != ctx.registry.base_model:
        logger.warning("champion %s is for another base model; training fresh", row.name)
        return None
    return ResolvedVersion.of(row)


async def namespace_history(ctx: StageContext, *, exclude: Sequence[str]) -> list[LearnedDoc]:
    """The namespace's learned documents (oldest first) with their kept self-edits."""
    from adapters_store.models import Namespace
    from app.db.jobs import Document, DocumentState, SelfEdit

    async with ctx.sessionmaker() as session:
        ns_id = await session.scalar(select(Namespace.id).where(Namespace.name == ctx.namespace))
        if ns_id is None:
            return []
        query = (
            select(Document)
            .where(Document.namespace_id == ns_id, Document.state == DocumentState.learned)
            .where(Document.id.not_in(list(exclude)))
            .order_by(Document.created_at, Document.id)
        )
        rows = list((await session.scalars(query)).all())
        edits = (
            await session.scalars(
                select(SelfEdit)
                .where(SelfEdit.document_id.in_([r.id for r in rows]), SelfEdit.kept.is_(True))
                .order_by(SelfEdit.id)
            )
        ).all()
    by_doc: dict[str, list[str]] = {}
    job_of = {r.id: r.job_id for r in rows}
    for edit in edits:
        if edit.job_id == job_of.get(edit.document_id):  # the job that taught the document
            by_doc.setdefault(edit.document_id, []).append(edit.text)
    return [LearnedDoc(as_doc(r), tuple(by_doc.get(r.id, ()))) for r in rows]
