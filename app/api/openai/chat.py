"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.openai import served_headers
from app.api.streaming import sse, unless_disconnected
from app.deps import ChatServiceDep, UserDep
from app.protocol.openai import ChatCompletionRequest, ChatCompletionResponse

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    chat: ChatServiceDep,
    principal: UserDep,
) -> ChatCompletionResponse | Response:
    """Create a model response for the given chat conversation."""
    gen = await chat.start(body, role=principal.role)
    if body.stream:
        stream = chat.stream(gen, include_usage=body.include_usage)
        return sse(stream, headers=served_headers(gen))
    response.headers.update(served_headers(gen))
    return await unless_disconnected(request, chat.complete(gen))
