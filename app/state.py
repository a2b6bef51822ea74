"""Long-lived objects built by the app lifespan; handlers reach them only through app.deps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.settings import Settings

if TYPE_CHECKING:
    from app.auth import Authenticator
    from app.engine.base import EngineClient
    from app.metrics import Metrics
    from app.services.adapters import AdapterResolver
    from app.services.chat import ChatService
    from app.services.completions import CompletionService


@dataclass
class AppState:
    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    authenticator: Authenticator
    engine: EngineClient
    resolver: AdapterResolver
    metrics: Metrics
    chat: ChatService
    completions: CompletionService
