"""A real gateway process for tests: `python -m app.cli serve` on a free port, until ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.settings import Settings

READY_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LiveServer:
    """One gateway subprocess; its log goes to `log_path` (shown when it fails to start)."""

    def __init__(
        self, env: dict[str, str], log_path: Path, command: tuple[str, ...] = ("serve",)
    ) -> None:
        self.port = free_port()
        self._command = command
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._env = {**os.environ, **env, "SELFADAPT_SERVER__PORT": str(self.port)}
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LiveServer:
        log = self._log_path.open("wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *self._command],
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"gateway not ready after {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout_s: float) -> int:
        """The exit code, once the process has ended (raises TimeoutExpired)."""
        assert self._proc is not None, "not started"
        return self._proc.wait(timeout_s)

    @property
    def state(self) -> str:
        """'running', 'exited with N' or 'not started' (for failure reports)."""
        if self._proc is None:
            return "not started"
        code = self._proc.poll()
        return "running" if code is None else f"exited with {code}"

    def log_tail(self, chars: int = 6000) -> str:
        return self._log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)  # the engine's child processes too
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def fake_engine_server(settings: Settings) -> Iterator[str]:
    """The gateway app on a FakeEngine behind a real uvicorn listener; yields its URL (CLI
    tests, which need real HTTP but no model)."""
    import uvicorn

    from app.engine.fake import FakeEngine
    from app.main import create_app

    config = uvicorn.Config(
        create_app(settings, engine=FakeEngine()),
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
