"""Chat completions: messages -> chat template -> engine -> OpenAI responses or SSE chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

from app.db.models import Role
from app.engine.base import TokenLogprob
from app.errors import APIError, sse_error
from app.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatTokenLogprob,
    ChoiceLogprobs,
    DeltaMessage,
    TopLogprob,
)
from app.services.generation import Generation, GenerationService

SSE_DONE = "data: [DONE]\n\n"


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(items: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if items is None:
        return None
    return ChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=t.token,
                logprob=t.logprob,
                bytes=_bytes(t.token),
                top_logprobs=[TopLogprob(token=s, logprob=lp, bytes=_bytes(s)) for s, lp in t.top],
            )
            for t in items
        ]
    )


class ChatService:
    def __init__(self, generation: GenerationService) -> None:
        self._gen = generation

    async def start(self, request: ChatCompletionRequest, *, role: Role) -> Generation:
        """Validate and admit; errors here become HTTP errors before any byte is sent."""
        resolved = await self._gen.resolve(request.model, role=role)
        prompt = self._gen.engine.render_chat(request.template_messages())
        return self._gen.admit(
            endpoint="chat",
            resolved=resolved,
            prompts=[prompt],
            request=request,
            max_tokens=request.requested_max_tokens,
            logprobs=request.logprobs_k,
            prefix="chatcmpl",
        )

    async def complete(self, gen: Generation) -> ChatCompletionResponse:
        n = gen.options.n
        texts = [""] * n
        finish: list[str | None] = [None] * n
        logprobs: list[list[TokenLogprob] | None] = [
            [] if gen.options.logprobs is not None else None for _ in range(n)
        ]
        async for _, step in self._gen.run(gen):
            for c in step.choices:
                texts[c.index] += c.text
                finish[c.index] = c.finish_reason or finish[c.index]
                lp = logprobs[c.index]
                if lp is not None and c.logprobs:
                    lp.extend(c.logprobs)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=texts[i]),
                logprobs=chat_logprobs(logprobs[i]),
                finish_reason=finish[i],
            )
            for i in range(n)
        ]
        return ChatCompletionResponse(
            id=gen.request_id, model=gen.model, choices=choices, usage=gen.usage()
        )

    async def stream(self, gen: Generation, *, include_usage: bool) -> AsyncIterator[str]:
        created = gen.created

        def chunk(choices: list[ChatChunkChoice]) -> str:
            c = ChatCompletionChunk(
                id=gen.request_id, created=created, model=gen.model, choices=choices
            )
            return f"data: {c.model_dump_json()}\n\n"

        yield chunk(
            [
                ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(gen.options.n)
            ]
        )
        try:
            async for _, step in self._gen.run(gen):
                choices = [
                    ChatChunkChoice(
                        index=c.index,
                        delta=DeltaMessage(content=c.text),
                        logprobs=chat_logprobs(c.logprobs),
                        finish_reason=c.finish_reason,
                    )
                    for c in step.choices
                    if c.text or c.finish_reason or c.logprobs
                ]
                if choices:
                    yield chunk(choices)
        except APIError as e:
            yield sse_error(e)
            return
        if include_usage:
            usage = ChatCompletionChunk(
                id=gen.request_id,
                created=created,
                model=gen.model,
                choices=[],
                usage=gen.usage(),
            )
            yield f"data: {usage.model_dump_json()}\n\n"
        yield SSE_DONE
