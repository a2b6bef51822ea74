"""Admin routes for the adapter registry: namespaces, versions, promote/rollback, import, audit."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, UploadFile

from adapters_store.models import NamespaceSettings
from app.auth import Role
from app.deps import AdapterServiceDep, AdminDep, require
from app.protocol.admin import (
    AuditList,
    ChampionChange,
    NamespaceCreate,
    NamespaceList,
    NamespacePublic,
    PromoteRequest,
    RollbackRequest,
    VersionDeleted,
    VersionList,
    VersionPublic,
)

# Operators may read (they run evaluations); changes need an admin key (AdminDep per route).
router = APIRouter(
    prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require(Role.operator))]
)
VersionPath = Annotated[str, "a version number, '7' or 'v7'"]


@router.get("/namespaces", response_model=NamespaceList)
async def list_namespaces(adapters: AdapterServiceDep) -> NamespaceList:
    """List adapter namespaces and their champions."""
    return NamespaceList(data=await adapters.namespaces())


@router.post("/namespaces", response_model=NamespacePublic, status_code=201)
async def create_namespace(
    body: NamespaceCreate, adapters: AdapterServiceDep, principal: AdminDep
) -> NamespacePublic:
    """Create a namespace (imports and jobs also create one on first use)."""
    return await adapters.create_namespace(body.name, body.settings, actor=principal.name)


@router.get("/namespaces/{namespace}", response_model=NamespacePublic)
async def get_namespace(namespace: str, adapters: AdapterServiceDep) -> NamespacePublic:
    """Show one namespace."""
    return await adapters.namespace(namespace)


@router.patch("/namespaces/{namespace}", response_model=NamespacePublic)
async def update_namespace(
    namespace: str, body: NamespaceSettings, adapters: AdapterServiceDep, principal: AdminDep
) -> NamespacePublic:
    """Change a namespace's gate settings."""
    settings = body.model_dump(exclude_unset=True)
    return await adapters.update_settings(namespace, settings, actor=principal.name)


@router.get("/namespaces/{namespace}/versions", response_model=VersionList)
async def list_versions(namespace: str, adapters: AdapterServiceDep) -> VersionList:
    """List a namespace's versions with status, scores, lineage and aliases."""
    return VersionList(data=await adapters.versions(namespace))


@router.post(
    "/namespaces/{namespace}/versions:import", response_model=VersionPublic, status_code=201
)
async def import_version(
    namespace: str,
    adapters: AdapterServiceDep,
    principal: AdminDep,
    files: Annotated[list[UploadFile], File(description="adapter_config.json + safetensors")],
) -> VersionPublic:
    """Import a PEFT LoRA folder trained elsewhere as a new candidate version."""
    return await adapters.import_upload(namespace, files, actor=principal.name)


@router.get("/namespaces/{namespace}/versions/{version}", response_model=VersionPublic)
async def get_version(
    namespace: str, version: VersionPath, adapters: AdapterServiceDep
) -> VersionPublic:
    """Show one version."""
    return await adapters.version(namespace, version)


@router.post("/namespaces/{namespace}/versions/{version}/promote", response_model=ChampionChange)
async def promote_version(
    namespace: str,
    version: VersionPath,
    adapters: AdapterServiceDep,
    principal: AdminDep,
    body: PromoteRequest | None = None,
) -> ChampionChange:
    """Make a version the champion; it is loaded here before the alias moves."""
    reason = body.reason if body else None
    return await adapters.promote(namespace, version, actor=principal.name, reason=reason)


@router.post("/namespaces/{namespace}/rollback", response_model=ChampionChange)
async def rollback(
    namespace: str,
    adapters: AdapterServiceDep,
    principal: AdminDep,
    body: RollbackRequest | None = None,
) -> ChampionChange:
    """Move the champion back to the previous one, or to `to_version`."""
    body = body or RollbackRequest()
    return await adapters.rollback(
        namespace, actor=principal.name, to_version=body.to_version, reason=body.reason
    )


@router.post("/namespaces/{namespace}/versions/{version}/archive", response_model=VersionPublic)
async def archive_version(
    namespace: str, version: VersionPath, adapters: AdapterServiceDep, principal: AdminDep
) -> VersionPublic:
    """Retire a version: it can no longer be promoted (not the champion)."""
    return await adapters.archive(namespace, version, actor=principal.name)


@router.delete("/namespaces/{namespace}/versions/{version}", response_model=VersionDeleted)
async def delete_version(
    namespace: str, version: VersionPath, adapters: AdapterServiceDep, principal: AdminDep
) -> VersionDeleted:
    """Delete a version and its blob (refused for the champion or a pinned alias)."""
    return await adapters.delete(namespace, version, actor=principal.name)


@router.get("/audit", response_model=AuditList)
async def list_audit(
    adapters: AdapterServiceDep,
    namespace: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before_id: Annotated[int | None, Query(ge=1)] = None,
) -> AuditList:
    """Registry changes, newest first."""
    return await adapters.audit(namespace=namespace, limit=limit, before_id=before_id)
