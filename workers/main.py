"""Worker entrypoint: SAQ wiring, the lease reaper, and `serve(settings)` (`selfadapt worker`)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import migrate
from app.db.session import make_engine, make_sessionmaker
from app.services.jobs import ADAPT_TASK, JobQueue
from app.settings import Settings
from workers.leases import Leases
from workers.runner import JobRunner, Pipeline

if TYPE_CHECKING:
    from adapters_store.registry import AdapterRegistry
    from workers.gateway_client import GatewayClient

logger = logging.getLogger(__name__)

WORKER_KEY_FILE = "worker.key"
"""Where `selfadapt up` keeps the worker's operator key (mode 0600) inside data_dir."""


def load_pipeline(path: str) -> Pipeline:
    """Imports `module:function` (settings.pipeline.pipeline_factory)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"pipeline_factory must look like 'module:function', got {path!r}")
    fn: Pipeline = getattr(importlib.import_module(module_name), attr)
    return fn


def worker_api_key(settings: Settings) -> str | None:
    """The key the worker calls the gateway with: the setting, else `data_dir/worker.key`."""
    if settings.pipeline.worker_api_key is not None:
        return settings.pipeline.worker_api_key.get_secret_value()
    path = settings.data_dir / WORKER_KEY_FILE
    return path.read_text().strip() if path.is_file() else None


def _base_model_id(settings: Settings) -> str:
    """Same rule as the gateway's: the model's content fingerprint, else the dir name."""
    from app.model_prep import model_fingerprint

    try:
        return model_fingerprint(settings.model_dir)
    except (OSError, ValueError, KeyError):
        return settings.model_dir.name


class _Shared:
    """Process-wide collaborators built on first use: the registry and the gateway client."""

    def __init__(self, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]):
        self._settings = settings
        self._sessionmaker = sessionmaker
        self._registry: AdapterRegistry | None = None
        self._publisher: Any = None

    def registry(self) -> AdapterRegistry:
        if self._registry is None:
            from adapters_store.blobs import BlobStore
            from adapters_store.events import RedisChangePublisher
            from adapters_store.registry import AdapterRegistry

            s = self._settings
            self._publisher = (
                RedisChangePublisher(s.redis_url, channel=s.redis_channel) if s.redis_url else None
            )
            blobs = BlobStore(s.adapter_root / "blobs")
            self._registry = AdapterRegistry(
                self._sessionmaker, blobs, self._publisher, base_model=_base_model_id(s)
            )
        return self._registry

    def gateway(self) -> GatewayClient:
        from workers.gateway_client import GatewayClient, gateway_url

        return GatewayClient(gateway_url(self._settings), worker_api_key(self._settings))

    async def aclose(self) -> None:
        if self._publisher is not None:
            await self._publisher.aclose()


async def reap_once(leases: Leases, queue: JobQueue, settings: Settings) -> int:
    """Re-enqueues jobs whose lease expired or whose queue message may be lost."""
    grace = settings.pipeline.batch_window_s + settings.pipeline.reaper_interval_s + 5.0
    count = 0
    for job_id, attempt in await leases.orphans(queued_grace_s=grace):
        if await queue.enqueue(job_id, attempt=attempt):
            logger.warning("re-enqueued orphaned job %s (attempt %d)", job_id, attempt)
            count += 1
        if attempt > 0 and await queue.retire(job_id, attempt=attempt):
            logger.info("retired the queue message of job %s attempt %d", job_id, attempt)
    return count


async def _no_sweep(lock: int = 60, abort: float = 5.0) -> list[str]:
    return []


async def _reap_forever(leases: Leases, queue: JobQueue, settings: Settings) -> None:
    while True:
        try:
            await reap_once(leases, queue, settings)
        except Exception:
            logger.warning("reaper pass failed", exc_info=True)
        await asyncio.sleep(settings.pipeline.reaper_interval_s)


def restem_cron(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], queue: JobQueue
) -> tuple[list[tuple[str, Any]], list[Any]]:
    """The SAQ function and cron job of `settings.restem.schedule` (none when unset)."""
    from saq.job import CronJob

    from workers.restem.schedule import SCHEDULE_TASK, queue_scheduled_jobs

    if settings.restem.schedule is None:
        return [], []

    async def restem_schedule(ctx: Any) -> dict[str, Any]:
        return {"jobs": await queue_scheduled_jobs(sessionmaker, queue, settings)}

    # SAQ names a cron job's task by the function's qualified name.
    restem_schedule.__qualname__ = SCHEDULE_TASK
    cron = CronJob(restem_schedule, cron=settings.restem.schedule, unique=True, timeout=300)
    return [(SCHEDULE_TASK, restem_schedule)], [cron]


async def serve(
    settings: Settings,
    *,
    pipeline: Pipeline | None = None,
    redis_url: str | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Runs one worker until SIGINT/SIGTERM: one job at a time, plus the reaper.

    Args:
        pipeline: replaces `settings.pipeline.pipeline_factory` (tests).
        redis_url: replaces `settings.redis_url`.
        ready: called once the worker listens (tests).
    """
    from saq import Worker
    from saq.types import Context

    await asyncio.to_thread(migrate.upgrade, settings)
    db_engine = make_engine(settings)
    sessionmaker = make_sessionmaker(db_engine)
    queue = JobQueue.from_settings(settings, redis_url)
    # SAQ's sweep aborts a message that sits in the active list before its status turns
    # active, which is also a message a worker has just dequeued (a race at worker start).
    # The SQL lease already tells dead attempts apart; reap_once retires their messages.
    queue.queue.sweep = _no_sweep
    await queue.queue.connect()
    shared = _Shared(settings, sessionmaker)
    runner = JobRunner(
        settings=settings,
        sessionmaker=sessionmaker,
        queue=queue,
        pipeline=pipeline or load_pipeline(settings.pipeline.pipeline_factory),
        registry_factory=shared.registry,
        gateway_factory=shared.gateway,
    )

    async def adapt_documents(ctx: Context, *, job_id: str) -> dict[str, Any]:
        return await runner.run(job_id)

    functions, cron_jobs = restem_cron(settings, sessionmaker, queue)
    worker = Worker(
        queue.queue,
        functions=[(ADAPT_TASK, adapt_documents), *functions],
        cron_jobs=cron_jobs,
        concurrency=1,
        id=runner.owner,
        cancellation_hard_deadline_s=10.0,
    )
    reaper = asyncio.create_task(_reap_forever(runner.leases, queue, settings))
    logger.info("worker %s on queue %s (pid %d)", runner.owner, queue.queue.name, os.getpid())
    if ready is not None:
        ready()
    try:
        await worker.start()
    finally:
        reaper.cancel()
        await shared.aclose()
        await queue.close()
        await db_engine.dispose()


def run(settings: Settings) -> None:
    """`selfadapt worker`."""
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(settings))
