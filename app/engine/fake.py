"""A deterministic stand-in engine for fast unit tests of gateway logic (never for serving)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from app.engine.base import ChoiceDelta, EngineStep, LoRATarget, SamplingOptions


class FakeEngine:
    """Answers with "tok0 tok1 ..." one word per token; `gate` (when set) holds every request
    before its first token, so tests can fill the queue."""

    def __init__(self, *, max_model_len: int = 64, ready: bool = True) -> None:
        self._max_model_len = max_model_len
        self._ready = ready
        self.gate: asyncio.Event | None = None
        self.running = 0
        self.loaded: list[LoRATarget] = []
        self.unloaded: list[int] = []
        self.requests: list[tuple[list[int], SamplingOptions, LoRATarget | None]] = []

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def start(self) -> None:
        self._ready = True

    async def shutdown(self) -> None:
        self._ready = False

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]

    def render_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return [1] + [t for m in messages for t in [*self.encode(str(m["content"])), 2]]

    async def load_adapter(self, lora: LoRATarget) -> None:
        self.loaded.append(lora)

    async def unload_adapter(self, lora_id: int) -> None:
        self.unloaded.append(lora_id)

    def queue_depth(self) -> int:
        return self.running

    async def generate(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        *,
        request_id: str,
        lora: LoRATarget | None,
    ) -> AsyncIterator[EngineStep]:
        self.requests.append((prompt_token_ids, options, lora))
        self.running += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            for i in range(options.max_tokens):
                last = i == options.max_tokens - 1
                yield EngineStep(
                    choices=[
                        ChoiceDelta(
                            index=c,
                            text=f"tok{i} ",
                            num_tokens=1,
                            finish_reason="length" if last else None,
                        )
                        for c in range(options.n)
                    ],
                    finished=last,
                )
                await asyncio.sleep(0)
        finally:
            self.running -= 1
