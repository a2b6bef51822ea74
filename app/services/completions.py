"""Text completions: prompt string(s) or token ids -> engine -> OpenAI responses or SSE chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

from app.db.models import Role
from app.engine.base import TokenLogprob
from app.errors import APIError, InvalidRequest, sse_error
from app.protocol.openai import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from app.services.chat import SSE_DONE
from app.services.generation import Generation, GenerationService


def completion_logprobs(
    items: list[TokenLogprob] | None, *, offset: int
) -> CompletionLogprobs | None:
    if items is None:
        return None
    out = CompletionLogprobs()
    for t in items:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append(dict(t.top))
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


class CompletionService:
    def __init__(self, generation: GenerationService) -> None:
        self._gen = generation

    def _prompts(self, request: CompletionRequest) -> list[list[int]]:
        p = request.prompt
        if isinstance(p, str):
            return [self._gen.engine.encode(p)]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        if all(isinstance(x, str) for x in p):
            return [self._gen.engine.encode(x) for x in p]  # type: ignore[arg-type]
        return [list(x) for x in p]  # type: ignore[arg-type]

    @staticmethod
    def _refuse_unsupported(request: CompletionRequest) -> None:
        if request.echo:
            raise InvalidRequest("echo=true is not supported.", param="echo", code="unsupported")
        if request.suffix:
            raise InvalidRequest("suffix is not supported.", param="suffix", code="unsupported")
        if request.best_of is not None and request.best_of != request.n:
            raise InvalidRequest(
                "best_of other than n is not supported.", param="best_of", code="unsupported"
            )

    async def start(self, request: CompletionRequest, *, role: Role) -> Generation:
        self._refuse_unsupported(request)
        resolved = await self._gen.resolve(request.model, role=role)
        return self._gen.admit(
            endpoint="completions",
            resolved=resolved,
            prompts=self._prompts(request),
            request=request,
            max_tokens=request.max_tokens,
            logprobs=request.logprobs,
            prefix="cmpl",
        )

    async def complete(self, gen: Generation) -> CompletionResponse:
        total = len(gen.prompts) * gen.options.n
        texts = [""] * total
        finish: list[str | None] = [None] * total
        want = gen.options.logprobs is not None
        logprobs: list[list[TokenLogprob] | None] = [[] if want else None for _ in range(total)]
        async for prompt_index, step in self._gen.run(gen):
            for c in step.choices:
                i = prompt_index * gen.options.n + c.index
                texts[i] += c.text
                finish[i] = c.finish_reason or finish[i]
                lp = logprobs[i]
                if lp is not None and c.logprobs:
                    lp.extend(c.logprobs)
        choices = [
            CompletionChoice(
                index=i,
                text=texts[i],
                logprobs=completion_logprobs(logprobs[i], offset=0),
                finish_reason=finish[i],
            )
            for i in range(total)
        ]
        return CompletionResponse(
            id=gen.request_id, model=gen.model, choices=choices, usage=gen.usage()
        )

    async def stream(self, gen: Generation, *, include_usage: bool) -> AsyncIterator[str]:
        created = gen.created
        offsets = [0] * (len(gen.prompts) * gen.options.n)
        try:
            async for prompt_index, step in self._gen.run(gen):
                choices = []
                for c in step.choices:
                    i = prompt_index * gen.options.n + c.index
                    choices.append(
                        CompletionChoice(
                            index=i,
                            text=c.text,
                            logprobs=completion_logprobs(c.logprobs, offset=offsets[i]),
                            finish_reason=c.finish_reason,
                        )
                    )
                    offsets[i] += len(c.text)
                if choices:
                    chunk = CompletionResponse(
                        id=gen.request_id, created=created, model=gen.model, choices=choices
                    )
                    yield f"data: {chunk.model_dump_json()}\n\n"
        except APIError as e:
            yield sse_error(e)
            return
        if include_usage:
            last = CompletionResponse(
                id=gen.request_id,
                created=created,
                model=gen.model,
                choices=[],
                usage=gen.usage(),
            )
            yield f"data: {last.model_dump_json()}\n\n"
        yield SSE_DONE
