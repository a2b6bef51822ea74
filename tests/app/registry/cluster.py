"""Several real gateway processes on one PostgreSQL database, one Redis and one adapter store
(used by the slow hot-swap tests and by bench/hotswap.py)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.auth import Role
from app.settings import Settings
from tests.support.keys import create_keys
from tests.support.server import LiveServer

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class Champion:
    """A champion change as an admin saw it: the alias moved somewhere in [started, returned]."""

    name: str
    started: float
    returned: float


@dataclass
class Cluster:
    """Gateways sharing SQL, Redis and the adapter store; each has its own data dir and engine."""

    root: Path
    model_dir: Path
    database_url: str
    redis_url: str | None
    keys: dict[Role, str] = field(default_factory=dict)
    servers: dict[str, LiveServer] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keys = _create_keys(
            Settings(
                database_url=self.database_url, data_dir=self.root / "keys", model=self.model_dir
            )
        )

    def env(self, name: str, *, redis_url: str | None) -> dict[str, str]:
        env = {
            "SELFADAPT_DATA_DIR": str(self.root / name),
            "SELFADAPT_DATABASE_URL": self.database_url,
            "SELFADAPT_ADAPTERS_DIR": str(self.root / "adapters"),
            "SELFADAPT_MODEL": str(self.model_dir),
            "SELFADAPT_ENGINE__KV_CACHE_SPACE_GIB": "1",
            "SELFADAPT_ENGINE__MAX_LORAS": "2",
            **self.extra_env,
        }
        if redis_url:
            env["SELFADAPT_REDIS_URL"] = redis_url
        return env

    def start(self, *names: str, redis_url: str | None = None) -> list[LiveServer]:
        """Start gateways (in parallel); `redis_url` overrides the cluster's for these."""
        servers = []
        for name in names:
            (self.root / name).mkdir(parents=True, exist_ok=True)
            env = self.env(name, redis_url=redis_url or self.redis_url)
            servers.append(LiveServer(env, self.root / name / "gateway.log"))
        with ThreadPoolExecutor(len(servers)) as pool:
            started = list(pool.map(LiveServer.start, servers))
        self.servers.update(zip(names, started, strict=True))
        return started

    def stop(self, name: str) -> None:
        self.servers.pop(name).stop()

    def stop_all(self) -> None:
        for name in list(self.servers):
            self.stop(name)

    def url(self, name: str) -> str:
        return self.servers[name].base_url

    def headers(self, role: Role = Role.admin) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


def _create_keys(settings: Settings) -> dict[Role, str]:
    return create_keys(settings, prefix="cluster")


def import_adapter(
    client: httpx.Client, namespace: str, folder: Path, headers: dict[str, str]
) -> dict[str, Any]:
    """Upload a PEFT folder's two files through the admin API; returns the new version."""
    files = [
        ("files", (n, (folder / n).read_bytes(), "application/octet-stream")) for n in PEFT_FILES
    ]
    r = client.post(
        f"/v1/admin/namespaces/{namespace}/versions:import", files=files, headers=headers
    )
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def change_champion(
    client: httpx.Client, namespace: str, headers: dict[str, str], *, to_version: int, promote: bool
) -> Champion:
    """Promote `to_version`, or roll back to it; returns when and to what the alias moved."""
    started = time.monotonic()
    if promote:
        path = f"/v1/admin/namespaces/{namespace}/versions/{to_version}/promote"
        r = client.post(path, headers=headers, json={"reason": "hot-swap test"})
    else:
        path = f"/v1/admin/namespaces/{namespace}/rollback"
        r = client.post(path, headers=headers, json={"to_version": to_version})
    returned = time.monotonic()
    r.raise_for_status()
    return Champion(name=r.json()["champion"]["name"], started=started, returned=returned)


def was_champion(history: list[Champion], name: str, start: float, end: float) -> bool:
    """Whether `name` may have been champion at some moment of [start, end].

    Each change's alias moved somewhere inside its [started, returned] call window, so a
    version counts as champion from its change's `started` until the next change `returned`.
    """
    for i, change in enumerate(history):
        until = history[i + 1].returned if i + 1 < len(history) else float("inf")
        if change.name == name and change.started <= end and start <= until:
            return True
    return False
