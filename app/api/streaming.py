"""Helpers shared by the OpenAI routes: SSE responses and client-disconnect cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

T = TypeVar("T")

MODEL_HEADER = "x-selfadapt-model"  # names what served the request
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; its engine request was aborted."""


def sse(stream: AsyncIterator[str], *, headers: dict[str, str] | None = None) -> StreamingResponse:
    # Starlette cancels the iterator when the client disconnects; the engine generator then
    # aborts its request (vLLM's generate() handles CancelledError/GeneratorExit).
    return StreamingResponse(
        stream, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})}
    )


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine request) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected
