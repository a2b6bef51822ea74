"""Routes for adaptation jobs: list, show, events (paginated) and cancel (operator role)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.db.jobs import JobStatus
from app.deps import JobServiceDep, OperatorDep
from app.protocol.jobs import (
    AdaptationJobList,
    AdaptationJobPublic,
    JobEventList,
    JobEventPublic,
)

router = APIRouter(prefix="/v1/adaptation/jobs", tags=["adaptation"])

LimitQuery = Annotated[int, Query(ge=1, le=100, description="page size")]


@router.get("", response_model=AdaptationJobList)
async def list_jobs(
    _: OperatorDep,
    jobs: JobServiceDep,
    namespace: str | None = None,
    status: JobStatus | None = None,
    after: Annotated[str | None, Query(description="last job id of the previous page")] = None,
    limit: LimitQuery = 20,
) -> AdaptationJobList:
    """List adaptation jobs, newest first."""
    page = await jobs.list_jobs(namespace=namespace, status=status, after=after, limit=limit)
    return AdaptationJobList(
        data=[AdaptationJobPublic.of(v) for v in page.data], has_more=page.has_more
    )


@router.get("/{job_id}", response_model=AdaptationJobPublic)
async def get_job(job_id: str, _: OperatorDep, jobs: JobServiceDep) -> AdaptationJobPublic:
    """Show one job: status, stage, progress, decision, resulting version and scores."""
    return AdaptationJobPublic.of(await jobs.get(job_id))


@router.get("/{job_id}/events", response_model=JobEventList)
async def list_job_events(
    job_id: str,
    _: OperatorDep,
    jobs: JobServiceDep,
    after: Annotated[int | None, Query(description="last event id of the previous page")] = None,
    limit: LimitQuery = 20,
) -> JobEventList:
    """A job's events (stages, loss, metrics, decision), newest first."""
    page = await jobs.events(job_id, after=after, limit=limit)
    return JobEventList(data=[JobEventPublic.of(e) for e in page.data], has_more=page.has_more)


@router.post("/{job_id}/cancel", response_model=AdaptationJobPublic)
async def cancel_job(
    job_id: str, principal: OperatorDep, jobs: JobServiceDep
) -> AdaptationJobPublic:
    """Cancel a queued job, or ask a running one to stop at its next checkpoint."""
    return AdaptationJobPublic.of(await jobs.cancel(job_id, actor=principal.name))
