"""What the in-process training benchmarks share (`bench.forgetting`, `bench.retention`): a
bench document as the pipeline's `Doc`, a JSON cache of model outputs in a work dir (self-edits,
the base model's anchor answers), the in-process engine, and a training run built the way the
train stage builds a job (sequences + base-model anchors, the pipeline's LoRA defaults)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.engine.local import LocalEngine
    from bench.learning_engine import InProcessChat
    from workers.tasks.common import Doc
    from workers.training.peft_trainer import ChatExample, LoRAHyper, TextExample

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_doc(path: Path, index: int) -> Doc:
    """Document ``index`` of a SQuAD-schema JSONL file, its questions as probes."""
    from workers.tasks.common import Doc, Probe

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not 0 <= index < len(rows):
        raise SystemExit(f"--data {path} has {len(rows)} documents; no index {index}")
    row = rows[index]
    return Doc(
        row["id"],
        row["title"],
        row["context"],
        tuple(Probe(q["question"], q["answers"][0]) for q in row["questions"]),
    )


class WorkCache:
    """JSON values kept in ``directory`` under a name: computed once, reused by later runs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    async def get(self, name: str, make: Callable[[], Awaitable[Any]]) -> Any:
        path = self.directory / name
        if path.is_file():
            return json.loads(path.read_text())
        value = await make()
        path.write_text(json.dumps(value))
        return value


def start_engine(model_dir: Path) -> tuple[LocalEngine, InProcessChat]:
    """The in-process vLLM engine with room for a few LoRAs, and a chat client on it."""
    from app.engine.local import LocalEngine
    from app.settings import EngineSettings
    from bench.learning_engine import InProcessChat

    engine = LocalEngine(
        model_dir,
        EngineSettings(max_loras=8, max_cpu_loras=32, max_lora_rank=32, kv_cache_space_gib=2),
    )
    return engine, InProcessChat(engine)


async def kept_self_edits(chat: InProcessChat, doc: Doc, cache: WorkCache) -> list[str]:
    """The base model's self-edits of ``doc`` that the pipeline's filter keeps (cached)."""
    from app.settings import PipelineSettings
    from workers.tasks.synthesize import generate_self_edits

    async def make() -> list[str]:
        samples = await generate_self_edits(chat, [doc], PipelineSettings(), model="base")
        return [s.text for s in samples if s.kept]

    edits: list[str] = await cache.get(f"edits-{doc.id}.json", make)
    return edits


async def anchor_pairs(
    chat: InProcessChat, cache: WorkCache, limit: asyncio.Semaphore
) -> list[tuple[str, str]]:
    """(anchor prompt, the base model's greedy answer) pairs (cached)."""
    from workers.tasks.anchors import load_anchor_prompts

    async def make() -> list[list[str]]:
        prompts = load_anchor_prompts()

        async def one(p: str) -> str:
            async with limit:
                texts = await chat.chat("base", [{"role": "user", "content": p}], max_tokens=64)
                return texts[0].strip()

        answers = await asyncio.gather(*(one(p) for p in prompts))
        return [[p, a] for p, a in zip(prompts, answers, strict=True) if a]

    return [(p, a) for p, a in await cache.get("anchors.json", make)]


def job_examples(
    sequences: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    *,
    anchor_fraction: float,
    seed: int | str,
) -> list[TextExample | ChatExample]:
    """The job's sequences plus ``anchor_fraction`` base-model anchors per sequence."""
    from workers.tasks.anchors import sample_anchors
    from workers.training.peft_trainer import ChatExample, TextExample

    chosen = sample_anchors(list(pairs), len(sequences), anchor_fraction, seed=str(seed))
    examples: list[TextExample | ChatExample] = [TextExample(s) for s in sequences]
    return examples + [ChatExample(u, a, anchor=True) for u, a in chosen]


def variant_hyper(v: dict[str, Any], n_examples: int, *, seed: int) -> LoRAHyper:
    """LoRA hyperparameters: the pipeline's defaults, overridden by a variant's keys (`lr`,
    `rank`, `alpha`, `targets`, `epochs`, `max_steps`, `sched`, `kl`, `threads`)."""
    from workers.training.datasets import plan_steps
    from workers.training.peft_trainer import LoRAHyper

    steps = plan_steps(
        n_examples, epochs=v.get("epochs", 10), batch_size=1, max_steps=v.get("max_steps", 100)
    )
    return LoRAHyper(
        rank=v.get("rank", 16),
        alpha=v.get("alpha", 32),
        target_modules=tuple(v.get("targets", ALL_LINEAR)),
        lr=v.get("lr", 5e-4),
        steps=steps,
        batch_size=1,
        max_len=256,
        seed=seed,
        lr_schedule=v.get("sched", "constant"),
        anchor_kl=v.get("kl", 1.0),
        num_threads=v.get("threads", 1),
    )
