"""Admin route that starts a ReSTEM job (self-edit policy learning) for a namespace."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.auth import Role
from app.deps import AdminDep, JobServiceDep, RestemServiceDep, require
from app.protocol.jobs import AdaptationJobPublic, RestemJobCreate

router = APIRouter(
    prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require(Role.operator))]
)


@router.post("/namespaces/{namespace}/restem", response_model=AdaptationJobPublic, status_code=202)
async def start_restem(
    namespace: str,
    principal: AdminDep,
    restem: RestemServiceDep,
    jobs: JobServiceDep,
    body: RestemJobCreate | None = None,
) -> AdaptationJobPublic:
    """Queue a ReSTEM job: learn the namespace's self-edit policy from rewarded self-edits."""
    request = (body or RestemJobCreate()).to_request()
    job_id = await restem.start(namespace, request, actor=principal.name)
    return AdaptationJobPublic.of(await jobs.get(job_id))
