"""The ReSTEM conditions of the learning benchmark: the engine-agnostic loop of workers/restem
run in-process (sampler, inner loop and policy trainer on the bench's engine and PEFT)."""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.learning_engine import BASE, InProcessChat
from workers.tasks.common import Doc
from workers.tasks.synthesize import SelfEditSample

if TYPE_CHECKING:
    from app.settings import RestemSettings
    from bench.learning_run import Bench
    from workers.restem import FormatStats, PolicyExample, PolicyRef, RestemLoop, RestemResult

logger = logging.getLogger("bench.learning")

Sampler = Callable[[list[Doc]], Awaitable[list[SelfEditSample]]]
"""Samples self-edits for some documents (base policy, or a ReSTEM policy)."""
SUMMARY = "summary.json"


class RestemUnavailable(RuntimeError):
    """The ReSTEM conditions cannot run; the message says why (it goes into the JSON)."""


class BenchAdapterHost:
    """`AdapterHost`: trial adapters are served by name from the bench's engine."""

    def __init__(self, chat: InProcessChat) -> None:
        self.chat = chat

    async def publish(self, adapter_dir: Path, *, label: str) -> str:
        return self.chat.add_adapter(f"trial-{uuid.uuid4().hex[:12]}", adapter_dir)

    async def retire(self, model: str) -> None:
        self.chat.remove_adapter(model)


class BenchPolicyStore:
    """`PolicyStore`: policy adapters kept in the work dir as ``policies/round-<r>``."""

    def __init__(self, chat: InProcessChat, root: Path) -> None:
        self.chat = chat
        self.root = root
        self.paths: dict[str, Path] = {}

    async def adapter_dir(self, policy: str) -> Path:
        return self.paths[policy]

    async def register(
        self,
        adapter_dir: Path,
        *,
        parent: PolicyRef,
        round_index: int,
        examples: Sequence[PolicyExample],
    ) -> str:
        dest = self.root / f"round-{round_index}"
        shutil.rmtree(dest, ignore_errors=True)  # a killed earlier run's leftover
        shutil.copytree(adapter_dir, dest)  # the trainer deletes its own folder afterwards
        name = self.chat.add_adapter(f"policy-r{round_index}", dest)
        self.paths[name] = dest
        logger.info("policy %s (parent %s): %d examples", name, parent or BASE, len(examples))
        return name


class LogReporter:
    """`Reporter`: the loop's events and progress go to the bench's log."""

    async def event(self, kind: str, message: str, **data: Any) -> None:
        logger.info("restem %s: %s", kind, message)

    async def progress(self, stage: str, fraction: float) -> None:
        logger.debug("restem progress %s %.2f", stage, fraction)


@dataclass(frozen=True)
class PolicyAfterRound:
    """What round r left: the policy in force (None = base) and the format statistics."""

    policy: str | None
    path: Path | None
    stats: FormatStats


class RestemStage:
    """Runs the ReSTEM rounds on ``--train`` once per work dir and samples the dev
    passages' self-edits from the policy after round r."""

    def __init__(self, args: argparse.Namespace, bench: Bench) -> None:
        self.args = args
        self.bench = bench
        path = args.work_dir / "restem" / SUMMARY
        # Finished rounds are reported even when no restem condition is selected this time.
        self.summary: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self._after: list[PolicyAfterRound] | None = None
        self._loop: RestemLoop | None = None
        self._error: str | None = None

    async def sampler(self, round_number: int) -> Sampler:
        after = await self._rounds()
        if round_number > len(after):
            raise RestemUnavailable(f"only {len(after)} ReSTEM round(s) were run (--restem-rounds)")
        state, loop = after[round_number - 1], self._loop
        assert loop is not None  # set together with self._after
        s, k = self.args.restem_settings, self.args.k

        async def sample(docs: list[Doc]) -> list[SelfEditSample]:
            rng = random.Random(f"{s.seed}:dev:{round_number}")
            plans = {
                d.id: state.stats.choose(
                    k, rng, exploration=s.format_exploration, temperature=s.format_temperature
                )
                for d in docs
            }
            edits = await loop.sample(state.policy, docs, plans)
            return [SelfEditSample(e.doc_id, e.format, e.text, e.reason) for e in edits]

        return sample

    async def _rounds(self) -> list[PolicyAfterRound]:
        if self._after is not None:
            return self._after
        if self._error is not None:
            raise RestemUnavailable(self._error)
        try:
            self._after = await self._run_or_load()
        except ImportError as e:
            self._error = f"the ReSTEM core (workers.restem) cannot be imported: {e}"
            raise RestemUnavailable(self._error) from e
        except Exception as e:  # a failed outer loop makes both conditions unrunnable
            logger.exception("ReSTEM run failed")
            self._error = f"the ReSTEM run failed: {type(e).__name__}: {e}"
            raise RestemUnavailable(self._error) from e
        return self._after

    async def _run_or_load(self) -> list[PolicyAfterRound]:
        from bench.learning_run import load_passages
        from workers.restem import FormatStats, RestemLoop, RestemParts
        from workers.restem.parts import ChatSampler, PeftInnerLoop, PeftPolicyTrainer

        args, s, chat = self.args, self.args.restem_settings, self.bench.chat
        root = args.work_dir / "restem"
        store = BenchPolicyStore(chat, root / "policies")
        inner = PeftInnerLoop(
            chat,
            BenchAdapterHost(chat),
            settings=s,
            base_model_dir=args.model_dir,
            start_model=BASE,
            start_adapter_dir=None,
            work_dir=root / "trials",
            eval_max_tokens=args.eval_max_tokens,
            eval_concurrency=args.concurrency,
            num_threads=args.train_threads,
        )
        trainer = PeftPolicyTrainer(
            store,
            settings=s,
            base_model_dir=args.model_dir,
            work_dir=root / "training",
            num_threads=args.train_threads,
        )
        parts = RestemParts(ChatSampler(chat, base_model=BASE), inner, trainer, LogReporter())
        self._loop = RestemLoop(parts, s)
        path = self.args.work_dir / "restem" / SUMMARY
        if path.is_file():
            self.summary = json.loads(path.read_text())
            logger.info("ReSTEM: reusing the rounds in %s", path)
        else:
            docs = [p.as_doc() for p in load_passages(self.args.train)]
            result = await self._loop.run(docs, policy=None)
            self.summary = summarize_rounds(result, store.paths, s, use=args.restem_policy)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.summary, indent=2))
        after = []
        for row in self.summary["after_round"]:
            policy, adapter = row["policy"], row["path"]
            if policy is not None:
                chat.add_adapter(policy, Path(adapter))
            stats = FormatStats.from_json(s.formats, row["format_stats"])
            after.append(PolicyAfterRound(policy, Path(adapter) if adapter else None, stats))
        return after


def summarize_rounds(
    result: RestemResult, paths: dict[str, Path], settings: RestemSettings, *, use: str
) -> dict[str, Any]:
    """The rounds as JSON plus, per round, the policy to sample from after it and the format
    statistics up to it. ``use="promoted"``: the policy in force (a candidate counts only
    when the loop's gate promoted it); ``"candidate"``: every round's trained policy, as SEAL
    does (it has no gate)."""
    from workers.restem import FormatStats

    stats = FormatStats(list(settings.formats))
    policy: str | None = None
    after = []
    for rnd in result.rounds:
        for edit in rnd.edits:
            stats.record(edit)
        for edit in rnd.winners.values():
            stats.record_win(edit.format)
        if rnd.candidate is not None and (rnd.promoted or use == "candidate"):
            policy = rnd.candidate
        path = paths.get(policy) if policy is not None else None
        after.append(
            {
                "round": rnd.round_index + 1,
                "policy": policy,
                "path": str(path) if path is not None else None,
                "format_stats": stats.as_json(),
            }
        )
    return {**result.as_json(), "use": use, "after_round": after}
