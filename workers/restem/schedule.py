"""The optional ReSTEM schedule: a cron job that queues a ReSTEM job for every namespace."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters_store.models import Namespace, is_derived_namespace
from app.errors import APIError
from app.services.restem import RestemRequest, RestemService
from app.settings import Settings

if TYPE_CHECKING:
    from app.services.jobs import JobQueue

logger = logging.getLogger(__name__)

SCHEDULE_TASK = "restem_schedule"
"""Name of the SAQ cron task (unique: one enqueue per tick across all workers)."""
ACTOR = "schedule"


async def queue_scheduled_jobs(
    sessionmaker: async_sessionmaker[AsyncSession], queue: JobQueue | None, settings: Settings
) -> list[str]:
    """Queues a ReSTEM job (with the settings' defaults) for each namespace that can have one;
    namespaces without probe documents or with a job still active are skipped. Returns the
    new job ids."""
    service = RestemService(
        sessionmaker, queue, settings.restem, max_attempts=settings.pipeline.max_attempts
    )
    async with sessionmaker() as session:
        names = list(await session.scalars(select(Namespace.name).order_by(Namespace.name)))
    started = []
    for name in names:
        if is_derived_namespace(name):
            continue
        try:
            started.append(await service.start(name, RestemRequest(), actor=ACTOR))
        except APIError as e:  # no probe documents, a job still running, ...
            logger.info("scheduled ReSTEM skips %s: %s", name, e.message)
    return started
