"""Train stage: PEFT LoRA SFT on the job's documents + self-edits (+ replay), registered as a
candidate keyed by the job id (incremental from the champion, fresh, consolidated, or merged:
the champion's update plus the job's documents trained alone from the base)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from app.errors import NotFound
from workers.tasks.anchors import sample_anchors
from workers.tasks.common import ACTOR, Doc, load_artifact, save_artifact
from workers.tasks.history import LearnedDoc
from workers.tasks.synthesize import SelfEditSample
from workers.training.datasets import DocumentData, TrainingSet, build_training_set, plan_steps
from workers.training.orthogonal import OrthogonalTo
from workers.training.threads import ThreadBudget, training_budget

if TYPE_CHECKING:
    from adapters_store.registry import ResolvedVersion
    from workers.pipeline import StageContext
    from workers.training.peft_trainer import LoRAHyper, TrainExample, TrainResult

logger = logging.getLogger(__name__)

Mode = Literal["fresh", "incremental", "consolidate", "merge"]
PROGRESS_EVERY_S = 1.0
ENGINE_POLL_S = 1.0
"""How often a training run checks whether the engine serves requests (CPU thread budget)."""
ANCHOR_STATES_DIR = "anchor-states"
"""Under the data dir's cache: the base model's hidden states of anchor prompts, kept across
jobs (`workers.training.anchor_reference.StateCache`)."""


class TrainingStopped(RuntimeError):
    """The attempt was told to stop (lease lost, cancelled, worker stopping)."""


@dataclass(frozen=True)
class Candidate:
    """The registered output of the train stage."""

    version_id: int
    version: int
    name: str  # "acme@v3": how the gateway serves it pinned
    mode: str

    @property
    def merged(self) -> bool:
        """The champion's update plus this job's part (`merge_stage`, any draw of it)."""
        return merge_part_key(self.mode) is not None


def training_set(
    ctx: StageContext,
    docs: Sequence[Doc],
    edits: Sequence[SelfEditSample],
    history: Sequence[LearnedDoc],
    mode: Mode,
    *,
    replay: bool = False,
) -> TrainingSet:
    """Incremental: new + replay; fresh: new only; merge: new only, or new + replay when
    ``replay``; consolidate: everything, from the base."""
    settings = ctx.settings.pipeline
    kept: dict[str, list[str]] = {}
    for edit in edits:
        if edit.kept:
            kept.setdefault(edit.document_id, []).append(edit.text)
    new = [DocumentData(d.title, d.text, tuple(kept.get(d.id, ()))) for d in docs]
    earlier = [DocumentData(h.doc.title, h.doc.text, h.self_edits) for h in history]
    if mode == "consolidate":
        new, earlier = earlier + new, []
    return build_training_set(
        new,
        earlier if mode == "incremental" or (mode == "merge" and replay) else [],
        replay_fraction=settings.replay_fraction,
        replay_passages=settings.replay_passages,
        sentences=settings.sentence_sequences,
        max_edit_segments=settings.max_edit_segments,
        seed=ctx.job_id,
    )


def hyper_for(ctx: StageContext, n_sequences: int, mode: Mode) -> LoRAHyper:
    from workers.training.peft_trainer import LoRAHyper

    s = ctx.settings.pipeline
    cap = s.consolidate_max_steps if mode == "consolidate" else s.max_steps
    steps = plan_steps(
        n_sequences, epochs=s.epochs, batch_size=s.batch_size, steps=s.steps, max_steps=cap
    )
    return LoRAHyper(
        rank=s.rank,
        alpha=s.alpha,
        target_modules=tuple(s.targets),
        lr=s.lr,
        steps=steps,
        batch_size=s.batch_size,
        max_len=s.max_seq_len,
        seed=s.seed,
        anchor_kl=s.anchor_kl,
    )


@dataclass(frozen=True)
class TrainInputs:
    """Everything a training run of this job draws from."""

    docs: Sequence[Doc]
    edits: Sequence[SelfEditSample]
    learned: Sequence[LearnedDoc]
    anchor_pool: Sequence[tuple[str, str]] = ()


DRAW_SEED_STRIDE = 1000
"""Draw n trains with the pipeline's seed + n x this (far from the +1 of training further)."""


def draw_key(mode: str, draw: int) -> str:
    """``fresh``, or ``fresh-draw1`` for another draw: the registration key (note prefix)."""
    return mode if draw == 0 else f"{mode}-draw{draw}"


async def train_stage(
    ctx: StageContext,
    inputs: TrainInputs,
    *,
    parent: ResolvedVersion | None,
    mode: Mode,
    draw: int = 0,
) -> Candidate:
    """Trains (or reuses) this job's adapter for ``mode`` and registers it once. ``draw`` n > 0
    trains the same sequences again with other seeds (LoRA initialisation, step order, anchor
    sample): what a run forgets varies between draws (`bench/forgetting.py`)."""
    key = draw_key(mode, draw)
    existing = await _registered(ctx, key)
    if existing is not None:
        return existing
    docs, edits, history = inputs.docs, inputs.edits, inputs.learned
    data, anchors = _job_data(ctx, inputs, mode, draw=draw)
    init_dir = None
    if mode == "incremental" and parent is not None:
        init_dir = await asyncio.to_thread(ctx.registry.blobs.path_for, parent.blob_sha256)
    hyper = hyper_for(ctx, len(data.sequences) + len(anchors), mode)
    hyper = replace(hyper, seed=hyper.seed + DRAW_SEED_STRIDE * draw)
    adapter_dir = await _trained_adapter(
        ctx,
        data,
        anchors,
        hyper,
        key=key,
        init_dir=init_dir,
        init_name=parent.name if parent is not None and init_dir is not None else "base",
    )
    lineage = {
        "job_id": ctx.job_id,
        "mode": key,
        "parent": parent.name if parent is not None else None,
        "documents": [d.id for d in docs],
        "replayed_documents": [h.doc.id for h in history] if mode != "fresh" else [],
        "self_edits": [e.id for e in edits if e.kept and e.id is not None],
        "sequences": {**data.sources, "anchors": len(anchors)},
        **({"draw": draw} if draw else {}),
    }
    # A consolidated version is trained from the base, but it replaces the champion: its
    # lineage names it, and a retry of this job finds its way back through it.
    return await _register(ctx, adapter_dir, lineage, parent, detail=f"{len(docs)} document(s)")


MERGE_PART = "merge-part"
"""The artifact key of a merge candidate's own part: the job's documents trained from the base."""


def merge_part_key(mode: str) -> str | None:
    """The artifact key of the part a merged candidate (registered as ``mode``) adds to the
    champion: ``merge-part`` for ``merge``, ``merge-part-draw1`` for ``merge-draw1``,
    ``merge-part-more`` for ``merge-more`` (its part trained further); None for any other
    mode (a tempered copy of a merged candidate included)."""
    found = re.fullmatch(r"merge((?:-draw\d+)?(?:-more)?)", mode)
    return None if found is None else MERGE_PART + found.group(1)


def merge_replays(ctx: StageContext, *, after_retention_broke: bool) -> bool:
    """Whether a merge part is trained with the earlier documents' replay sample
    (`merge_replay`): never (the default), always, or (``redraw``) for a part drawn again
    because the merged candidate before it broke retention."""
    setting = ctx.settings.pipeline.merge_replay
    return setting == "always" or (setting == "redraw" and after_retention_broke)


async def merge_orthogonal(ctx: StageContext, champion: ResolvedVersion) -> OrthogonalTo | None:
    """How a merged candidate's part is kept orthogonal to the champion's update
    (`merge_orthogonal`), or None when it is not."""
    side = ctx.settings.pipeline.merge_orthogonal
    if side == "off":
        return None
    champion_dir = await asyncio.to_thread(ctx.registry.blobs.path_for, champion.blob_sha256)
    return OrthogonalTo(champion_dir, side, champion.name)


async def merge_stage(
    ctx: StageContext,
    inputs: TrainInputs,
    *,
    champion: ResolvedVersion,
    draw: int = 0,
    after_retention_broke: bool = False,
) -> Candidate:
    """Trains the job's documents from the base (as a first version would be; with the
    earlier documents' replay sample when `merge_replays` says so: a draw made because the
    merged candidate before it broke retention passes ``after_retention_broke``) and
    registers, once per job and draw, the adapter whose update is the champion's plus that one
    (`workers.training.merge`): what the champion knew is kept as it was, instead of being
    trained on from (incremental), and the new update is learned without it in the way.
    ``draw`` n > 0 trains the part again with other seeds, as `train_stage` does."""
    key = draw_key("merge", draw)
    existing = await _registered(ctx, key)
    if existing is not None:
        return existing
    replay = merge_replays(ctx, after_retention_broke=after_retention_broke)
    data, anchors = _job_data(ctx, inputs, "merge", draw=draw, replay=replay)
    hyper = hyper_for(ctx, len(data.sequences) + len(anchors), "merge")
    hyper = replace(hyper, seed=hyper.seed + DRAW_SEED_STRIDE * draw)
    # The part is kept as an artifact: tempering re-adds it to the champion at a smaller scale.
    part_key = draw_key(MERGE_PART, draw)  # merge-part, merge-part-draw1, ...
    orthogonal = await merge_orthogonal(ctx, champion)
    part_dir = await _trained_adapter(
        ctx, data, anchors, hyper, key=part_key, init_dir=None, orthogonal=orthogonal
    )
    out_dir = await merged_adapter(ctx, champion, part_dir, key=key, weight=1.0)
    lineage = {
        "job_id": ctx.job_id,
        "mode": key,
        "parent": champion.name,
        "summed": {"champion": champion.name, "documents": "this job's, trained from the base"},
        "documents": [d.id for d in inputs.docs],
        "replayed_documents": [h.doc.id for h in inputs.learned] if data.sources["replay"] else [],
        "self_edits": [e.id for e in inputs.edits if e.kept and e.id is not None],
        "sequences": {**data.sources, "anchors": len(anchors)},
        **({"draw": draw} if draw else {}),
        **_orthogonal_lineage(orthogonal),
    }
    detail = f"{champion.name} + {len(inputs.docs)} document(s) trained from the base"
    return await _register(ctx, out_dir, lineage, champion, detail=detail)


async def exact_merge_refusal(ctx: StageContext, champion: ResolvedVersion) -> str | None:
    """Why this job's merged candidate would not be the champion's update plus the new one
    exactly (a config the sum refuses, or a sum above the engine's ``max_lora_rank``, cut by
    SVD), or None when it would be."""
    from workers.training.adapter_files import CONFIG
    from workers.training.merge import exact_sum_refusal

    champion_dir = await asyncio.to_thread(ctx.registry.blobs.path_for, champion.blob_sha256)
    config = json.loads((champion_dir / CONFIG).read_text())
    settings = ctx.settings
    return exact_sum_refusal(config, settings.pipeline.rank, settings.engine.max_lora_rank)


async def merged_adapter(
    ctx: StageContext, champion: ResolvedVersion, part_dir: Path, *, key: str, weight: float
) -> Path:
    """Writes ``adapter-{key}``: the champion's update plus ``weight`` times ``part_dir``'s,
    cut to the engine's ``max_lora_rank`` when the sum is larger."""
    import shutil

    from workers.training.merge import sum_adapters

    champion_dir = await asyncio.to_thread(ctx.registry.blobs.path_for, champion.blob_sha256)
    out_dir = ctx.artifacts_dir / f"adapter-{key}"
    shutil.rmtree(out_dir, ignore_errors=True)  # a partial folder from a killed attempt
    await asyncio.to_thread(
        sum_adapters,
        [champion_dir, part_dir],
        out_dir,
        weights=[1.0, weight],
        max_rank=ctx.settings.engine.max_lora_rank,
    )
    return out_dir


def extend_key(candidate: Candidate) -> str:
    """``fresh-more``: the registration key (note prefix) of a candidate trained further."""
    return f"{candidate.mode}-more"


async def extend_stage(
    ctx: StageContext,
    inputs: TrainInputs,
    source: Candidate,
    *,
    mode: Mode,
    parent: ResolvedVersion | None,
    steps: int,
) -> Candidate:
    """Trains ``source`` (this job's ``mode`` candidate, which did not learn its documents)
    ``steps`` more optimizer steps on the same training set in a new order; registers it once
    per job. A merged ``source`` has its part trained further and added to the champion
    (``parent``) again (`_extend_merged`)."""
    key = extend_key(source)
    existing = await _registered(ctx, key)
    if existing is not None:
        return existing
    if source.merged:
        if parent is None:
            raise ValueError(f"{source.name} adds to a champion, and there is none")
        return await _extend_merged(ctx, inputs, source, champion=parent, steps=steps)
    data, anchors = _job_data(ctx, inputs, mode)
    resolved = await ctx.registry.resolve(source.name)
    init_dir = await asyncio.to_thread(ctx.registry.blobs.path_for, resolved.blob_sha256)
    hyper = hyper_for(ctx, len(data.sequences) + len(anchors), mode)
    hyper = replace(hyper, steps=steps, seed=hyper.seed + 1)  # the same data in another order
    adapter_dir = await _trained_adapter(
        ctx, data, anchors, hyper, key=key, init_dir=init_dir, init_name=source.name
    )
    lineage = {
        "job_id": ctx.job_id,
        "mode": key,
        "extends": source.name,
        "parent": parent.name if parent is not None else None,
        "documents": [d.id for d in inputs.docs],
        "sequences": {**data.sources, "anchors": len(anchors)},
    }
    detail = f"{source.name} trained {steps} more steps"
    return await _register(ctx, adapter_dir, lineage, parent, detail=detail)


async def _extend_merged(
    ctx: StageContext,
    inputs: TrainInputs,
    source: Candidate,
    *,
    champion: ResolvedVersion,
    steps: int,
) -> Candidate:
    """``source``'s part (a merged candidate's, `merge_part_key`) trained ``steps`` more on
    the sequences it was trained on (its draw's anchors, its replay), in a new order, kept as
    the artifact ``merge-part...-more`` and added to ``champion`` (``merge...-more``)."""
    key = extend_key(source)
    part_key, more_key = merge_part_key(source.mode), merge_part_key(key)
    part = None if part_key is None else load_artifact(ctx.artifacts_dir, f"train-{part_key}.json")
    if more_key is None or part is None:
        raise ValueError(f"the part {source.name} adds to {champion.name} is gone")
    resolved = await ctx.registry.resolve(source.name)
    source_dir = await asyncio.to_thread(ctx.registry.blobs.path_for, resolved.blob_sha256)
    made = json.loads((source_dir / "manifest.json").read_text())
    draw = int(made.get("draw", 0))
    data, anchors = _job_data(
        ctx, inputs, "merge", draw=draw, replay=bool(made.get("replayed_documents"))
    )
    hyper = hyper_for(ctx, len(data.sequences) + len(anchors), "merge")
    seed = hyper.seed + DRAW_SEED_STRIDE * draw + 1  # the same data in another order
    orthogonal = await merge_orthogonal(ctx, champion)
    part_dir = await _trained_adapter(
        ctx,
        data,
        anchors,
        replace(hyper, steps=steps, seed=seed),
        key=more_key,
        init_dir=Path(part["adapter_dir"]),
        init_name=f"{source.name}'s part",
        orthogonal=orthogonal,
    )
    out_dir = await merged_adapter(ctx, champion, part_dir, key=key, weight=1.0)
    lineage = {
        **{k: made[k] for k in ("documents", "replayed_documents", "self_edits") if k in made},
        "job_id": ctx.job_id,
        "mode": key,
        "extends": source.name,
        "parent": champion.name,
        "summed": {"champion": champion.name, "documents": "this job's, trained from the base"},
        "sequences": {**data.sources, "anchors": len(anchors)},
        **({"draw": draw} if draw else {}),
        **_orthogonal_lineage(orthogonal),
    }
    detail = f"{champion.name} + {source.name}'s part trained {steps} more steps"
    return await _register(ctx, out_dir, lineage, champion, detail=detail)


def _orthogonal_lineage(orthogonal: OrthogonalTo | None) -> dict[str, Any]:
    """The lineage entry of a part trained orthogonal to the champion (none otherwise)."""
    if orthogonal is None:
        return {}
    return {"orthogonal_to": {"version": orthogonal.name, "side": orthogonal.side}}


async def _registered(ctx: StageContext, key: str) -> Candidate | None:
    """The version an earlier attempt of this job registered under ``key``, if any."""
    existing = await job_version(ctx, key)
    if existing is not None:
        await ctx.event("log", f"reusing {existing.name} registered by an earlier attempt")
    return existing


def _job_data(
    ctx: StageContext, inputs: TrainInputs, mode: Mode, *, draw: int = 0, replay: bool = False
) -> tuple[TrainingSet, list[tuple[str, str]]]:
    """The job's training sequences for ``mode`` (a merge part's with the replay sample when
    ``replay``) and its anchors (both seeded by the job, the anchors also by the draw)."""
    data = training_set(ctx, inputs.docs, inputs.edits, inputs.learned, mode, replay=replay)
    anchors = sample_anchors(
        list(inputs.anchor_pool),
        len(data.sequences),
        ctx.settings.pipeline.anchor_fraction,
        seed=ctx.job_id if draw == 0 else f"{ctx.job_id}/draw{draw}",
    )
    return data, anchors


async def _register(
    ctx: StageContext,
    adapter_dir: Path,
    lineage: dict[str, Any],
    parent: ResolvedVersion | None,
    *,
    detail: str,
) -> Candidate:
    """Writes the lineage manifest and registers the adapter once under ``lineage["mode"]``."""
    (adapter_dir / "manifest.json").write_text(json.dumps(lineage, indent=2) + "\n")
    candidate = await register_once(
        ctx,
        adapter_dir,
        lineage["mode"],
        parent_version=parent.version if parent is not None else None,
        detail=detail,
    )
    await ctx.event("log", f"registered candidate {candidate.name} ({detail})", **lineage)
    return candidate


async def register_once(
    ctx: StageContext, adapter_dir: Path, key: str, *, parent_version: int | None, detail: str
) -> Candidate:
    """Registers this job's ``key`` adapter unless an earlier attempt already did."""
    async with ctx.fenced():
        # Checked under the fence: an attempt that lost its lease never gets here.
        existing = await job_version(ctx, key)
        if existing is not None:
            return existing
        row = await ctx.registry.register_version(
            ctx.namespace,
            adapter_dir,
            ACTOR,
            parent_version=parent_version,
            job_id=ctx.job_id,
            note=f"{key}: job {ctx.job_id}, {detail}",
        )
    return Candidate(row.id, row.version, row.name, key)


async def job_version(ctx: StageContext, mode: str) -> Candidate | None:
    """The version this job registered for ``mode`` (its note starts with the mode)."""
    try:
        versions = await ctx.registry.list_versions(ctx.namespace)
    except NotFound:
        return None
    for v in versions:
        if v.job_id == ctx.job_id and (v.note or "").startswith(f"{mode}:"):
            return Candidate(v.id, v.version, v.name, mode)
    return None


async def _trained_adapter(
    ctx: StageContext,
    data: TrainingSet,
    anchors: Sequence[tuple[str, str]],
    hyper: LoRAHyper,
    *,
    key: str,
    init_dir: Path | None,
    init_name: str = "base",
    orthogonal: OrthogonalTo | None = None,
) -> Path:
    """The adapter folder: an earlier attempt's finished one, else a new training run (from
    ``init_dir``'s adapter when given, else a fresh LoRA; kept ``orthogonal`` to an adapter
    when given)."""
    artifact = f"train-{key}.json"
    cached = load_artifact(ctx.artifacts_dir, artifact)
    if cached is not None and (Path(cached["adapter_dir"]) / "adapter_config.json").is_file():
        await ctx.event("log", f"reusing the {key} adapter trained by an earlier attempt")
        return Path(cached["adapter_dir"])
    from workers.training.peft_trainer import ChatExample, TextExample

    out_dir = ctx.artifacts_dir / f"adapter-{key}"
    examples: list[TrainExample] = [TextExample(s) for s in data.sequences]
    examples.extend(ChatExample(user, answer, anchor=True) for user, answer in anchors)
    settings = ctx.settings.pipeline
    budget = training_budget(settings.train_threads, adaptive=settings.adaptive_train_threads)
    hyper = replace(hyper, num_threads=budget.start if budget is not None else None)
    threads = (
        ""
        if budget is None
        else f", {budget.idle} CPU threads ({budget.busy} while the engine serves)"
        if budget.adaptive
        else f", {budget.idle} CPU thread{'s' if budget.idle > 1 else ''}"
    )
    apart = "" if orthogonal is None else f", orthogonal to {orthogonal.name} ({orthogonal.side})"
    await ctx.event(
        "log",
        f"training ({key}): {len(data.sequences)} sequences + {len(anchors)} anchors, "
        f"{hyper.steps} steps{threads}{apart}",
        mode=key,
        init=init_name,
        steps=hyper.steps,
        anchors=len(anchors),
        **data.sources,
        **({} if orthogonal is None else {"orthogonal": orthogonal.side}),
    )
    result = await _run_training(ctx, examples, out_dir, hyper, init_dir, budget, orthogonal)
    stats = {"steps": result.steps, "final_loss": result.final_loss, "seconds": result.seconds}
    save_artifact(ctx.artifacts_dir, artifact, {"adapter_dir": out_dir, **stats})
    used = _thread_use(budget)
    await ctx.event(
        "metric",
        f"trained {result.steps} steps in {result.seconds:.1f} s, loss {result.final_loss:.3f}"
        + (f" ({used})" if used else ""),
        **stats,
        **({"thread_steps": budget.steps_at} if used and budget is not None else {}),
    )
    return out_dir


def _thread_use(budget: ThreadBudget | None) -> str:
    """How many steps ran at each CPU thread count, for an adaptive budget ("" otherwise):
    a run slower than usual shows whether the engine held a core."""
    if budget is None or not budget.adaptive or not budget.steps_at:
        return ""
    counts = sorted(budget.steps_at.items(), reverse=True)
    return ", ".join(
        f"{n} thread{'s' if n > 1 else ''}: {k} step{'s' if k != 1 else ''}" for n, k in counts
    )


async def _run_training(
    ctx: StageContext,
    examples: Sequence[TrainExample],
    out_dir: Path,
    hyper: LoRAHyper,
    init_dir: Path | None,
    budget: ThreadBudget | None = None,
    orthogonal: OrthogonalTo | None = None,
) -> TrainResult:
    """train_lora in a thread (the event loop keeps heartbeating the lease), with losses and
    progress reported from the loop.

    ``ctx.stop_requested`` (set when the job is cancelled or the lease is lost) and the
    cancellation of this coroutine both end training at the next optimizer step; on
    cancellation the coroutine returns only once the thread has stopped. An adaptive
    ``budget`` is kept current by polling the gateway and applied between steps.
    """
    import shutil

    from app.model_prep import resolve_model_dir
    from workers.training.peft_trainer import train_lora

    loop = asyncio.get_running_loop()
    steps: asyncio.Queue[tuple[int, int, float]] = asyncio.Queue()
    stop = threading.Event()
    external = ctx.stop_requested

    def on_step(step: int, total: int, loss: float) -> None:
        if stop.is_set() or external.is_set():
            raise TrainingStopped("training stopped: the attempt was told to stop")
        if budget is not None:
            budget.apply()
        loop.call_soon_threadsafe(steps.put_nowait, (step, total, loss))

    shutil.rmtree(out_dir, ignore_errors=True)  # a partial folder from a killed attempt
    base_dir = await asyncio.to_thread(resolve_model_dir, ctx.settings, progress=False)
    task = asyncio.create_task(
        asyncio.to_thread(
            train_lora,
            base_dir,
            examples,
            out_dir,
            hyper,
            init_adapter_dir=init_dir,
            orthogonal=orthogonal,
            on_step=on_step,
            anchor_state_cache=ctx.settings.data_dir / "cache" / ANCHOR_STATES_DIR,
        )
    )
    watcher = (
        asyncio.create_task(_watch_engine(ctx, budget))
        if budget is not None and budget.adaptive
        else None
    )
    try:
        await _report(ctx, task, steps)
        return await asyncio.shield(task)  # cancelling us must not detach the thread's task
    except BaseException:
        stop.set()
        # The thread ends at its next step; wait for it, so a cancelled or stopped attempt
        # never leaves a training run behind on the CPU the next job will need.
        with contextlib.suppress(BaseException):
            await asyncio.shield(task)
        raise
    finally:
        if watcher is not None:
            watcher.cancel()


async def _watch_engine(ctx: StageContext, budget: ThreadBudget) -> None:
    """Keeps ``budget`` told whether the engine serves anyone (unknown counts as serving)."""
    while True:
        busy = await ctx.gateway.engine_busy()
        budget.engine_busy(busy is not False)
        await asyncio.sleep(ENGINE_POLL_S)


async def _report(
    ctx: StageContext, task: asyncio.Future[Any], steps: asyncio.Queue[tuple[int, int, float]]
) -> None:
    last = 0.0
    while not task.done() or not steps.empty():
        try:
            step, total, loss = await asyncio.wait_for(steps.get(), timeout=0.5)
        except TimeoutError:
            continue
        every = max(1, total // 10)
        if step % every == 0 or step == total:
            await ctx.event("loss", f"step {step}/{total} loss {loss:.4f}", step=step, loss=loss)
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S or step == total:
            last = now
            await ctx.progress("train", step / total)
