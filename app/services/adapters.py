"""Model-name resolution: `base` or an adapter name -> engine LoRA target with a stable id."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.engine.base import LoRATarget
from app.errors import InvalidRequest, NotFound
from app.protocol.openai import ModelCard

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class ResolvedModel:
    """What serves a request: `name` goes into the response's `model` field."""

    name: str
    lora: LoRATarget | None


class AdapterResolver(Protocol):
    async def resolve(self, model: str) -> ResolvedModel: ...

    async def list_models(self) -> list[ModelCard]: ...


def model_not_found(model: str) -> NotFound:
    return NotFound(
        f"The model '{model}' does not exist. GET /v1/models lists the models you can use "
        "('base' is the base model).",
        param="model",
        code="model_not_found",
    )


class LoRAIds:
    """Hands out one engine LoRA id per distinct weights (directory + content fingerprint),
    so a name is never reloaded with different weights: changed files get a new id."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], int] = {}

    def target(self, name: str, path: Path) -> LoRATarget:
        key = (str(path.resolve()), _fingerprint(path))
        lora_id = self._ids.get(key)
        if lora_id is None:
            lora_id = len(self._ids) + 1
            self._ids[key] = lora_id
        return LoRATarget(name=f"{name}#{lora_id}", lora_id=lora_id, path=path.resolve())


def _fingerprint(path: Path) -> str:
    weights = (path / WEIGHTS_FILE).stat()
    config = (path / CONFIG_FILE).read_bytes()
    h = hashlib.sha256(config)
    h.update(f"{weights.st_size}:{weights.st_mtime_ns}".encode())
    return h.hexdigest()


def check_adapter_dir(path: Path, *, max_rank: int, name: str) -> dict[str, object]:
    """Validate a PEFT LoRA folder before the engine sees it; returns its config."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequest(
            f"Adapter '{name}' has no readable {CONFIG_FILE}: {e}", param="model",
            code="adapter_invalid",
        ) from e
    if not (path / WEIGHTS_FILE).is_file():
        raise InvalidRequest(
            f"Adapter '{name}' has no {WEIGHTS_FILE} (only safetensors weights are served).",
            param="model", code="adapter_invalid",
        )
    rank = int(config.get("r", 0))
    if rank > max_rank:
        raise InvalidRequest(
            f"Adapter '{name}' has rank {rank}, above this server's max_lora_rank {max_rank}.",
            param="model", code="adapter_rank_too_large",
        )
    return dict(config)


class FolderAdapterResolver:
    """Adapters are folders `<root>/<name>/` in PEFT format (until the registry replaces this)."""

    def __init__(
        self, root: Path, *, base_name: str, base_root: str, max_rank: int, ttl_s: float = 1.0
    ) -> None:
        self._root = root
        self._base_name = base_name
        self._base_root = base_root
        self._max_rank = max_rank
        self._ttl_s = ttl_s
        self._ids = LoRAIds()
        self._cache: dict[str, tuple[float, ResolvedModel]] = {}

    async def resolve(self, model: str) -> ResolvedModel:
        if model == self._base_name:
            return ResolvedModel(name=self._base_name, lora=None)
        hit = self._cache.get(model)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._ttl_s:
            return hit[1]
        resolved = self._resolve_folder(model)
        self._cache[model] = (now, resolved)
        return resolved

    def _resolve_folder(self, model: str) -> ResolvedModel:
        if not ADAPTER_NAME.match(model):
            raise model_not_found(model)
        path = self._root / model
        if not path.is_dir():
            raise model_not_found(model)
        check_adapter_dir(path, max_rank=self._max_rank, name=model)
        return ResolvedModel(name=model, lora=self._ids.target(model, path))

    async def list_models(self) -> list[ModelCard]:
        created = int(time.time())
        cards = [ModelCard(id=self._base_name, created=created, root=self._base_root)]
        if self._root.is_dir():
            for path in sorted(self._root.iterdir()):
                if ADAPTER_NAME.match(path.name) and (path / CONFIG_FILE).is_file():
                    cards.append(
                        ModelCard(
                            id=path.name,
                            created=int(path.stat().st_mtime),
                            root=self._base_root,
                            parent=self._base_name,
                        )
                    )
        return cards
