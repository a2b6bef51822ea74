"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.streaming import MODEL_HEADER, sse, unless_disconnected
from app.deps import ChatServiceDep, UserDep
from app.protocol.openai import ChatCompletionRequest, ChatCompletionResponse

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    chat: ChatServiceDep,
    _: UserDep,
) -> ChatCompletionResponse | Response:
    """Create a model response for the given chat conversation."""
    gen = await chat.start(body)
    if body.stream:
        stream = chat.stream(gen, include_usage=body.include_usage)
        return sse(stream, headers={MODEL_HEADER: gen.model})
    response.headers[MODEL_HEADER] = gen.model
    return await unless_disconnected(request, chat.complete(gen))
