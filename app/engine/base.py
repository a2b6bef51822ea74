"""The engine protocol the gateway talks to, with backend-neutral request/response types."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class LoRATarget:
    """One adapter as the engine sees it: a stable name and integer id per weights directory."""

    name: str
    lora_id: int
    path: Path


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: sampled token + k alternatives
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class ChoiceDelta:
    """New output of one choice since the last delta."""

    index: int
    text: str
    num_tokens: int
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class EngineStep:
    """What one engine iteration produced for a request."""

    choices: list[ChoiceDelta] = field(default_factory=list)
    finished: bool = False


class EngineClient(Protocol):
    """What the gateway needs from an inference backend."""

    @property
    def ready(self) -> bool: ...

    @property
    def max_model_len(self) -> int: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def encode(self, text: str) -> list[int]: ...

    def render_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]: ...

    def generate(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        *,
        request_id: str,
        lora: LoRATarget | None,
    ) -> AsyncIterator[EngineStep]: ...

    async def load_adapter(self, lora: LoRATarget) -> None: ...

    async def unload_adapter(self, lora_id: int) -> None:
        """Frees an adapter's engine slot and cached weights (its version was deleted)."""
        ...

    def queue_depth(self) -> int: ...
