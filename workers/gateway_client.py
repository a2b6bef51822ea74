"""The worker's client for the gateway's OpenAI API: chat completions with retries on 503/429."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import httpx

from app.settings import Settings
from workers.training.threads import engine_is_busy

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 503})
"""Overload (admission queue full) and engine not ready: both say when to come back."""


class ChatClient(Protocol):
    """What the learning stages need from a model server: chat choices by model name.

    ``GatewayClient`` serves it over HTTP; the learning benchmark serves it in-process.
    """

    async def chat(
        self,
        model: str,
        messages: Sequence[dict[str, str]],
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 64,
        n: int = 1,
        seed: int | None = None,
    ) -> list[str]: ...


class GatewayError(RuntimeError):
    """The gateway answered with an error the worker cannot retry away."""

    def __init__(self, status_code: int, message: str, code: str | None = None) -> None:
        super().__init__(f"gateway {status_code} ({code}): {message}")
        self.status_code = status_code
        self.code = code


def gateway_url(settings: Settings) -> str:
    """``settings.pipeline.gateway_url`` or the gateway this process's settings would listen on."""
    if settings.pipeline.gateway_url:
        return settings.pipeline.gateway_url.rstrip("/")
    host = settings.server.host
    if host in {"0.0.0.0", "::"}:
        host = "127.0.0.1"  # the wildcard listener is reachable on loopback
    return f"http://{host}:{settings.server.port}"


class GatewayClient:
    """Async chat client. Transient failures (429/503, connection errors) are retried with
    the server's ``Retry-After`` (or exponential backoff) for up to ``retry_for_s`` seconds."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout_s: float = 300.0,
        retry_for_s: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=timeout_s, transport=transport
        )
        self._retry_for_s = retry_for_s

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewayClient:
        key = settings.pipeline.worker_api_key
        return cls(gateway_url(settings), key.get_secret_value() if key else None)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def chat(
        self,
        model: str,
        messages: Sequence[dict[str, str]],
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 64,
        n: int = 1,
        seed: int | None = None,
    ) -> list[str]:
        """The ``n`` choices' texts, in choice order.

        Raises:
            GatewayError: a non-retryable error status, or retries exhausted.
        """
        body: dict[str, Any] = {
            "model": model,
            "messages": list(messages),
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "n": n,
        }
        if seed is not None:
            body["seed"] = seed
        data = await self._post("/v1/chat/completions", body)
        choices = sorted(data["choices"], key=lambda c: c["index"])
        return [c["message"].get("content") or "" for c in choices]

    async def engine_busy(self) -> bool | None:
        """Whether the gateway has requests in flight (its /metrics); None if unreadable."""
        return await engine_is_busy(self._http)

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_for_s
        backoff = 0.5
        while True:
            try:
                response = await self._http.post(path, json=body)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
                wait, reason = backoff, f"{type(e).__name__}: {e}"
                if loop.time() + wait > deadline:
                    raise GatewayError(0, f"gateway unreachable: {reason}", "unreachable") from e
            else:
                if response.status_code < 400:
                    data: dict[str, Any] = response.json()
                    return data
                if response.status_code not in RETRY_STATUSES:
                    raise _error(response)
                wait = _retry_after(response, backoff)
                reason = f"HTTP {response.status_code}"
                if loop.time() + wait > deadline:
                    raise _error(response)
            logger.info("gateway %s on %s; retrying in %.1f s", reason, path, wait)
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, 10.0)


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", default)))
    except ValueError:
        return default


def _error(response: httpx.Response) -> GatewayError:
    try:
        error = response.json().get("error", {})
        message, code = str(error.get("message", response.text)), error.get("code")
    except ValueError:
        message, code = response.text, None
    return GatewayError(response.status_code, message, code)
