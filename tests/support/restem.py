"""Scripted ReSTEM parts for fast tests of the loop's logic (never the only test: the same loop
runs on the real engine and PEFT in tests/workers/restem/test_restem_live.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.metrics import QAScore
from workers.restem import (
    PolicyExample,
    PolicyRef,
    SampleRequest,
    SamplingOptions,
    TrialResult,
)
from workers.tasks.common import Doc, Probe


def scripted_doc(i: int) -> Doc:
    title = f"Island {i}"
    text = (
        f"Tamsk {i} lies in the Sorrel Sea. Its port city Olverhaven {i} brews kelloth from "
        "brisk grain every spring."
    )
    return Doc(f"doc_{i}", title, text, (Probe(f"Where does Tamsk {i} lie?", "Sorrel Sea"),))


DOCS = [scripted_doc(i) for i in range(4)]
BASELINE = 0.1
GAIN = {"implications": 0.0, "implications_long": 0.1, "rewrite": 0.3, "self_qa": 0.0}
"""Reward per format of the base policy; a trained policy adds POLICY_BONUS."""
POLICY_BONUS = 0.2


@dataclass
class ScriptedSampler:
    """Self-edits that restate the document, tagged with format and policy; self_qa is empty."""

    calls: list[tuple[PolicyRef, str, str, int]] = field(default_factory=list)

    async def sample(
        self, policy: PolicyRef, request: SampleRequest, options: SamplingOptions
    ) -> list[str]:
        self.calls.append((policy, request.doc.id, request.format, request.n))
        if request.format == "self_qa":
            return [""] * request.n
        tag = f"{request.format} {policy or 'base'}".replace("_", " ")
        return [
            f"Olverhaven port brews kelloth from brisk grain {tag} {j}\n"
            f"Tamsk lies in the Sorrel Sea {tag}"
            for j in range(request.n)
        ]


@dataclass
class ScriptedInnerLoop:
    """Scores from the tags in the self-edit; repeat r adds r * 0.02 (reward noise)."""

    good_policies: set[str] = field(default_factory=set)
    trials: list[tuple[str, int]] = field(default_factory=list)

    async def baseline(self, doc: Doc) -> QAScore:
        return QAScore(BASELINE, 0.0, 0.0, len(doc.probes))

    async def trial(self, doc: Doc, self_edit: str, *, repeat: int) -> TrialResult:
        self.trials.append((doc.id, repeat))
        gain = max(v for f, v in GAIN.items() if f.replace("_", " ") in self_edit)
        if any(p in self_edit for p in self.good_policies):
            gain += POLICY_BONUS
        return TrialResult(QAScore(BASELINE + gain + 0.02 * repeat, 0.0, 0.0, 1))


@dataclass
class ScriptedTrainer:
    examples: list[list[PolicyExample]] = field(default_factory=list)
    parents: list[PolicyRef] = field(default_factory=list)

    async def train(
        self, examples: Sequence[PolicyExample], *, parent: PolicyRef, round_index: int
    ) -> PolicyRef:
        self.examples.append(list(examples))
        self.parents.append(parent)
        return f"policy{round_index}"


@dataclass
class Recorder:
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)

    async def event(self, kind: str, message: str, **data: Any) -> None:
        self.events.append((kind, message, data))

    async def progress(self, stage: str, fraction: float) -> None:
        self.fractions.append(fraction)
