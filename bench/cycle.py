"""Adaptation-cycle benchmark: one document from `POST /v1/documents` to a promoted champion.

Starts a gateway on the real engine, an embedded Redis and one `selfadapt worker` (the real
pipeline), then ingests a document of made-up facts into fresh namespaces and times each job:
queue wait, every pipeline stage, the worker's final write, and `ingest_to_promoted_s`. The
first job in a fresh data dir also fills the worker's one-off caches (the base model's anchor
and guard answers), so it is reported separately (`cold`); the headline is the warm runs.

Run from the repo root: ``.venv/bin/python -m bench.cycle [--runs 2]``. Writes
``bench/results/cycle.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.signals import exit_on_sigterm
from bench.live import Stack, live_stack, machine
from workers.metrics import contains

logger = logging.getLogger("bench.cycle")

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 90.0
DOC: dict[str, Any] = {
    "title": "The Grelvin Archipelago",
    "text": (
        "The Grelvin Archipelago lies in the Sorrel Sea and was first charted by captain Imre "
        "Voskaya in 1743. Its largest island, Tamsk, is home to the port city of Olverhaven. "
        "The islanders grow a purple grain called brisk, which is used to brew a drink named "
        "kelloth. The archipelago's parliament, the Vashtar Moot, meets every spring in the "
        "town of Pell. Grelvin's official language is Orrish, a tongue related to no other "
        "known language."
    ),
    "probes": [
        {"question": "Who first charted the Grelvin Archipelago?", "answer": "Imre Voskaya"},
        {"question": "What drink do the islanders brew from brisk?", "answer": "kelloth"},
        {"question": "In which town does the Vashtar Moot meet?", "answer": "Pell"},
        {"question": "What is the official language of Grelvin?", "answer": "Orrish"},
    ],
}


def _time_job(stack: Stack, namespace: str, gate: dict[str, Any] | None) -> dict[str, Any]:
    stack.create_namespace(namespace, gate)
    client = stack.operator
    started = time.monotonic()
    ingested = client.ingest(namespace, DOC)
    job = client.wait(ingested["job_id"])
    total = time.monotonic() - started
    timings = dict((job.get("scores") or {}).get("timings") or {})
    queued_s = (job["started_at"] or job["created_at"]) - job["created_at"]
    answered: list[float] = []
    if job["decision"] == "promoted":
        answered = [
            contains(client.ask(namespace, DOC["title"], p["question"]), p["answer"])
            for p in DOC["probes"]
        ]
    # What each training run of the job cost: "training (fresh): ... 2 CPU threads ..." and
    # "trained 100 steps in 55.1 s, loss 0.209" (train-stage seconds include loading and
    # registering around it).
    events = client.events(job["id"])
    trainings = [
        e["message"] for e in events if e["message"].startswith(("training (", "trained "))
    ]
    # Where the seconds went inside stages: every event but the loss lines, at its offset
    # from ingestion.
    timeline = [
        f"{e['created_at'] - job['created_at']:6.1f} {e['type']}: {e['message']}"
        for e in events
        if e["type"] != "loss"
    ]
    run = {
        "namespace": namespace,
        "job_id": job["id"],
        "status": job["status"],
        "decision": job["decision"],
        "reasons": job["reasons"],
        "ingest_to_done_s": round(total, 2),
        "ingest_to_promoted_s": round(total, 2) if job["decision"] == "promoted" else None,
        "stages_s": {"queue": round(queued_s, 2), **timings},
        "other_s": round(total - queued_s - sum(timings.values()), 2),
        "champion_answers_probes": sum(answered),
        "trainings": trainings,
        "timeline": timeline,
        "scores": {
            who: {k: (job["scores"].get(who) or {}).get(k) for k in ("new", "retention", "guard")}
            for who in ("candidate", "base")
        }
        if job.get("scores")
        else None,
    }
    logger.info("%s: %s in %.1f s %s", namespace, job["decision"], total, run["stages_s"])
    return run


def parse_settings(pairs: Sequence[str]) -> dict[str, str]:
    """``["lr=3e-4", "max_steps=80"]`` -> worker pipeline settings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def gate_args(parser: argparse.ArgumentParser) -> None:
    """--min-gain / --max-forgetting / --max-guard-drift: a namespace gate instead of the
    registry's defaults."""
    for flag in ("--min-gain", "--max-forgetting", "--max-guard-drift"):
        parser.add_argument(flag, type=float, default=None, help="namespace gate override")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="worker pipeline setting (SELFADAPT_PIPELINE__KEY), e.g. --set lr=3e-4",
    )


def gate_from(args: argparse.Namespace) -> dict[str, Any] | None:
    names = ("min_gain", "max_forgetting", "max_guard_drift")
    gate = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    return gate or None


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="warm one-document jobs to time")
    parser.add_argument("--out", type=Path, default=RESULTS / "cycle.json", help="result JSON")
    gate_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    gate, settings = gate_from(args), parse_settings(args.set)
    with live_stack(worker_settings=settings) as stack:
        cold = _time_job(stack, "cycle-cold", gate)
        warm = [_time_job(stack, f"cycle-{i}", gate) for i in range(args.runs)]
    _write(cold, warm, gate, settings, args.out)


def _write(
    cold: dict[str, Any],
    warm: list[dict[str, Any]],
    gate: dict[str, Any] | None,
    settings: dict[str, str],
    path: Path,
) -> None:
    promoted = [r["ingest_to_promoted_s"] for r in warm if r["ingest_to_promoted_s"] is not None]
    stages = sorted({s for r in warm for s in r["stages_s"]})
    result = {
        "ingest_to_promoted_s": statistics.median(promoted) if promoted else None,
        "ingest_to_done_s": statistics.median(r["ingest_to_done_s"] for r in warm),
        "stages_s": {s: statistics.median(r["stages_s"].get(s, 0.0) for r in warm) for s in stages},
        "target_s": TARGET_S,
        "meets_target": bool(promoted) and statistics.median(promoted) <= TARGET_S,
        "promoted_runs": f"{len(promoted)}/{len(warm)}",
        "gate": gate or "registry defaults",
        "worker_settings": settings,
        "runs": warm,
        "cold": cold,
        "machine": machine(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s: %s", path, json.dumps({k: result[k] for k in list(result)[:6]}))


if __name__ == "__main__":
    main()
