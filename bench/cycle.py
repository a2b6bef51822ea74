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
import asyncio
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from app.auth import Role, create_key
from app.db import migrate
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from tests.support.models import bundled_model_dir, default_cache_root
from tests.support.pipeline_live import Client, LiveWorker, queue_env, worker_env
from tests.support.server import LiveServer, free_port
from workers.embedded_redis import EmbeddedRedis
from workers.metrics import contains

logger = logging.getLogger("bench.cycle")

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 90.0
GATE = {"min_gain": 0.0, "max_forgetting": 0.3, "auto_promote": True}
"""The forgetting budget the end-to-end test also uses: the bundled 135M model typically loses
5-25 points of the guard set when it learns a document (the registry default 0.05 rejects)."""
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


def _keys(settings: Settings) -> dict[Role, str]:
    migrate.upgrade(settings)

    async def make() -> dict[Role, str]:
        engine = make_engine(settings)
        try:
            async with make_sessionmaker(engine)() as session:
                keys = {}
                for role in (Role.admin, Role.operator):
                    _, keys[role] = await create_key(session, name=f"bench-{role}", role=role)
                await session.commit()
                return keys
        finally:
            await engine.dispose()

    return asyncio.run(make())


def _time_job(client: Client, admin: Client, namespace: str) -> dict[str, Any]:
    r = admin.http.post("/v1/admin/namespaces", json={"name": namespace, "settings": GATE})
    assert r.status_code == 201, r.text
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
        "scores": {
            who: {k: (job["scores"].get(who) or {}).get(k) for k in ("new", "retention", "guard")}
            for who in ("candidate", "base")
        }
        if job.get("scores")
        else None,
    }
    logger.info("%s: %s in %.1f s %s", namespace, job["decision"], total, run["stages_s"])
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="warm one-document jobs to time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model_dir = bundled_model_dir(default_cache_root())
    with tempfile.TemporaryDirectory(prefix="bench-cycle-") as tmp:
        tmp_path = Path(tmp)
        data_dir = tmp_path / "data"
        keys = _keys(Settings(data_dir=data_dir, model=model_dir))
        with EmbeddedRedis(tmp_path / "redis" / "r.rdb", port=free_port()) as redis:
            queue = queue_env(redis.url)
            env = {
                "SELFADAPT_DATA_DIR": str(data_dir),
                "SELFADAPT_MODEL": str(model_dir),
                "SELFADAPT_ENGINE__KV_CACHE_SPACE_GIB": "1",
                **queue,
            }
            server = LiveServer(env, tmp_path / "gateway.log").start()
            (tmp_path / "logs").mkdir()
            worker = LiveWorker(
                worker_env(
                    data_dir=data_dir,
                    model_dir=model_dir,
                    redis_url=redis.url,
                    gateway_url=server.base_url,
                    api_key=keys[Role.operator],
                    **queue,
                ),
                tmp_path / "logs",
            )
            worker.start()
            try:
                client = Client(server.base_url, keys[Role.operator])
                admin = Client(server.base_url, keys[Role.admin])
                cold = _time_job(client, admin, "cycle-cold")
                warm = [_time_job(client, admin, f"cycle-{i}") for i in range(args.runs)]
            finally:
                worker.stop()
                server.stop()
    _write(cold, warm)


def _write(cold: dict[str, Any], warm: list[dict[str, Any]]) -> None:
    promoted = [r["ingest_to_promoted_s"] for r in warm if r["ingest_to_promoted_s"] is not None]
    stages = sorted({s for r in warm for s in r["stages_s"]})
    result = {
        "ingest_to_promoted_s": statistics.median(promoted) if promoted else None,
        "ingest_to_done_s": statistics.median(r["ingest_to_done_s"] for r in warm),
        "stages_s": {s: statistics.median(r["stages_s"].get(s, 0.0) for r in warm) for s in stages},
        "target_s": TARGET_S,
        "meets_target": bool(promoted) and statistics.median(promoted) <= TARGET_S,
        "promoted_runs": f"{len(promoted)}/{len(warm)}",
        "gate": GATE,
        "runs": warm,
        "cold": cold,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1m_at_end": os.getloadavg()[0],
        },
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "cycle.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s: %s", path, json.dumps({k: result[k] for k in list(result)[:6]}))


if __name__ == "__main__":
    main()
