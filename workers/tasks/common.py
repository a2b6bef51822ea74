"""What the pipeline stages share: document/probe records, the QA prompt, stage artifacts."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

QA_PROMPT = "Let's answer a question directly and concisely.\nQuestion: {question}\nAnswer:"
"""SEAL's no-context answer prompt, sent as the user turn of the chat template."""

ACTOR = "worker"
"""Who the registry and audit rows name for pipeline changes."""


@dataclass(frozen=True)
class Probe:
    """A held-out QA pair about a document (never trained on)."""

    question: str
    answer: str
    source: str = "given"  # given | generated
    title: str = ""

    def as_json(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer, "source": self.source}


@dataclass(frozen=True)
class Doc:
    """The pipeline's view of a stored document."""

    id: str
    title: str
    text: str
    probes: tuple[Probe, ...] = field(default_factory=tuple)


class DocumentRow(Protocol):
    """The columns of `app.db.jobs.Document` the pipeline reads."""

    @property
    def id(self) -> str: ...

    @property
    def title(self) -> str | None: ...

    @property
    def text(self) -> str: ...

    @property
    def probes(self) -> list[dict[str, Any]]: ...


def default_title(text: str) -> str:
    """A document without a title is named after its first words (SEAL prefixes every
    training sequence and question with the title, which ties them together)."""
    words = text.split()[:6]
    return " ".join(words).rstrip(".,;:") or "Document"


def probes_from_json(items: Sequence[Mapping[str, Any]] | None, title: str) -> tuple[Probe, ...]:
    out = []
    for item in items or ():
        question, answer = str(item.get("question", "")).strip(), str(item.get("answer", ""))
        if question and answer.strip():
            out.append(Probe(question, answer.strip(), str(item.get("source", "given")), title))
    return tuple(out)


def as_doc(row: DocumentRow) -> Doc:
    title = (row.title or "").strip() or default_title(row.text)
    return Doc(row.id, title, row.text, probes_from_json(row.probes, title))


def qa_messages(title: str, question: str) -> list[dict[str, str]]:
    """The chat turn that asks one question without its document (SEAL's `Topic:` format)."""
    topic = f"Topic: {title}\n{question}" if title else question
    return [{"role": "user", "content": QA_PROMPT.format(question=topic)}]


# -- artifacts -------------------------------------------------------------------------------

_ATTEMPT_DIR = re.compile(r"^attempt-(\d+)$")


def save_artifact(artifacts_dir: Path, name: str, data: Any) -> Path:
    """Writes ``name`` (JSON) atomically: a crash leaves the old file or none, never half."""
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    path = artifacts_dir / name
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def load_artifact(artifacts_dir: Path, name: str) -> Any | None:
    """``name`` from this attempt, else from the newest earlier attempt of the same job.

    Stages are deterministic given their inputs, so an earlier attempt's finished output is
    as good as a new one and saves the work (e.g. after a worker was killed mid-training).
    """
    for directory in _attempt_dirs(artifacts_dir):
        path = directory / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                logger.warning("ignoring unreadable artifact %s", path)
    return None


def _attempt_dirs(artifacts_dir: Path) -> list[Path]:
    match = _ATTEMPT_DIR.match(artifacts_dir.name)
    if match is None:
        return [artifacts_dir]
    current = int(match.group(1))
    earlier = []
    for sibling in artifacts_dir.parent.glob("attempt-*"):
        m = _ATTEMPT_DIR.match(sibling.name)
        if m is not None and int(m.group(1)) < current:
            earlier.append((int(m.group(1)), sibling))
    return [artifacts_dir, *(p for _, p in sorted(earlier, reverse=True))]


def _json_default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
