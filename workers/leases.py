"""Job leases on the SQL row: claim, heartbeat, fencing, and the terminal writes of an attempt.

Every write of an attempt is conditional on `(attempt, lease_owner, status=running)`, and a
claim increments `attempt`, so a stale attempt's writes match no row. `fenced()` goes further:
while its block runs nobody can claim the job (PostgreSQL: the row lock of the fencing UPDATE;
SQLite, whose writers all share one host: an exclusive file lock that claims also take).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters_store.models import Namespace
from app.db.jobs import AdaptationJob, JobStatus
from app.db.models import utcnow


class StaleAttempt(Exception):
    """This attempt no longer owns its job (lease taken over by a newer attempt, or finished)."""


class JobCancelled(Exception):
    """Someone asked to cancel the job; the attempt must stop without producing anything."""


@dataclass(frozen=True)
class Lease:
    """What an attempt owns: one job at one attempt number, under one owner id."""

    job_id: str
    attempt: int
    owner: str
    namespace: str


class _FileLock:
    """An exclusive flock on a per-job file (SQLite only); released by the OS if we die."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def acquire(self, timeout_s: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.try_acquire():
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _sqlite_lock_dir(sessionmaker: async_sessionmaker[AsyncSession]) -> Path | None:
    bind = sessionmaker.kw.get("bind")
    if bind is None or bind.dialect.name != "sqlite":
        return None
    database = make_url(str(bind.url)).database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return Path(tempfile.gettempdir()) / f"selfadapt-fence-{os.getpid()}"
    return Path(f"{database}-fence")


class Leases:
    """Lease operations on adaptation_job rows, for one worker process."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        lease_s: float,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.lease_s = lease_s
        self._clock = clock
        self._lock_dir = _sqlite_lock_dir(sessionmaker)

    def _expiry(self) -> tuple[datetime, datetime]:
        now = self._clock()
        return now, now + timedelta(seconds=self.lease_s)

    def _file_lock(self, job_id: str) -> _FileLock | None:
        return _FileLock(self._lock_dir / f"{job_id}.lock") if self._lock_dir else None

    async def claim(self, job_id: str, owner: str) -> Lease | None:
        """Takes the job if it is queued or its lease expired; None when someone else holds it.

        The caller must still check `cancel_requested` and `attempt > max_attempts`.
        """
        lock = self._file_lock(job_id)
        if lock is not None and not lock.try_acquire():
            return None  # an attempt is inside fenced() right now, so it is alive
        try:
            now, expires = self._expiry()
            async with self.sessionmaker() as session:
                result = await session.execute(
                    update(AdaptationJob)
                    .where(
                        AdaptationJob.id == job_id,
                        or_(
                            AdaptationJob.status == JobStatus.queued,
                            (AdaptationJob.status == JobStatus.running)
                            & (AdaptationJob.lease_expires_at < now),
                        ),
                    )
                    .values(
                        status=JobStatus.running,
                        attempt=AdaptationJob.attempt + 1,
                        lease_owner=owner,
                        lease_expires_at=expires,
                        heartbeat_at=now,
                    )
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount != 1:  # type: ignore[attr-defined]
                    await session.rollback()
                    return None
                attempt, namespace = (
                    await session.execute(
                        select(AdaptationJob.attempt, Namespace.name)
                        .join(Namespace, Namespace.id == AdaptationJob.namespace_id)
                        .where(AdaptationJob.id == job_id)
                    )
                ).one()
                await session.commit()
            return Lease(job_id, attempt, owner, namespace)
        finally:
            if lock is not None:
                lock.release()

    @property
    def uses_row_lock(self) -> bool:
        """True where fenced() holds the job's row lock (PostgreSQL), not a file lock."""
        return self._lock_dir is None

    async def _renew(
        self,
        session: AsyncSession,
        lease: Lease,
        *,
        allow_cancelled: bool,
        values: dict[str, Any] | None = None,
    ) -> bool:
        """The fencing write: extends the lease (and sets `values`) iff this attempt still
        owns the job."""
        now, expires = self._expiry()
        conditions = [
            AdaptationJob.id == lease.job_id,
            AdaptationJob.attempt == lease.attempt,
            AdaptationJob.lease_owner == lease.owner,
            AdaptationJob.status == JobStatus.running,
        ]
        if not allow_cancelled:
            conditions.append(AdaptationJob.cancel_requested.is_(False))
        result = await session.execute(
            update(AdaptationJob)
            .where(*conditions)
            .values(lease_expires_at=expires, heartbeat_at=now, **(values or {}))
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]

    async def _why_not(self, session: AsyncSession, lease: Lease) -> Exception:
        row = (
            await session.execute(
                select(
                    AdaptationJob.attempt,
                    AdaptationJob.lease_owner,
                    AdaptationJob.status,
                    AdaptationJob.cancel_requested,
                ).where(AdaptationJob.id == lease.job_id)
            )
        ).first()
        if row is None:
            return StaleAttempt(f"job {lease.job_id} no longer exists")
        attempt, owner, status, cancel = row
        if (attempt, owner, status) == (lease.attempt, lease.owner, JobStatus.running) and cancel:
            return JobCancelled(f"job {lease.job_id} was cancelled")
        return StaleAttempt(
            f"job {lease.job_id} attempt {lease.attempt} lost its lease "
            f"(now attempt {attempt}, {status}, owner {owner})"
        )

    async def heartbeat(
        self, lease: Lease, *, session: AsyncSession | None = None, **values: Any
    ) -> None:
        """Extends the lease and sets `values` on the job row, in `session` if given
        (uncommitted) or in a transaction of its own.

        Raises:
            StaleAttempt: a newer attempt owns the job. JobCancelled: cancel was requested.
        """
        if session is not None:
            if not await self._renew(session, lease, allow_cancelled=False, values=values):
                raise await self._why_not(session, lease)
            return
        async with self.sessionmaker() as own:
            if await self._renew(own, lease, allow_cancelled=False, values=values):
                await own.commit()
                return
            await own.rollback()
            raise await self._why_not(own, lease)

    @contextlib.asynccontextmanager
    async def fenced(
        self, lease: Lease, *, allow_cancelled: bool = False
    ) -> AsyncIterator[AsyncSession]:
        """A session whose writes commit only while `lease` owns the job; see the module doc.

        Raises:
            StaleAttempt / JobCancelled: on entry, when the attempt no longer owns the job.
        """
        lock = self._file_lock(lease.job_id)
        if lock is not None and not await lock.acquire(timeout_s=self.lease_s):
            raise StaleAttempt(f"job {lease.job_id}: fence lock busy for {self.lease_s} s")
        try:
            async with self.sessionmaker() as session:
                if not await self._renew(session, lease, allow_cancelled=allow_cancelled):
                    await session.rollback()
                    raise await self._why_not(session, lease)
                if lock is not None:
                    # SQLite has one writer: release the write lock so other sessions (the
                    # registry's) can write inside the block; the file lock fences claims.
                    await session.commit()
                yield session
                await session.commit()
        finally:
            if lock is not None:
                lock.release()

    async def orphans(self, *, queued_grace_s: float) -> list[tuple[str, int]]:
        """(job_id, attempt) of running jobs whose lease expired and of queued jobs older than
        `queued_grace_s` (their queue message may be lost): the reaper re-enqueues them."""
        now = self._clock()
        stmt = select(AdaptationJob.id, AdaptationJob.attempt).where(
            or_(
                (AdaptationJob.status == JobStatus.running)
                & (AdaptationJob.lease_expires_at < now),
                (AdaptationJob.status == JobStatus.queued)
                & (AdaptationJob.created_at < now - timedelta(seconds=queued_grace_s)),
            )
        )
        async with self.sessionmaker() as session:
            return [(job_id, attempt) for job_id, attempt in (await session.execute(stmt)).all()]
