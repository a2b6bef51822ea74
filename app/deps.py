"""Typed FastAPI dependencies: the only way handlers reach the lifespan's objects."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from adapters_store.registry import AdapterRegistry
from app.auth import Authenticator, Principal, Role
from app.engine.base import EngineClient
from app.metrics import Metrics
from app.services.adapters import AdapterService
from app.services.chat import ChatService
from app.services.completions import CompletionService
from app.services.ingest import IngestService
from app.services.jobs import JobService
from app.services.model_resolver import AdapterResolver
from app.services.restem import RestemService
from app.settings import Settings
from app.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.state.app
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def _settings(state: StateDep) -> Settings:
    return state.settings


def _engine(state: StateDep) -> EngineClient:
    return state.engine


def _resolver(state: StateDep) -> AdapterResolver:
    return state.resolver


def _registry(state: StateDep) -> AdapterRegistry:
    return state.registry


def _adapters(state: StateDep) -> AdapterService:
    return state.adapters


def _metrics(state: StateDep) -> Metrics:
    return state.metrics


def _authenticator(state: StateDep) -> Authenticator:
    return state.authenticator


def _chat(state: StateDep) -> ChatService:
    return state.chat


def _completions(state: StateDep) -> CompletionService:
    return state.completions


def _ingest(state: StateDep) -> IngestService:
    return state.ingest


def _jobs(state: StateDep) -> JobService:
    return state.jobs


def _restem(state: StateDep) -> RestemService:
    return state.restem


async def _session(state: StateDep) -> AsyncIterator[AsyncSession]:
    async with state.sessionmaker() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[EngineClient, Depends(_engine)]
ResolverDep = Annotated[AdapterResolver, Depends(_resolver)]
AdapterRegistryDep = Annotated[AdapterRegistry, Depends(_registry)]
AdapterServiceDep = Annotated[AdapterService, Depends(_adapters)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
AuthenticatorDep = Annotated[Authenticator, Depends(_authenticator)]
SessionDep = Annotated[AsyncSession, Depends(_session)]
ChatServiceDep = Annotated[ChatService, Depends(_chat)]
CompletionServiceDep = Annotated[CompletionService, Depends(_completions)]
IngestServiceDep = Annotated[IngestService, Depends(_ingest)]
JobServiceDep = Annotated[JobService, Depends(_jobs)]
RestemServiceDep = Annotated[RestemService, Depends(_restem)]


def require(role: Role) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that authenticates the bearer key and demands at least `role`."""

    async def _check(request: Request, authenticator: AuthenticatorDep) -> Principal:
        principal = await authenticator.authenticate(request.headers.get("authorization"))
        principal.require(role)
        request.state.principal = principal
        return principal

    return _check


UserDep = Annotated[Principal, Depends(require(Role.user))]
OperatorDep = Annotated[Principal, Depends(require(Role.operator))]
AdminDep = Annotated[Principal, Depends(require(Role.admin))]
