"""POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.openai import served_headers
from app.api.streaming import sse, unless_disconnected
from app.deps import CompletionServiceDep, UserDep
from app.protocol.openai import CompletionRequest, CompletionResponse

router = APIRouter(tags=["openai"])


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    response: Response,
    completions: CompletionServiceDep,
    principal: UserDep,
) -> CompletionResponse | Response:
    """Create a completion for the provided prompt(s)."""
    gen = await completions.start(body, role=principal.role)
    if body.stream:
        stream = completions.stream(gen, include_usage=body.include_usage)
        return sse(stream, headers=served_headers(gen))
    response.headers.update(served_headers(gen))
    return await unless_disconnected(request, completions.complete(gen))
