"""Are the earlier answers a continual run's candidates lose the champion's firm ones?

Takes a `bench.continual` run kept with ``--keep DIR`` and, for every later job, asks its
champion and each of its candidates (the adapters in the job's folder) the earlier promoted
documents' questions without context through an in-process engine: the greedy answer and the
gate's firm-rule samples (`workers.tasks.evaluate.FirmRule`: greedy and 3 of 4 at T=0.5). Each
earlier answer a candidate lost (the champion's greedy answer contained the gold one, the
candidate's does not) is counted as firm or thin on the champion, and each candidate is gated
again with retention's answered share counted firmly on both sides instead of greedily (F1,
new knowledge and guard as the job stored them): would that rule change any decision?

Writes ``bench/results/continual-firmness.json``. Reproduce:

    .venv/bin/python -m bench.continual --keep /tmp/continual-run
    .venv/bin/python -m bench.firmness --run /tmp/continual-run
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.live import machine
from workers.tasks.evaluate import EvalItem

if TYPE_CHECKING:
    from adapters_store.models import NamespaceSettings
    from workers.tasks.evaluate import FirmRule
    from workers.tasks.promote import GateResult

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).resolve().parent / "results"


def earlier_documents(updates: Sequence[dict[str, Any]]) -> list[list[str]]:
    """For each update of a continual run, the documents promoted before it (in order): the
    ones its job's retention probes came from."""
    before: list[str] = []
    out = []
    for update in updates:
        out.append(list(before))
        if update["decision"] == "promoted":
            before.append(update["document"])
    return out


def lost(
    champion: Sequence[int | None], candidate: Sequence[int | None], need: int
) -> dict[str, int]:
    """Earlier answers the candidate lost, split by how firmly the champion held them. Each
    entry is a question's sample hits (None: the greedy answer missed)."""
    gone = [c for c, k in zip(champion, candidate, strict=True) if c is not None and k is None]
    return {"firm": sum(c >= need for c in gone), "thin": sum(c < need for c in gone)}


def firm_regate(
    scores: dict[str, Any], champion_firm: int, candidate_firm: int, gate: NamespaceSettings
) -> GateResult:
    """The gate's decision with retention's answered share counted in firm answers on both
    sides (the share the gate reads from the greedy "contains" score, replaced)."""
    from workers.tasks.promote import decide

    again = copy.deepcopy(scores)
    n = int(again["candidate"]["retention"]["n"])
    again["champion"]["retention"]["contains"] = champion_firm / n
    again["candidate"]["retention"]["contains"] = candidate_firm / n
    return decide(again, gate)


async def _hits(
    chat: Any, name: str, adapter: Path, items: list[Any], rule: FirmRule
) -> list[int | None]:
    from workers.tasks.evaluate import answer_firmly

    chat.add_adapter(name, adapter)
    limit = asyncio.Semaphore(32)
    _, hits = await answer_firmly(chat, name, items, rule=rule, max_tokens=64, limit=limit)
    return hits


def adapter_folders(data_dir: Path) -> dict[int, Path]:
    """Each registered version's adapter folder in its job's artifacts (the newest attempt)."""
    with sqlite3.connect(data_dir / "selfadapt.db") as db:
        rows = db.execute("select version, job_id, note from adapter_version").fetchall()
    folders = {}
    for version, job, note in rows:
        key = (note or "").split(":")[0]
        found = sorted((data_dir / "jobs" / job).glob(f"attempt-*/adapter-{key}"))
        if found:
            folders[version] = found[-1]
    return folders


@dataclass
class JobPlan:
    """One later job of the run: its earlier questions, champion and candidates."""

    document: str
    items: list[EvalItem]
    champion: str
    champion_dir: Path
    candidates: list[tuple[int, dict[str, Any], Path]]  # version, stored scores, folder


def plan(run_dir: Path, result: dict[str, Any]) -> list[JobPlan]:
    """Reads the kept run: what to ask whom."""
    from bench.continual import load_passages

    data_dir = run_dir / "data"
    ids = [d["id"] for d in result["documents"]]
    passages = load_passages(Path(result["data"]), len(ids), seed=result.get("sample_seed"))
    if [p.id for p in passages] != ids:
        raise SystemExit(f"{result['data']} no longer holds the run's documents {ids}")
    docs = {p.id: p for p in passages}
    folders = adapter_folders(data_dir)
    jobs = []
    updates = result["updates"]
    for update, earlier in zip(updates, earlier_documents(updates), strict=True):
        if not earlier:
            continue
        attempt = sorted((data_dir / "jobs" / update["job_id"]).glob("attempt-*"))[-1]
        reference = json.loads((attempt / "reference_scores.json").read_text())
        champion = reference["champion"]["model"]
        evaluated = sorted(
            (int(e.stem.removeprefix("evaluate-v")), e) for e in attempt.glob("evaluate-v*.json")
        )
        jobs.append(
            JobPlan(
                update["document"],
                [  # the probes the jobs were given (as_ingest: the first answer)
                    EvalItem(docs[d].title, q.question, q.answers[:1])
                    for d in earlier
                    for q in docs[d].questions
                ],
                champion,
                folders[int(champion.rsplit("@v", 1)[1])],
                [(v, json.loads(e.read_text()), folders[v]) for v, e in evaluated],
            )
        )
    return jobs


async def run(jobs: list[JobPlan]) -> dict[str, Any]:
    from adapters_store.models import NamespaceSettings
    from app.model_prep import resolve_model_dir
    from app.settings import Settings
    from bench import doc_training as dt
    from workers.tasks.evaluate import answered, firm_rule
    from workers.tasks.promote import decide

    settings = Settings()
    rule = firm_rule(settings)
    if rule is None:
        raise SystemExit("the firm rule is off (SELFADAPT_PIPELINE__GATE_FIRM_SAMPLES=0)")
    gate = NamespaceSettings()
    engine, chat = dt.start_engine(resolve_model_dir(settings, progress=False))
    candidates = []
    try:
        for job in jobs:
            champion = await _hits(chat, job.champion, job.champion_dir, job.items, rule)
            held = {"greedy": answered(champion, None), "firm": answered(champion, rule)}
            for version, scores, folder in job.candidates:
                hits = await _hits(chat, f"v{version}", folder, job.items, rule)
                kept = {"greedy": answered(hits, None), "firm": answered(hits, rule)}
                firm = firm_regate(scores, held["firm"], kept["firm"], gate)
                row = {
                    "document": job.document,
                    "version": version,
                    "mode": scores.get("mode"),
                    "champion": job.champion,
                    "questions": len(job.items),
                    "champion_answered": held,
                    "candidate_answered": kept,
                    "lost": lost(champion, hits, rule.need),
                    "decision": decide(scores, gate).decision,
                    "decision_firm_retention": firm.decision,
                    "champion_hits": champion,
                    "candidate_hits": hits,
                }
                logger.info("%s", {k: row[k] for k in list(row)[:10]})
                candidates.append(row)
    finally:
        await engine.shutdown()
    return summarize(candidates, rule.describe())


def summarize(candidates: list[dict[str, Any]], firm: str) -> dict[str, Any]:
    """Totals over the candidates: lost answers by firmness, decisions the rule changes."""
    changed = [
        {k: c[k] for k in ("document", "version", "mode", "decision", "decision_firm_retention")}
        for c in candidates
        if c["decision"] != c["decision_firm_retention"]
    ]
    return {
        "firm": firm,
        "candidates": candidates,
        "lost": {
            "firm": sum(c["lost"]["firm"] for c in candidates),
            "thin": sum(c["lost"]["thin"] for c in candidates),
        },
        "decisions_changed": changed,
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="bench.continual --keep DIR")
    parser.add_argument(
        "--continual", type=Path, default=RESULTS / "continual.json", help="that run's JSON"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "continual-firmness.json")
    args = parser.parse_args()
    if not (args.run / "data" / "selfadapt.db").is_file():
        parser.error(f"{args.run} holds no data/selfadapt.db: not a kept bench.continual run")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = asyncio.run(run(plan(args.run, json.loads(args.continual.read_text()))))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    logger.info(
        "wrote %s: lost answers %s; decisions changed %s",
        args.out,
        result["lost"],
        result["decisions_changed"],
    )


if __name__ == "__main__":
    main()
