"""GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ResolverDep, UserDep
from app.protocol.openai import ModelCard, ModelList
from app.services.adapters import model_not_found

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList)
async def list_models(resolver: ResolverDep, _: UserDep) -> ModelList:
    """List the base model and the adapters this server can serve."""
    return ModelList(data=await resolver.list_models())


@router.get("/v1/models/{model_id}", response_model=ModelCard)
async def retrieve_model(model_id: str, resolver: ResolverDep, _: UserDep) -> ModelCard:
    """Describe one model."""
    resolved = await resolver.resolve(model_id)
    for card in await resolver.list_models():
        if card.id == resolved.name:
            return card
    raise model_not_found(model_id)
