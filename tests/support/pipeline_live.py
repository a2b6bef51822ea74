"""A live adaptation setup for end-to-end tests and the cycle bench: a gateway on the real
engine, an embedded Redis, and `selfadapt worker` subprocesses running the real pipeline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class LiveWorker:
    """`selfadapt worker` processes sharing the gateway's data dir, database and queue."""

    env: dict[str, str]
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"worker-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def logs(self, chars: int = 4000) -> str:
        return "\n".join(p.read_text()[-chars:] for p in sorted(self.log_dir.glob("*.log")))


def worker_env(
    *, data_dir: Path, model_dir: Path, redis_url: str, gateway_url: str, api_key: str, **extra: str
) -> dict[str, str]:
    """Environment of a worker (and the queue settings its gateway must share)."""
    return {
        **os.environ,
        "SELFADAPT_DATA_DIR": str(data_dir),
        "SELFADAPT_MODEL": str(model_dir),
        "SELFADAPT_REDIS_URL": redis_url,
        "SELFADAPT_PIPELINE__GATEWAY_URL": gateway_url,
        "SELFADAPT_PIPELINE__WORKER_API_KEY": api_key,
        **extra,
    }


def queue_env(redis_url: str) -> dict[str, str]:
    """A fresh queue name, so parallel runs on one Redis never take each other's jobs."""
    return {
        "SELFADAPT_REDIS_URL": redis_url,
        "SELFADAPT_PIPELINE__QUEUE_NAME": f"e2e-{uuid.uuid4().hex[:8]}",
        "SELFADAPT_PIPELINE__BATCH_WINDOW_S": "0",
    }


class Client:
    """The gateway's document, job and chat APIs with one key."""

    def __init__(self, base_url: str, key: str) -> None:
        self.http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=300
        )

    def ingest(self, namespace: str, *docs: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post("/v1/documents", json={"namespace": namespace, "documents": list(docs)})
        assert r.status_code == 202, r.text
        body: dict[str, Any] = r.json()
        return body

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """A GET, sent again (up to twice) when the connection broke before an answer, as the
        worker's client and the openai client do: a pooled keep-alive connection can be closed
        by the server just as a request goes out (seen in CI: "Server disconnected without
        sending a response" while polling a job). A gateway that is down fails all three."""
        for _ in range(2):
            try:
                return self.http.get(path, **kwargs)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
                time.sleep(1)
        return self.http.get(path, **kwargs)

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.get(f"/v1/adaptation/jobs/{job_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def wait(self, job_id: str, timeout_s: float = 1200) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job["status"] in TERMINAL:
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['status']}: {job}"
            time.sleep(1)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            r = self.get(f"/v1/adaptation/jobs/{job_id}/events", params=params)
            assert r.status_code == 200, r.text
            page = r.json()
            out.extend(page["data"])
            if not page.get("has_more") or not page["data"]:
                return out
            params["after"] = page["data"][-1]["id"]

    def ask(self, model: str, title: str, question: str) -> str:
        from workers.tasks.common import qa_messages

        body = {
            "model": model,
            "messages": qa_messages(title, question),
            "max_tokens": 64,
            "temperature": 0,
        }
        r = self.http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        content: str = r.json()["choices"][0]["message"]["content"]
        return content
