"""Fixtures for the registry: tiny real PEFT adapters, migrated databases, a recording publisher."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters_store.blobs import BlobStore
from adapters_store.events import ChangeEvent
from adapters_store.registry import AdapterRegistry
from adapters_store.validation import ALLOWED_FILES
from tests.factories import DB_BACKENDS, migrated_db, temp_database_url

TINY_TARGETS = ("q_proj", "v_proj")


def _make_tiny_adapters(model_dir: Path, out: Path, count: int) -> list[Path]:
    """`count` rank-4 LoRA adapters on q/v_proj with different random weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=list(TINY_TARGETS), init_lora_weights=False
        )
        peft_model = get_peft_model(model, config)
        path = out / f"tiny{seed}"
        peft_model.save_pretrained(str(path))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> list[Path]:
    """Three small, real PEFT adapters of the bundled model (distinct contents)."""
    return _make_tiny_adapters(model_dir, tmp_path_factory.mktemp("tiny-adapters"), 3)


def copy_adapter(src: Path, dst: Path) -> Path:
    """A copy of only the allow-listed files (fact adapters also carry train_log.json)."""
    dst.mkdir(parents=True)
    for name in ALLOWED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


class RecordingPublisher:
    """A ChangePublisher that remembers what it was asked to publish."""

    def __init__(self) -> None:
        self.events: list[ChangeEvent] = []

    async def publish(self, event: ChangeEvent) -> None:
        self.events.append(event)


@pytest.fixture(params=DB_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Sync URL of an empty SQLite file or a fresh PostgreSQL database."""
    with temp_database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(params=DB_BACKENDS)
async def sessionmaker(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A sessionmaker on a fresh, migrated SQLite or PostgreSQL database."""
    async with migrated_db(request.param, tmp_path) as (_, maker):
        yield maker


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "adapters" / "blobs")


@pytest.fixture
def registry(
    sessionmaker: async_sessionmaker[AsyncSession],
    blobs: BlobStore,
    publisher: RecordingPublisher,
) -> AdapterRegistry:
    return AdapterRegistry(sessionmaker, blobs, publisher, base_model="smollm2-test")
