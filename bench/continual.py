"""Continual benchmark: D documents learned one after another into one namespace.

Every document goes through the real pipeline (`POST /v1/documents` -> `selfadapt worker`:
self-edits, training from the champion with replay, evaluation, gate) on a live gateway
(bench/live.py, the harness bench/cycle.py uses). After each update j the namespace's champion
answers, without context, the questions of every document i <= j and the guard set, so the
result is SEAL's lower-triangular matrix: F1 (and "gold contained in the reply") on document
i's questions after update j, plus the guard score per update and the mean retention of the
earlier documents relative to their score right after their own update.

The default data are made-up-fact documents (`bench/data/made_up_facts.jsonl`): the base model
cannot know fictional names, so every point of the matrix is knowledge the updates put there
(on SQuAD passages the 135M base already scores a few points and learns ~half as much, see
../shared/notes/learning-premise.md). `--data` takes any file of the schema of
`../shared/data/squad-dev.jsonl`; each passage's questions are its probes (held out of training).

Run from the repo root: ``.venv/bin/python -m bench.continual [--docs 8]``. Writes
``bench/results/continual.json`` and ``continual.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.auth import Role
from app.signals import exit_on_sigterm
from bench.cycle import gate_args, gate_from, parse_settings
from bench.live import Stack, live_stack, machine
from workers.gateway_client import GatewayClient
from workers.metrics import score_answers
from workers.tasks.evaluate import GUARD_FILE, EvalItem, answer_all, load_guard

logger = logging.getLogger("bench.continual")

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "made_up_facts.jsonl"
TARGET_RETENTION = 0.8

Matrix = list[list[float | None]]
"""``m[j][i]``: score on document i's questions after update j (None above the diagonal)."""


@dataclass(frozen=True)
class Passage:
    """One document of the benchmark with its questions."""

    id: str
    title: str
    text: str
    questions: tuple[EvalItem, ...]

    def as_ingest(self) -> dict[str, Any]:
        probes = [{"question": q.question, "answer": q.answers[0]} for q in self.questions]
        return {"title": self.title, "text": self.text, "probes": probes}


def load_passages(path: Path, n: int, *, seed: int | None) -> list[Passage]:
    """``n`` passages of a SQuAD-schema JSONL (the first n, or a seeded sample)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if seed is not None:
        rows = random.Random(seed).sample(rows, min(n, len(rows)))
    out = []
    for row in rows[:n]:
        questions = tuple(
            EvalItem(row["title"], q["question"], tuple(a for a in q["answers"] if a.strip()))
            for q in row["questions"]
            if any(a.strip() for a in q["answers"])
        )
        out.append(Passage(row["id"], row["title"], row["context"], questions))
    if len(out) < n:
        raise SystemExit(f"{path} has {len(out)} passages; --docs asks for {n}")
    return out


# -- pure logic (tests/bench/test_continual.py) ------------------------------------------------


def lower_triangle(rows: Sequence[Sequence[float]]) -> Matrix:
    """Row j keeps documents 0..j (the ones learned by then); the rest are None."""
    return [[v if i <= j else None for i, v in enumerate(row)] for j, row in enumerate(rows)]


def retention(matrix: Matrix, *, after: int | None = None) -> dict[str, Any]:
    """Earlier documents' score after update ``after`` (default: the last) relative to their
    score right after their own update: per document and the mean.

    A document whose own update left it at 0 has nothing to retain: it is listed with a
    ratio of None and left out of the mean (``n`` says how many documents the mean covers).
    """
    last = len(matrix) - 1 if after is None else after
    per_doc: list[float | None] = []
    for i in range(last):
        own, now = matrix[i][i], matrix[last][i]
        per_doc.append(now / own if own and now is not None else None)
    counted = [r for r in per_doc if r is not None]
    return {
        "after_update": last,
        "per_document": per_doc,
        "mean": sum(counted) / len(counted) if counted else None,
        "n": len(counted),
    }


def diagonal(matrix: Matrix) -> list[float | None]:
    return [matrix[i][i] for i in range(len(matrix))]


# -- the run -----------------------------------------------------------------------------------


async def _scores(
    base_url: str,
    key: str,
    model: str,
    passages: Sequence[Passage],
    guard: Sequence[EvalItem],
    *,
    max_tokens: int,
    concurrency: int,
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """``model``'s score on each passage's questions and on the guard set."""
    limit = asyncio.Semaphore(concurrency)
    sets = [list(p.questions) for p in passages] + [list(guard)]
    async with GatewayClient(base_url, key) as gateway:
        answers = await asyncio.gather(
            *(answer_all(gateway, model, s, max_tokens=max_tokens, limit=limit) for s in sets)
        )
    scored = [
        score_answers((a, item.answers) for a, item in zip(preds, items, strict=True)).as_dict()
        for preds, items in zip(answers, sets, strict=True)
    ]
    return [dict(s) for s in scored[:-1]], dict(scored[-1])


def _champion(stack: Stack, namespace: str) -> str:
    """The champion's pinned name (``ns@vN``), or ``base`` before the first promotion."""
    r = stack.admin.http.get(f"/v1/admin/namespaces/{namespace}")
    r.raise_for_status()
    champion: str | None = r.json().get("champion")
    return champion or "base"


def _update(stack: Stack, namespace: str, passage: Passage) -> dict[str, Any]:
    started = time.monotonic()
    ingested = stack.operator.ingest(namespace, passage.as_ingest())
    job = stack.operator.wait(ingested["job_id"], timeout_s=3600)
    seconds = time.monotonic() - started
    logger.info("%s: %s %s in %.0f s", passage.id, job["status"], job["decision"], seconds)
    scores = job.get("scores") or {}
    return {
        "document": passage.id,
        "job_id": job["id"],
        "status": job["status"],
        "decision": job["decision"],
        "mode": scores.get("mode"),
        "reasons": job["reasons"],
        "version": job.get("result_version"),
        "seconds": round(seconds, 1),
        "stages_s": scores.get("timings"),
    }


@dataclass
class Progress:
    """What the run has measured so far (written after every update, so a run cut short
    still leaves its rows)."""

    passages: list[Passage]
    settings: dict[str, str]
    gate: dict[str, Any] | None
    base_docs: list[dict[str, float]]
    base_guard: dict[str, float]
    f1_rows: list[list[float]]
    contains_rows: list[list[float]]
    guard: list[dict[str, float]]
    updates: list[dict[str, Any]]
    sample_seed: int | None = None

    def result(self, data: Path) -> dict[str, Any]:
        f1, contained = lower_triangle(self.f1_rows), lower_triangle(self.contains_rows)
        return {
            "data": str(data),
            "sample_seed": self.sample_seed,
            "complete": len(self.updates) == len(self.passages),
            "documents": [
                {"id": p.id, "title": p.title, "n": len(p.questions)} for p in self.passages
            ],
            "gate": self.gate or "registry defaults",
            "worker_settings": self.settings,
            "base": {
                "f1": [d["f1"] for d in self.base_docs],
                "contains": [d["contains"] for d in self.base_docs],
                "guard": self.base_guard,
            },
            "f1": f1,
            "contains": contained,
            "diagonal": {"f1": diagonal(f1), "contains": diagonal(contained)},
            "retention": {"f1": retention(f1), "contains": retention(contained)},
            "retention_target": TARGET_RETENTION,
            "guard": self.guard,
            "updates": self.updates,
            "machine": machine(),
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Learns the documents in order, measuring after each update; writes ``args.out``."""
    passages = load_passages(args.data, args.docs, seed=args.sample_seed)
    guard = load_guard(args.guard)

    def measure(stack: Stack, model: str) -> tuple[list[dict[str, float]], dict[str, float]]:
        key = stack.keys[Role.operator]  # pinned versions need an operator key
        return asyncio.run(
            _scores(
                stack.base_url,
                key,
                model,
                passages,
                guard,
                max_tokens=args.max_tokens,
                concurrency=args.concurrency,
            )
        )

    gate, settings = gate_from(args), parse_settings(args.set)
    with live_stack(model_dir=args.model, worker_settings=settings, keep=args.keep) as stack:
        stack.create_namespace(args.namespace, gate)
        base_docs, base_guard = measure(stack, "base")
        progress = Progress(
            passages, settings, gate, base_docs, base_guard, [], [], [], [],
            sample_seed=args.sample_seed,
        )  # fmt: skip
        for passage in passages:
            update = _update(stack, args.namespace, passage)
            update["model"] = model = _champion(stack, args.namespace)
            docs, guard_score = measure(stack, model)
            progress.f1_rows.append([d["f1"] for d in docs])
            progress.contains_rows.append([d["contains"] for d in docs])
            progress.guard.append(guard_score)
            progress.updates.append(update)
            logger.info(
                "after %s (%s): f1 %s guard %.2f",
                passage.id,
                model,
                [round(d["f1"], 2) for d in docs[: len(progress.updates)]],
                guard_score["contains"],
            )
            _write(progress.result(args.data), args.out)
    return progress.result(args.data)


def _write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def plot(result: dict[str, Any], path: Path) -> Path:
    from bench.plot import heatmap

    labels = [d["id"].removeprefix("made-up-") for d in result["documents"]]
    guard = [g["contains"] for g in result["guard"]]
    rows = [f"after {lab} (guard {g:.2f})" for lab, g in zip(labels, guard, strict=False)]
    f1_ret = result["retention"]["f1"]["mean"]
    title = "F1 on document i after update j" + (
        f"; mean retention {f1_ret:.0%}" if f1_ret is not None else ""
    )
    panels = {"F1": result["f1"], "contains": result["contains"]}
    return heatmap(path, panels, row_labels=rows, col_labels=labels, title=title)


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SQuAD-schema JSONL")
    parser.add_argument("--docs", type=int, default=8, help="documents learned in sequence")
    parser.add_argument(
        "--sample-seed", type=int, default=None, help="sample the documents (default: the first)"
    )
    parser.add_argument("--namespace", default="continual")
    parser.add_argument("--model", type=Path, default=None, help="HF model dir (default: bundled)")
    parser.add_argument("--guard", type=Path, default=GUARD_FILE, help="guard QA JSONL")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length")
    parser.add_argument("--concurrency", type=int, default=16, help="questions in flight")
    parser.add_argument("--out", type=Path, default=RESULTS / "continual.json")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="copy the run's data dir (adapters, job artifacts) here at the end (bench.firmness)",
    )
    gate_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = run(args)
    _write(result, args.out)
    png = plot(result, args.out.with_suffix(".png"))
    logger.info(
        "wrote %s and %s: retention f1 %s contains %s",
        args.out,
        png,
        result["retention"]["f1"]["mean"],
        result["retention"]["contains"]["mean"],
    )


if __name__ == "__main__":
    main()
