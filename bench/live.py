"""The live adaptation stack the learning benchmarks share: a gateway on the real engine, an
embedded Redis and one `selfadapt worker` running the real pipeline, all in a temp data dir."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.auth import Role
from app.settings import Settings
from tests.support.keys import create_keys
from tests.support.models import bundled_model_dir, default_cache_root
from tests.support.pipeline_live import Client, LiveWorker, queue_env, worker_env
from tests.support.server import LiveServer, free_port
from workers.embedded_redis import EmbeddedRedis


@dataclass
class Stack:
    """What a benchmark talks to: the gateway's URL and an operator, a user and an admin
    client, plus the worker (for its logs)."""

    base_url: str
    keys: dict[Role, str]
    operator: Client
    admin: Client
    worker: LiveWorker

    def create_namespace(self, name: str, gate: Mapping[str, Any] | None = None) -> None:
        """Creates ``name`` with ``gate`` settings (None: the registry's defaults)."""
        body: dict[str, Any] = {"name": name}
        if gate is not None:
            body["settings"] = dict(gate)
        r = self.admin.http.post("/v1/admin/namespaces", json=body)
        assert r.status_code == 201, r.text


def pipeline_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """``{"lr": "3e-4"}`` -> ``{"SELFADAPT_PIPELINE__LR": "3e-4"}`` (the worker's settings)."""
    return {f"SELFADAPT_PIPELINE__{key.upper()}": value for key, value in overrides.items()}


def _keys(settings: Settings) -> dict[Role, str]:
    return create_keys(settings, prefix="bench", roles=(Role.admin, Role.operator, Role.user))


@contextmanager
def live_stack(
    *,
    model_dir: Path | None = None,
    worker_settings: Mapping[str, str] | None = None,
    keep: Path | None = None,
) -> Iterator[Stack]:
    """Starts the stack in a temp dir and stops it on exit.

    Args:
        model_dir: HF model directory (default: the bundled model, converted once and cached).
        worker_settings: pipeline settings for the worker (``{"lr": "3e-4"}``).
        keep: where to copy the temp dir (the data dir's database, adapters and job
            artifacts, the logs) once the worker and the gateway have stopped, for later
            analysis (`bench.firmness`); it must not exist.
    """
    model_dir = model_dir or bundled_model_dir(default_cache_root())
    if keep is not None and keep.exists():
        raise FileExistsError(f"{keep} already exists: a kept stack is never overwritten")
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
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
                    **pipeline_env(worker_settings or {}),
                ),
                tmp_path / "logs",
            )
            worker.start()
            try:
                yield Stack(
                    base_url=server.base_url,
                    keys=keys,
                    operator=Client(server.base_url, keys[Role.operator]),
                    admin=Client(server.base_url, keys[Role.admin]),
                    worker=worker,
                )
            finally:
                worker.stop()
                server.stop()
                if keep is not None:
                    shutil.copytree(tmp_path, keep, ignore=shutil.ignore_patterns("redis"))


def machine() -> dict[str, Any]:
    """Where a result was measured (2-core numbers are noisy: say how loaded it was), and the
    engine settings the stack's gateway resolves on it (from the same environment)."""
    from app.engine.dtype import resolve_dtype
    from app.engine.kv_blocks import resolve_block_size

    engine = Settings().engine
    return {
        "cpus": os.cpu_count(),
        "engine_dtype": resolve_dtype(engine.dtype),
        "engine_block_size": resolve_block_size(engine.block_size),
        "platform": platform.platform(),
        "load_avg_1m_at_end": os.getloadavg()[0],
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
