"""Session fixtures: the bundled model, cached fact adapters, and one real gateway process."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.auth import Role
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings
from tests.support.keys import create_keys
from tests.support.models import (
    VEXTORIA,
    ZORBLAT,
    bundled_model_dir,
    default_cache_root,
    fact_adapter,
)
from tests.support.pipeline_live import LiveWorker
from tests.support.server import LiveServer

ADAPTERS = {"zorb": ZORBLAT, "vex": VEXTORIA}


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI timeout, a `kill`) stops the run as Ctrl-C does: pytest then tears the
    fixtures down, so the gateways, engines and workers they started do not outlive it (with
    Python's default action they kept running, a worker training on both cores)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@dataclass
class Gateway:
    """A running gateway plus a key of each role."""

    server: LiveServer
    keys: dict[Role, str]
    data_dir: Path

    @property
    def base_url(self) -> str:
        return self.server.base_url


def _live_logs(value: Any) -> list[tuple[str, str]]:
    """(title, log tail) of every live gateway or worker in a fixture value."""
    if isinstance(value, tuple):
        return [section for item in value for section in _live_logs(item)]
    if isinstance(value, Gateway):
        title = f"gateway log ({value.base_url}, {value.server.state})"
        return [(title, value.server.log_tail())]
    if isinstance(value, LiveWorker):
        return [("worker logs", value.logs())]
    return []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test that used a live gateway or worker shows their logs' tails (a gateway
    that dropped a connection says why only there)."""
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            for title, text in _live_logs(value):
                report.sections.append((title, text))
    return report


@pytest.fixture(scope="session")
def test_cache() -> Path:
    return default_cache_root()


@pytest.fixture(scope="session")
def model_dir(test_cache: Path) -> Path:
    return bundled_model_dir(test_cache)


@pytest.fixture(scope="session")
def fact_adapters(test_cache: Path, model_dir: Path) -> dict[str, Path]:
    """name -> trained PEFT folder (trained once, then cached across sessions)."""
    return {
        name: fact_adapter(test_cache, model_dir, fact.name, fact.examples)
        for name, fact in ADAPTERS.items()
    }


def _create_keys(settings: Settings) -> dict[Role, str]:
    return create_keys(settings, prefix="test")


def _register_adapters(settings: Settings, adapters: dict[str, Path]) -> None:
    """Each adapter becomes namespace `<name>` with v1 as champion (served as `<name>@v1`)."""
    from adapters_store.blobs import BlobStore
    from adapters_store.registry import AdapterRegistry
    from app.model_prep import model_fingerprint

    async def _register() -> None:
        engine = make_engine(settings)
        try:
            registry = AdapterRegistry(
                make_sessionmaker(engine),
                BlobStore(settings.adapter_root / "blobs"),
                None,
                base_model=model_fingerprint(settings.model_dir),
            )
            for name, src in adapters.items():
                version = await registry.register_version(name, src, "tests")
                await registry.promote(name, version.version, "tests")
        finally:
            await engine.dispose()

    asyncio.run(_register())


@pytest.fixture(scope="session")
def start_gateway(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, fact_adapters: dict[str, Path]
) -> Iterator[Callable[..., Gateway]]:
    """Factory: a gateway process on the real engine, with the fact adapters in its store."""
    started: list[LiveServer] = []

    def _start(name: str = "gateway", *, register_adapters: bool = True, **env: str) -> Gateway:
        data_dir = tmp_path_factory.mktemp(name)
        base_env = {
            "SELFADAPT_DATA_DIR": str(data_dir),
            "SELFADAPT_MODEL": str(model_dir),
            "SELFADAPT_ENGINE__KV_CACHE_SPACE_GIB": "1",
            "SELFADAPT_ENGINE__MAX_LORAS": "2",
        }
        settings = Settings(data_dir=data_dir, model=model_dir)
        keys = _create_keys(settings)
        if register_adapters:  # the registry serves them: `zorb` is zorb@v1, the champion
            _register_adapters(settings, fact_adapters)
        server = LiveServer({**base_env, **env}, data_dir / "gateway.log")
        started.append(server)
        return Gateway(server=server.start(), keys=keys, data_dir=data_dir)

    yield _start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    """The shared gateway: one engine per test session."""
    return start_gateway()
