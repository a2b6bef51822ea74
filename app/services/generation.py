"""Shared generation core: context-window checks, admission, engine runs, metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from app.db.models import Role
from app.engine.base import EngineClient, EngineStep, SamplingOptions
from app.errors import APIError, InvalidRequest
from app.metrics import Metrics
from app.protocol.openai import SamplingFields, Usage
from app.services.admission import Admission, Slot
from app.services.model_resolver import AdapterResolver, ResolvedModel

_DONE = object()


@dataclass
class Generation:
    """One admitted request: what to run and the running usage/timing tallies."""

    request_id: str
    endpoint: str
    resolved: ResolvedModel
    prompts: list[list[int]]
    options: SamplingOptions
    slot: Slot
    arrival: float = field(default_factory=time.perf_counter)
    completion_tokens: int = 0
    first_token_at: float | None = None

    @property
    def model(self) -> str:
        return self.resolved.name

    @property
    def created(self) -> int:
        return int(time.time())

    def usage(self) -> Usage:
        prompt = sum(len(p) for p in self.prompts)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=self.completion_tokens,
            total_tokens=prompt + self.completion_tokens,
        )


class GenerationService:
    def __init__(
        self,
        engine: EngineClient,
        resolver: AdapterResolver,
        metrics: Metrics,
        admission: Admission,
    ) -> None:
        self._engine = engine
        self._resolver = resolver
        self._metrics = metrics
        self._admission = admission

    @property
    def engine(self) -> EngineClient:
        return self._engine

    async def resolve(self, model: str, *, role: Role) -> ResolvedModel:
        return await self._resolver.resolve(model, role=role)

    def admit(
        self,
        *,
        endpoint: str,
        resolved: ResolvedModel,
        prompts: list[list[int]],
        request: SamplingFields,
        max_tokens: int | None,
        logprobs: int | None,
        prefix: str,
    ) -> Generation:
        """Check the request against the context window and take a queue slot."""
        options = self._options(prompts, request, max_tokens, logprobs)
        slot = self._admission.acquire()
        return Generation(
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            endpoint=endpoint,
            resolved=resolved,
            prompts=prompts,
            options=options,
            slot=slot,
        )

    def _options(
        self,
        prompts: list[list[int]],
        request: SamplingFields,
        max_tokens: int | None,
        logprobs: int | None,
    ) -> SamplingOptions:
        limit = self._engine.max_model_len
        longest = max(len(p) for p in prompts)
        if longest == 0:
            raise InvalidRequest("The prompt is empty.", param="prompt", code="empty_prompt")
        if longest >= limit:
            raise InvalidRequest(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{longest} tokens. Shorten the prompt.",
                param="messages" if self._is_chat(request) else "prompt",
                code="context_length_exceeded",
            )
        room = limit - longest
        if max_tokens is not None and max_tokens > room:
            raise InvalidRequest(
                f"max_tokens is {max_tokens}, but the prompt has {longest} tokens and this "
                f"model's maximum context length is {limit}: at most {room} tokens can be "
                "generated.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if request.min_tokens > (max_tokens or room):
            raise InvalidRequest("min_tokens must not exceed max_tokens.", param="min_tokens")
        greedy = request.temperature == 0.0
        return SamplingOptions(
            max_tokens=max_tokens or room,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None or greedy else request.top_p,
            n=request.n,
            stop=request.stop_list,
            seed=request.seed,
            logprobs=logprobs,
            min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos,
        )

    @staticmethod
    def _is_chat(request: SamplingFields) -> bool:
        return hasattr(request, "messages")

    async def run(self, gen: Generation) -> AsyncIterator[tuple[int, EngineStep]]:
        """Run every prompt of `gen`; yields (prompt index, step). Releases the slot at the end."""
        status = "ok"
        try:
            if len(gen.prompts) == 1:
                async for step in self._one(gen, 0):
                    yield 0, step
            else:
                async for item in self._merged(gen):
                    yield item
        except APIError as e:
            status = e.code or e.type
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except Exception:
            status = "error"
            raise
        finally:
            gen.slot.release()
            self._observe_end(gen, status)

    async def _one(self, gen: Generation, index: int) -> AsyncIterator[EngineStep]:
        request_id = gen.request_id if len(gen.prompts) == 1 else f"{gen.request_id}-{index}"
        async for step in self._engine.generate(
            gen.prompts[index], gen.options, request_id=request_id, lora=gen.resolved.lora
        ):
            produced = sum(c.num_tokens for c in step.choices)
            if produced and gen.first_token_at is None:
                gen.first_token_at = time.perf_counter()
                self._metrics.ttft.labels(gen.model, gen.endpoint).observe(
                    gen.first_token_at - gen.arrival
                )
            gen.completion_tokens += produced
            yield step

    async def _merged(self, gen: Generation) -> AsyncIterator[tuple[int, EngineStep]]:
        queue: asyncio.Queue[object] = asyncio.Queue()

        async def pump(index: int) -> None:
            async for step in self._one(gen, index):
                await queue.put((index, step))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(gen.prompts))]
        waiter = asyncio.create_task(_signal_done(tasks, queue))
        try:
            while (item := await queue.get()) is not _DONE:
                yield item  # type: ignore[misc]
            for task in tasks:
                if (error := task.exception()) is not None:
                    raise error
        finally:
            for task in [*tasks, waiter]:
                task.cancel()

    def _observe_end(self, gen: Generation, status: str) -> None:
        m = self._metrics
        m.requests.labels(gen.model, gen.endpoint, status).inc()
        m.latency.labels(gen.model, gen.endpoint).observe(time.perf_counter() - gen.arrival)
        m.prompt_tokens.labels(gen.model).inc(sum(len(p) for p in gen.prompts))
        m.completion_tokens.labels(gen.model).inc(gen.completion_tokens)


async def _signal_done(tasks: list[asyncio.Task[None]], queue: asyncio.Queue[object]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
    await queue.put(_DONE)
