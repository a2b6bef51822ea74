"""The ReSTEM loop's collaborators as Protocols, and the records passed between them.

The loop (workers/restem/loop.py) never touches an engine, a registry or a GPU itself. It
needs three things, each a small Protocol here:

* ``SelfEditSampler``: sample self-edits from a self-edit policy (the worker: chat
  completions through the gateway; a benchmark: its own in-process vLLM engine).
* ``InnerLoop``: SEAL's inner loop for one (document, self-edit): train a temporary LoRA
  adapter on the document + that self-edit from the starting adapter, score it on the
  document's probes without the document in context, clean it up.
* ``PolicyTrainer``: behaviour cloning, i.e. fine-tune a new self-edit policy adapter on
  (self-edit prompt -> kept self-edit) chat examples.

A policy is named by an opaque ``PolicyRef``: ``None`` is the base model, anything else is
whatever the implementation's ``PolicyTrainer.train`` returned (the worker: a pinned model
name such as ``acme-policy@v3``; a benchmark: a LoRA name or folder it knows how to serve).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from workers.metrics import QAScore
from workers.tasks.common import Doc

PolicyRef = str | None
"""A self-edit policy: None = the base model; otherwise opaque to the loop."""


@dataclass(frozen=True)
class SampleRequest:
    """Ask ``policy`` for ``n`` self-edits of ``doc`` in ``format`` (``prompt`` is rendered)."""

    doc: Doc
    format: str
    prompt: str
    n: int


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling knobs for self-edits (temperature 1.0 / top_p 0.95 in SEAL)."""

    temperature: float
    top_p: float
    max_tokens: int


@dataclass(frozen=True)
class PolicyExample:
    """One behaviour-cloning example: the self-edit prompt (user turn) and the kept edit."""

    prompt: str
    completion: str
    document_id: str
    format: str
    reward: float


@dataclass(frozen=True)
class TrialResult:
    """One inner-loop run: the trained adapter's probe score (and its answers)."""

    score: QAScore
    seconds: float = 0.0
    steps: int = 0
    answers: tuple[str, ...] = field(default=(), repr=False)


class SelfEditSampler(Protocol):
    """Samples self-edits from a policy."""

    async def sample(
        self, policy: PolicyRef, request: SampleRequest, options: SamplingOptions
    ) -> list[str]:
        """``request.n`` completions of ``request.prompt`` (sent as the user turn of the chat
        template) from ``policy``; concurrent calls are allowed and should be batched."""
        ...


class InnerLoop(Protocol):
    """Trains and scores one temporary adapter per (document, self-edit)."""

    async def baseline(self, doc: Doc) -> QAScore:
        """The starting adapter's (or base model's) score on ``doc.probes``, no context."""
        ...

    async def trial(self, doc: Doc, self_edit: str, *, repeat: int) -> TrialResult:
        """Trains a temporary adapter on ``doc`` + ``self_edit`` from the starting adapter
        (seeded by ``repeat``), scores it on ``doc.probes`` without context and removes it
        again (files, registry rows, engine slots) before returning, also on failure.
        Called one at a time: trainings do not run concurrently."""
        ...


class PolicyTrainer(Protocol):
    """Fine-tunes the self-edit policy adapter."""

    async def train(
        self, examples: Sequence[PolicyExample], *, parent: PolicyRef, round_index: int
    ) -> PolicyRef:
        """A new policy trained on ``examples`` (continuing from ``parent`` when it is an
        adapter, else a fresh LoRA on the base model); returns how to sample from it."""
        ...


class Reporter(Protocol):
    """Where the loop reports progress and numbers (the worker: job events)."""

    async def event(self, kind: str, message: str, **data: Any) -> None:
        """kind: log | metric (as job events)."""
        ...

    async def progress(self, stage: str, fraction: float) -> None:
        """Overall progress of the whole run, 0..1; ``stage`` names what runs now.

        Raising here (e.g. the job was cancelled) stops the loop."""
        ...


class NullReporter:
    """A Reporter that drops everything (tests, benchmarks that keep their own logs)."""

    async def event(self, kind: str, message: str, **data: Any) -> None:
        return None

    async def progress(self, stage: str, fraction: float) -> None:
        return None
