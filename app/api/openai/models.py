"""GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ResolverDep, UserDep
from app.protocol.openai import ModelCard, ModelList
from app.services.model_resolver import model_not_found

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList)
async def list_models(resolver: ResolverDep, principal: UserDep) -> ModelList:
    """List the base model, adapter namespaces (their champions) and versions."""
    return ModelList(data=await resolver.list_models(role=principal.role))


@router.get("/v1/models/{model_id}", response_model=ModelCard)
async def retrieve_model(model_id: str, resolver: ResolverDep, principal: UserDep) -> ModelCard:
    """Describe one model."""
    resolved = await resolver.resolve(model_id, role=principal.role)  # 404s like requests do
    cards = {card.id: card for card in await resolver.list_models(role=principal.role)}
    card = cards.get(model_id) or cards.get(resolved.name)
    if card is None:
        raise model_not_found(model_id)
    return card
