"""Gateway-side registry fixtures: tiny PEFT adapters, in-process gateways on a fake engine over
real SQLite/PostgreSQL (and Redis), and helpers to import/promote through the admin API."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from safetensors.numpy import save_file

from adapters_store.validation import base_shapes
from app.auth import Role
from app.engine.fake import FakeEngine
from app.main import create_app
from app.settings import RegistrySettings, Settings
from app.state import AppState
from tests.conftest import _create_keys
from tests.factories import DB_BACKENDS, temp_database_url

REDIS_URL = "redis://127.0.0.1:6379/11"  # a db number of its own: tests publish on it
TINY_TARGETS = ("q_proj", "v_proj")


def redis_available(host: str = "127.0.0.1", port: int = 6379) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def write_tiny_adapter(
    model_dir: Path, out: Path, *, seed: int, rank: int = 4, layers: int = 2
) -> Path:
    """A small, real PEFT LoRA folder for the base model (random weights on q/v_proj)."""
    shapes = base_shapes(model_dir)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for target in TINY_TARGETS:
            module = f"model.layers.{layer}.self_attn.{target}"
            out_f, in_f = shapes[f"{module}.weight"]
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(size=(rank, in_f)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(size=(out_f, rank)).astype(np.float32)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(TINY_TARGETS),
        "layers_to_transform": list(range(layers)),
        "base_model_name_or_path": str(model_dir),
        "bias": "none",
        "fan_in_fan_out": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> list[Path]:
    """Three distinct tiny adapters of the bundled model."""
    root = tmp_path_factory.mktemp("tiny")
    return [write_tiny_adapter(model_dir, root / f"tiny{i}", seed=i) for i in range(3)]


def adapter_files(folder: Path, names: list[str] | None = None) -> list[Any]:
    """Multipart `files` for an import (default: the two PEFT files)."""
    names = names or ["adapter_config.json", "adapter_model.safetensors"]
    return [("files", (n, (folder / n).read_bytes(), "application/octet-stream")) for n in names]


@dataclass
class InProcessGateway:
    """One gateway app on a FakeEngine, with a client per role."""

    app: FastAPI
    engine: FakeEngine
    settings: Settings
    clients: dict[Role, httpx.AsyncClient]
    state: AppState

    @property
    def admin(self) -> httpx.AsyncClient:
        return self.clients[Role.admin]

    @property
    def user(self) -> httpx.AsyncClient:
        return self.clients[Role.user]

    @property
    def operator(self) -> httpx.AsyncClient:
        return self.clients[Role.operator]

    async def import_adapter(self, namespace: str, folder: Path) -> dict[str, Any]:
        r = await self.admin.post(
            f"/v1/admin/namespaces/{namespace}/versions:import", files=adapter_files(folder)
        )
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    async def promote(self, namespace: str, version: int) -> dict[str, Any]:
        r = await self.admin.post(f"/v1/admin/namespaces/{namespace}/versions/{version}/promote")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def ask(self, model: str, client: httpx.AsyncClient | None = None) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        return await (client or self.user).post("/v1/chat/completions", json=body)


def gateway_settings(
    data_dir: Path, database_url: str, model_dir: Path, *, redis_url: str | None = None
) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        model=model_dir,
        redis_url=redis_url,
        registry=RegistrySettings(alias_poll_s=0.5),
    )


@asynccontextmanager
async def in_process_gateway(
    settings: Settings, keys: dict[Role, str]
) -> AsyncIterator[InProcessGateway]:
    """A gateway app (lifespan running) on a FakeEngine with clients for every role."""
    engine = FakeEngine()
    app = create_app(settings, engine=engine)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        clients = {
            role: httpx.AsyncClient(
                transport=transport,
                base_url="http://gw",
                headers={"Authorization": f"Bearer {key}"},
            )
            for role, key in keys.items()
        }
        state = manager._state["app"]  # what the lifespan yielded
        gw = InProcessGateway(
            app=app, engine=engine, settings=settings, clients=clients, state=state
        )
        try:
            yield gw
        finally:
            for c in clients.values():
                await c.aclose()


@pytest.fixture(params=DB_BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with temp_database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def settings(tmp_path: Path, database_url: str, model_dir: Path) -> Settings:
    return gateway_settings(tmp_path / "data", database_url, model_dir)


@pytest.fixture
def keys(settings: Settings) -> dict[Role, str]:
    return _create_keys(settings)


@pytest.fixture
async def gw(settings: Settings, keys: dict[Role, str]) -> AsyncIterator[InProcessGateway]:
    async with in_process_gateway(settings, keys) as gateway:
        yield gateway
