"""OpenAI-compatible routes."""

from __future__ import annotations

from app.api.streaming import MODEL_HEADER
from app.services.generation import Generation

ADAPTER_HEADER = "x-selfadapt-adapter"  # the adapter version that served it, e.g. acme@v7


def served_headers(gen: Generation) -> dict[str, str]:
    """Headers naming what serves `gen` (fixed when it was admitted, whatever moves later)."""
    headers = {MODEL_HEADER: gen.model}
    if gen.resolved.lora is not None:
        headers[ADAPTER_HEADER] = gen.resolved.name
    return headers
