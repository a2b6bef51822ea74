"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.deps import EngineDep, MetricsDep
from app.errors import EngineUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(engine: EngineDep) -> dict[str, str]:
    """The engine has loaded the model and takes requests."""
    if not engine.ready:
        raise EngineUnavailable("The model is still loading.", headers={"Retry-After": "5"})
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(m: MetricsDep) -> Response:
    """Prometheus exposition."""
    return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
