"""The learning benchmark's in-process parts: our vLLM engine behind the `ChatClient` protocol
(adapters addressed by name, as on the gateway) and cached PEFT inner-loop training."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.engine.base import LoRATarget, SamplingOptions
from workers.training.datasets import plan_steps

if TYPE_CHECKING:
    from app.engine.base import EngineClient
    from workers.training.peft_trainer import LoRAHyper

logger = logging.getLogger(__name__)

BASE = "base"
TRAIN_RECORD = "bench-train.json"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts as ``max_lora_rank``."""


def lora_rank_limit(*ranks: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that fits every adapter."""
    need = max(ranks)
    return next((r for r in VLLM_LORA_RANKS if r >= need), need)


class InProcessChat:
    """`ChatClient` over an in-process engine (`LocalEngine`, started on first use): `base`
    or an adapter name.

    Each registered adapter directory gets its own LoRA id, so concurrent requests for many
    adapters share engine batches (vLLM schedules up to ``max_loras`` adapters per step).
    """

    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine
        self._adapters: dict[str, LoRATarget] = {}
        self._next_id = 1  # never reused: vLLM caches weights by id
        self._starting = asyncio.Lock()

    async def _started(self) -> None:
        """Starts the engine on first use (a run whose conditions are all cached needs none)."""
        async with self._starting:
            if not self._engine.ready:
                await self._engine.start()

    def add_adapter(self, name: str, path: Path) -> str:
        """Registers ``path`` under ``name`` (names are never rebound to other weights)."""
        known = self._adapters.get(name)
        if known is not None:
            if known.path != path:
                raise ValueError(f"adapter name {name!r} is already bound to {known.path}")
            return name
        self._adapters[name] = LoRATarget(name, self._next_id, path)
        self._next_id += 1
        return name

    def remove_adapter(self, name: str) -> None:
        """Forgets ``name`` (a temporary adapter); vLLM's LRU cache drops its weights."""
        self._adapters.pop(name, None)

    async def chat(
        self,
        model: str,
        messages: Sequence[dict[str, str]],
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 64,
        n: int = 1,
        seed: int | None = None,
    ) -> list[str]:
        if model != BASE and model not in self._adapters:
            raise ValueError(f"unknown model {model!r}; register the adapter first")
        await self._started()
        lora = self._adapters.get(model)
        options = SamplingOptions(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed
        )
        texts = [""] * n
        prompt = self._engine.render_chat(messages)
        request_id = f"bench-{uuid.uuid4().hex}"
        async for step in self._engine.generate(prompt, options, request_id=request_id, lora=lora):
            for choice in step.choices:
                texts[choice.index] += choice.text
        return texts


@dataclass(frozen=True)
class TrainRecord:
    """One trained adapter: where it is and what it cost."""

    path: Path
    sequences: int
    steps: int
    seconds: float
    final_loss: float


def hyper_for(base: LoRAHyper, n_sequences: int, *, epochs: float, max_steps: int) -> LoRAHyper:
    """``base`` with its step count planned for ``n_sequences`` (``base.steps`` wins if set)."""
    from dataclasses import replace

    steps = plan_steps(
        n_sequences,
        epochs=epochs,
        batch_size=base.batch_size,
        steps=base.steps,
        max_steps=max_steps,
    )
    return replace(base, steps=steps)


def adapter_key(sequences: Sequence[str], hyper: LoRAHyper) -> str:
    """Content address of a training run: the same data and settings train the same adapter
    (e.g. `self_edit` on a passage whose self-edits were all filtered out = `passage`)."""
    settings = {k: v for k, v in asdict(hyper).items() if k != "num_threads"}
    payload = json.dumps([list(sequences), settings], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_cached(
    model_dir: Path,
    sequences: Sequence[str],
    out_dir: Path,
    hyper: LoRAHyper,
) -> TrainRecord:
    """Trains a LoRA on raw-text ``sequences`` into ``out_dir``, or reuses a finished one.

    A finished run leaves its record next to the weights; a directory without one (a killed
    run) is trained again.
    """
    from workers.training.peft_trainer import train_lora

    record_path = out_dir / TRAIN_RECORD
    if record_path.is_file():
        data = json.loads(record_path.read_text())
        return TrainRecord(**{**data, "path": out_dir})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    result = train_lora(model_dir, list(sequences), out_dir, hyper)
    record = TrainRecord(out_dir, len(sequences), result.steps, result.seconds, result.final_loss)
    record_path.write_text(json.dumps({**asdict(record), "path": str(out_dir)}, indent=2))
    return record


async def train_in_thread(
    model_dir: Path, sequences: Sequence[str], out_dir: Path, hyper: LoRAHyper
) -> TrainRecord:
    """`train_cached` off the event loop (the engine's output task keeps running)."""
    return await asyncio.to_thread(train_cached, model_dir, sequences, out_dir, hyper)
