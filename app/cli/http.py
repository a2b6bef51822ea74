"""What the HTTP client commands share: the --url/--key/--json options and one API call."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer

DEFAULT_URL = "http://127.0.0.1:8000"

UrlOpt = Annotated[str, typer.Option("--url", envvar="SELFADAPT_URL", help="gateway base URL")]
KeyOpt = Annotated[
    str | None, typer.Option("--key", envvar="SELFADAPT_API_KEY", help="API key for the route")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the raw JSON answer")]


def call(
    method: str, url: str, path: str, key: str | None, *, timeout_s: float = 120, **kwargs: Any
) -> dict[str, Any]:
    """One API call. A missing key exits 2; an unreachable gateway or an error answer prints
    the server's message and exits 1."""
    if not key:
        typer.echo("error: pass --key or set SELFADAPT_API_KEY", err=True)
        raise typer.Exit(2)
    try:
        r = httpx.request(
            method,
            url.rstrip("/") + path,
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout_s,
            **kwargs,
        )
    except httpx.HTTPError as e:
        typer.echo(f"error: cannot reach {url}: {e}", err=True)
        raise typer.Exit(1) from e
    try:
        body: dict[str, Any] = r.json()
    except ValueError:
        body = {"error": {"message": r.text or r.reason_phrase}}
    if r.is_error:
        error = body.get("error") or {}
        typer.echo(f"error ({r.status_code}): {error.get('message', body)}", err=True)
        raise typer.Exit(1)
    return body
