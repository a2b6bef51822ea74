"""ReSTEM parts on a chat client and PEFT: the sampler, SEAL's inner loop and the policy trainer.

They need only a `ChatClient` (the gateway over HTTP, or an in-process engine) and two small
hooks that say how a trained adapter folder becomes a servable model name:

* ``AdapterHost`` for the temporary trial adapters (the worker registers them as versions of
  a scratch namespace and deletes them again; a benchmark adds them to its own engine);
* ``PolicyStore`` for policy adapters (the worker keeps them as versions of ``<ns>-policy``).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from app.settings import RestemSettings
from workers.metrics import QAScore, score_answers
from workers.restem.protocols import (
    PolicyExample,
    PolicyRef,
    SampleRequest,
    SamplingOptions,
    TrialResult,
)
from workers.tasks.common import Doc
from workers.tasks.evaluate import answer_all, probe_items
from workers.training.datasets import DocumentData, document_sequences, plan_steps

if TYPE_CHECKING:
    from workers.gateway_client import ChatClient
    from workers.training.peft_trainer import LoRAHyper, TrainExample, TrainResult

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run was told to stop (job cancelled or lease lost) in the middle of a training."""


class AdapterHost(Protocol):
    """Makes trained trial adapters servable, and removes them again."""

    async def publish(self, adapter_dir: Path, *, label: str) -> str:
        """Serves the PEFT folder ``adapter_dir``; returns the model name to chat with."""
        ...

    async def retire(self, model: str) -> None:
        """Removes what ``publish`` created (registry rows, blobs, engine slots)."""
        ...


class PolicyStore(Protocol):
    """Where policy adapters live: folders of existing policies, registration of new ones."""

    async def adapter_dir(self, policy: str) -> Path:
        """The PEFT folder of an existing policy (to continue training from it)."""
        ...

    async def register(
        self,
        adapter_dir: Path,
        *,
        parent: PolicyRef,
        round_index: int,
        examples: Sequence[PolicyExample],
    ) -> str:
        """Stores a newly trained policy (not yet promoted); returns its PolicyRef."""
        ...


class ChatSampler:
    """SelfEditSampler over a ChatClient: the prompt is the user turn; base when no policy."""

    def __init__(self, chat: ChatClient, *, base_model: str) -> None:
        self._chat = chat
        self._base_model = base_model

    async def sample(
        self, policy: PolicyRef, request: SampleRequest, options: SamplingOptions
    ) -> list[str]:
        return await self._chat.chat(
            policy or self._base_model,
            [{"role": "user", "content": request.prompt}],
            temperature=options.temperature,
            top_p=options.top_p,
            max_tokens=options.max_tokens,
            n=request.n,
        )


def trial_hyper(
    settings: RestemSettings, n_sequences: int, *, repeat: int, num_threads: int | None
) -> LoRAHyper:
    """Inner-loop LoRA settings; each repeat trains with its own seed."""
    from workers.training.peft_trainer import LoRAHyper

    s = settings
    steps = plan_steps(
        n_sequences, epochs=s.epochs, batch_size=s.batch_size, steps=s.steps, max_steps=s.max_steps
    )
    return LoRAHyper(
        rank=s.rank, alpha=s.alpha, target_modules=tuple(s.targets), lr=s.lr, steps=steps,
        batch_size=s.batch_size, max_len=s.max_seq_len, seed=s.seed + repeat,
        num_threads=num_threads,
    )  # fmt: skip


def policy_hyper(
    settings: RestemSettings, n_examples: int, *, num_threads: int | None
) -> LoRAHyper:
    """Policy LoRA settings (loss only on the self-edit, batch 1)."""
    from workers.training.peft_trainer import LoRAHyper

    s = settings
    steps = plan_steps(n_examples, epochs=s.policy_epochs, batch_size=1, steps=s.policy_steps)
    return LoRAHyper(
        rank=s.policy_rank, alpha=s.policy_alpha, target_modules=tuple(s.targets),
        lr=s.policy_lr, steps=steps, batch_size=1, max_len=s.policy_max_seq_len, seed=s.seed,
        num_threads=num_threads,
    )  # fmt: skip


async def train_in_thread(
    base_model_dir: Path,
    examples: Sequence[TrainExample],
    out_dir: Path,
    hyper: LoRAHyper,
    *,
    init_adapter_dir: Path | None,
    stop: threading.Event | None,
) -> TrainResult:
    """``train_lora`` in a worker thread (the event loop keeps serving); ``stop`` or a
    cancelled caller ends it at the next optimizer step.

    Raises:
        TrainingStopped: ``stop`` was set.
    """
    from workers.training.peft_trainer import train_lora

    cancelled = threading.Event()

    def on_step(step: int, total: int, loss: float) -> None:
        if cancelled.is_set() or (stop is not None and stop.is_set()):
            raise TrainingStopped("training stopped: the run was told to stop")

    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        return await asyncio.to_thread(
            train_lora, base_model_dir, examples, out_dir, hyper,
            init_adapter_dir=init_adapter_dir, on_step=on_step,
        )  # fmt: skip
    except BaseException:
        cancelled.set()
        raise


class PeftInnerLoop:
    """InnerLoop: a temporary PEFT adapter per (document, self-edit), scored through chat.

    Training data is SEAL's: the self-edit's grounded segments and the passage, each prefixed
    by the title (plus each document sentence when ``sentence_sequences`` is on).
    """

    def __init__(
        self,
        chat: ChatClient,
        host: AdapterHost,
        *,
        settings: RestemSettings,
        base_model_dir: Path,
        start_model: str,
        start_adapter_dir: Path | None,
        work_dir: Path,
        eval_max_tokens: int = 64,
        eval_concurrency: int = 16,
        num_threads: int | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self._chat = chat
        self._host = host
        self._settings = settings
        self._base_model_dir = base_model_dir
        self._start_model = start_model
        self._start_adapter_dir = start_adapter_dir
        self._work_dir = work_dir
        self._max_tokens = eval_max_tokens
        self._limit = asyncio.Semaphore(eval_concurrency)
        self._num_threads = num_threads
        self._stop = stop

    async def _score(self, model: str, doc: Doc) -> tuple[QAScore, list[str]]:
        items = probe_items([doc])
        answers = await answer_all(
            self._chat, model, items, max_tokens=self._max_tokens, limit=self._limit
        )
        return score_answers(zip(answers, (i.answers for i in items), strict=True)), answers

    async def baseline(self, doc: Doc) -> QAScore:
        score, _ = await self._score(self._start_model, doc)
        return score

    async def trial(self, doc: Doc, self_edit: str, *, repeat: int) -> TrialResult:
        from workers.training.peft_trainer import TextExample

        data = DocumentData(doc.title, doc.text, (self_edit,))
        sequences = document_sequences(data, sentences=self._settings.sentence_sequences)
        hyper = trial_hyper(
            self._settings, len(sequences), repeat=repeat, num_threads=self._num_threads
        )
        out = self._work_dir / f"trial-{uuid.uuid4().hex[:12]}"
        try:
            trained = await train_in_thread(
                self._base_model_dir, [TextExample(s) for s in sequences], out, hyper,
                init_adapter_dir=self._start_adapter_dir, stop=self._stop,
            )  # fmt: skip
            model = await self._host.publish(out, label=f"{doc.id} r{repeat}")
            try:
                score, answers = await self._score(model, doc)
            finally:
                await self._host.retire(model)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return TrialResult(score, trained.seconds, trained.steps, tuple(answers))


class PeftPolicyTrainer:
    """PolicyTrainer: LoRA SFT on (self-edit prompt -> kept self-edit), loss on the self-edit.

    Continues from the parent policy's adapter (so lineage is parent -> child), or starts a
    fresh LoRA on the base model when the current policy is the base.
    """

    def __init__(
        self,
        store: PolicyStore,
        *,
        settings: RestemSettings,
        base_model_dir: Path,
        work_dir: Path,
        num_threads: int | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._base_model_dir = base_model_dir
        self._work_dir = work_dir
        self._num_threads = num_threads
        self._stop = stop

    async def train(
        self, examples: Sequence[PolicyExample], *, parent: PolicyRef, round_index: int
    ) -> PolicyRef:
        from workers.training.peft_trainer import ChatExample

        if not examples:
            raise ValueError("policy training needs at least one kept self-edit")
        init = await self._store.adapter_dir(parent) if parent is not None else None
        hyper = policy_hyper(self._settings, len(examples), num_threads=self._num_threads)
        out = self._work_dir / f"policy-r{round_index}-{uuid.uuid4().hex[:8]}"
        chats = [ChatExample(e.prompt, e.completion) for e in examples]
        try:
            result = await train_in_thread(
                self._base_model_dir, chats, out, hyper, init_adapter_dir=init, stop=self._stop
            )
            logger.info(
                "policy round %d: %d examples, %d steps, loss %.3f",
                round_index, len(examples), result.steps, result.final_loss,
            )  # fmt: skip
            return await self._store.register(
                out, parent=parent, round_index=round_index, examples=examples
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)
