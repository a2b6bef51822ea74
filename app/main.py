"""The FastAPI app: create_app(settings) wires routers, error handlers and the lifespan."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from app import __version__
from app.api import health
from app.api.admin import keys
from app.api.openai import chat, completions, models
from app.api.streaming import ClientDisconnected
from app.auth import Authenticator
from app.db import migrate
from app.db.session import make_engine, make_sessionmaker
from app.engine.base import EngineClient
from app.errors import install_error_handlers
from app.metrics import Metrics
from app.services.adapters import FolderAdapterResolver
from app.services.admission import Admission
from app.services.chat import ChatService
from app.services.completions import CompletionService
from app.services.generation import GenerationService
from app.settings import Settings, get_settings
from app.state import AppState

logger = logging.getLogger(__name__)


def _default_engine(settings: Settings) -> EngineClient:
    from app.engine.local import LocalEngine
    from app.model_prep import resolve_model_dir

    return LocalEngine(resolve_model_dir(settings), settings.engine)


def _build_state(settings: Settings, engine: EngineClient, metrics: Metrics) -> AppState:
    db_engine = make_engine(settings)
    sessionmaker = make_sessionmaker(db_engine)
    resolver = FolderAdapterResolver(
        settings.adapter_root,
        base_name=settings.engine.served_model_name,
        base_root=str(settings.model_dir),
        max_rank=settings.engine.max_lora_rank,
    )
    generation = GenerationService(
        engine, resolver, metrics, Admission(settings.engine.max_queue, metrics)
    )
    return AppState(
        settings=settings,
        sessionmaker=sessionmaker,
        authenticator=Authenticator(sessionmaker, cache_ttl_s=settings.auth.cache_ttl_s),
        engine=engine,
        resolver=resolver,
        metrics=metrics,
        chat=ChatService(generation),
        completions=CompletionService(generation),
    )


async def _start_engine(engine: EngineClient) -> None:
    try:
        await engine.start()
    except Exception:
        # A gateway without an engine is useless: exit so a supervisor restarts it.
        logger.exception("engine failed to start; shutting down")
        os.kill(os.getpid(), signal.SIGTERM)


def create_app(settings: Settings | None = None, *, engine: EngineClient | None = None) -> FastAPI:
    """Build the gateway. `engine` replaces the in-process vLLM engine (tests)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(migrate.upgrade, settings)
        eng = engine or await asyncio.to_thread(_default_engine, settings)
        metrics = Metrics()
        metrics.bind_engine_queue(eng.queue_depth)
        state = _build_state(settings, eng, metrics)
        starter = asyncio.create_task(_start_engine(eng))
        try:
            yield {"app": state}
        finally:
            starter.cancel()
            await eng.shutdown()
            await _dispose(state)

    app = FastAPI(title="selfadapt", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    for router in (health.router, chat.router, completions.router, models.router, keys.router):
        app.include_router(router)
    return app


async def _client_gone(_: Request, __: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


async def _dispose(state: AppState) -> None:
    bind = state.sessionmaker.kw.get("bind")
    if bind is not None:
        await bind.dispose()
