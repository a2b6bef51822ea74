"""AdapterRegistry: versions, aliases, promote/rollback and audit, one transaction per change."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from adapters_store import repo
from adapters_store.champion import ChampionOps
from adapters_store.core import BeforeMove, RegistryCore, ResolvedVersion
from adapters_store.events import ChangeEvent
from adapters_store.models import (
    CHAMPION,
    AdapterStatus,
    AdapterVersion,
    AuditAction,
)
from adapters_store.validation import ALLOWED_FILES, PeftInfo, validate_peft_dir
from app.db.models import utcnow
from app.errors import Conflict, InvalidRequest, NotFound

logger = logging.getLogger(__name__)

__all__ = ["AdapterRegistry", "BeforeMove", "RegistryCore", "ResolvedVersion"]


class AdapterRegistry(ChampionOps):
    """The adapter registry service (no HTTP).

    Every change runs in one transaction with its audit row and is published after commit.
    Construct with `AdapterRegistry(sessionmaker, blobs, publisher, base_model=...)`.
    """

    async def register_version(
        self,
        namespace: str,
        src_dir: Path,
        actor: str,
        *,
        parent_version: int | None = None,
        job_id: str | None = None,
        status: AdapterStatus = AdapterStatus.candidate,
        scores: dict[str, Any] | None = None,
        note: str | None = None,
    ) -> AdapterVersion:
        """Stores a PEFT folder (only its allow-listed files) as the namespace's next version.

        Raises:
            InvalidAdapter: the folder is not a loadable LoRA adapter.
            NotFound: `parent_version` does not exist in the namespace.
        """
        info = await asyncio.to_thread(
            validate_peft_dir, src_dir, base_model_dir=None, max_rank=None, allow_extra_files=True
        )
        return await self._store(
            namespace,
            src_dir,
            actor,
            info,
            action=AuditAction.version_create,
            parent_version=parent_version,
            job_id=job_id,
            status=status,
            scores=scores,
            note=note,
        )

    async def import_version(
        self, namespace: str, src_dir: Path, actor: str, base_model_dir: Path, max_rank: int
    ) -> AdapterVersion:
        """Validates an adapter trained elsewhere against the base model, then stores it as a
        candidate (audit `version.import`). Raises InvalidAdapter before anything is stored."""
        info = await asyncio.to_thread(
            validate_peft_dir, src_dir, base_model_dir=base_model_dir, max_rank=max_rank
        )
        return await self._store(
            namespace, src_dir, actor, info, action=AuditAction.version_import,
            status=AdapterStatus.candidate,
        )  # fmt: skip

    async def _store(
        self,
        namespace: str,
        src_dir: Path,
        actor: str,
        info: PeftInfo,
        *,
        action: AuditAction,
        parent_version: int | None = None,
        **columns: Any,
    ) -> AdapterVersion:
        """Puts the blob, then adds the version row and its audit row in one transaction."""
        await self.ensure_namespace(namespace, actor)
        names = sorted(n for n in ALLOWED_FILES if (src_dir / n).is_file())
        blob = await asyncio.to_thread(self.blobs.put_dir, src_dir, names=names)
        async with self._changing(namespace) as session:
            ns = await self._namespace(session, namespace)
            if parent_version is not None:
                parent = await self._version(session, namespace, parent_version)
                columns["parent_version_id"] = parent.id
            row = AdapterVersion(
                namespace=ns, version=await repo.next_version_number(session, namespace_id=ns.id),
                base_model=self.base_model, blob_sha256=blob.sha256, size_bytes=blob.size_bytes,
                peft_config=info.config, rank=info.rank, created_at=utcnow(), created_by=actor,
                **columns,
            )  # fmt: skip
            session.add(row)
            await session.flush()
            await repo.add_audit(session, actor=actor, action=action, target=row.name,
                                 namespace=namespace, after=row.snapshot())  # fmt: skip
            await session.commit()
        if not self.blobs.exists(blob.sha256):
            # A concurrent delete of the last version sharing this content took the blob
            # between our put and our commit; store it again.
            await asyncio.to_thread(self.blobs.put_dir, src_dir, names=names)
        logger.info("registered %s (blob %s)", row.name, blob.sha256, extra={"adapter": row.name})
        await self._publish(ChangeEvent("version_changed", namespace, None, row.id))
        return row

    async def set_scores(
        self, version_id: int, scores: dict[str, Any], actor: str = "system"
    ) -> AdapterVersion:
        """Records evaluation scores on a version (its weights never change)."""
        async with self._session() as session:
            row = await repo.get_version_by_id(session, version_id=version_id)
            if row is None:
                raise NotFound(
                    f"adapter version id {version_id} does not exist", code="version_not_found"
                )
            row.scores = dict(scores)
            await session.commit()
        logger.info("scores for %s set by %s", row.name, actor, extra={"adapter": row.name})
        return row

    async def set_status(
        self, version_id: int, status: AdapterStatus, actor: str = "system"
    ) -> AdapterVersion:
        """Marks a candidate rejected/failed (the gate's verdict); promotion goes via promote()."""
        if status is AdapterStatus.promoted:
            raise InvalidRequest("use promote() to make a version champion", param="status")
        async with self._session() as session:
            row = await repo.get_version_by_id(session, version_id=version_id)
            if row is None:
                raise NotFound(
                    f"adapter version id {version_id} does not exist", code="version_not_found"
                )
            row.status = status
            await session.commit()
        logger.info("%s is now %s (%s)", row.name, status, actor, extra={"adapter": row.name})
        await self._publish(ChangeEvent("version_changed", row.namespace_name, None, row.id))
        return row

    # -- removal ----------------------------------------------------------------------------

    async def archive(self, namespace: str, version: int, actor: str) -> AdapterVersion:
        """Retires a version (audit `version.archive`); refused for the champion."""
        async with self._changing(namespace) as session:
            await self._namespace(session, namespace, lock=True)
            target = await self._version(session, namespace, version)
            if await self._is_champion(session, target):
                raise Conflict(
                    f"{target.name} is the champion; promote or roll back first",
                    code="champion_archive",
                )
            if target.status is AdapterStatus.archived:
                return target
            before = target.snapshot()
            target.status = AdapterStatus.archived
            await repo.add_audit(
                session,
                actor=actor,
                action=AuditAction.version_archive,
                target=target.name,
                namespace=namespace,
                before=before,
                after=target.snapshot(),
            )
            await session.commit()
        await self._publish(ChangeEvent("version_changed", namespace, None, target.id))
        return target

    async def _is_champion(self, session: AsyncSession, row: AdapterVersion) -> bool:
        champion = await repo.get_alias(session, namespace_id=row.namespace_id, name=CHAMPION)
        return champion is not None and champion.version_id == row.id

    async def delete(self, namespace: str, version: int, actor: str) -> None:
        """Deletes a version and, if no other version shares it, its blob.

        Raises:
            Conflict: `champion_delete` for the champion, `pinned_delete` for a pinned alias's.
        """
        async with self._changing(namespace) as session:
            await self._namespace(session, namespace, lock=True)
            target = await self._version(session, namespace, version)
            aliases = await repo.aliases_of_version(session, version_id=target.id)
            for alias in aliases:
                if alias.name == CHAMPION:
                    raise Conflict(
                        f"{target.name} is the champion and cannot be deleted",
                        code="champion_delete",
                    )
                if alias.pinned:
                    raise Conflict(
                        f"{target.name} is pinned by alias '{alias.name}'", code="pinned_delete"
                    )
            for alias in aliases:
                await session.delete(alias)
            await session.flush()  # aliases before the version they reference
            before = target.snapshot()
            await repo.detach_children(session, version_id=target.id)
            await session.delete(target)
            await repo.add_audit(
                session,
                actor=actor,
                action=AuditAction.version_delete,
                target=before["name"],
                namespace=namespace,
                before=before,
            )
            await session.commit()
        await self._drop_blob_if_unused(target.blob_sha256)
        await self._publish(ChangeEvent("version_changed", namespace, None, target.id))

    async def _drop_blob_if_unused(self, sha256: str) -> None:
        async with self._session() as session:
            if await repo.blob_in_use(session, sha256=sha256):
                return
        await asyncio.to_thread(self.blobs.delete, sha256)
