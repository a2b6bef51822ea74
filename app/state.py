"""Long-lived objects built by the app lifespan; handlers reach them only through app.deps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.settings import Settings

if TYPE_CHECKING:
    from adapters_store.events import RedisChangePublisher
    from adapters_store.registry import AdapterRegistry
    from app.auth import Authenticator
    from app.engine.base import EngineClient
    from app.metrics import Metrics
    from app.services.adapters import AdapterService
    from app.services.chat import ChatService
    from app.services.completions import CompletionService
    from app.services.hotswap import HotSwap
    from app.services.ingest import IngestService
    from app.services.jobs import JobQueue, JobService
    from app.services.model_resolver import RegistryAdapterResolver
    from app.services.restem import RestemService


@dataclass
class AppState:
    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    authenticator: Authenticator
    engine: EngineClient
    resolver: RegistryAdapterResolver
    registry: AdapterRegistry
    adapters: AdapterService
    hotswap: HotSwap
    metrics: Metrics
    chat: ChatService
    completions: CompletionService
    ingest: IngestService
    jobs: JobService
    restem: RestemService
    publisher: RedisChangePublisher | None = None
    job_queue: JobQueue | None = None
