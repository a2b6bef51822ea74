"""`selfadapt restem run`: start a ReSTEM job through the admin API (and follow it)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from app.cli.http import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, call
from app.cli.jobs import watch

restem_app = typer.Typer(
    name="restem",
    help="Learn a namespace's self-edit policy (ReSTEM, via a running gateway).",
    no_args_is_help=True,
)


@restem_app.callback()
def _group() -> None:
    """Learn a namespace's self-edit policy (ReSTEM, via a running gateway)."""


@restem_app.command("run")
def run(
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="namespace, e.g. acme")],
    rounds: Annotated[int | None, typer.Option("--rounds", help="ReSTEM rounds")] = None,
    docs: Annotated[int | None, typer.Option("--docs", help="documents per round (N)")] = None,
    samples: Annotated[
        int | None, typer.Option("--samples", help="self-edits per document (K)")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option("--repeats", help="trainings averaged per reward")
    ] = None,
    follow: Annotated[bool, typer.Option("--watch", help="follow the job until it ends")] = False,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue a ReSTEM job; prints its id (unset options use the server's settings)."""
    body = {
        k: v
        for k, v in {"rounds": rounds, "docs": docs, "samples": samples, "repeats": repeats}.items()
        if v is not None
    }
    job = call("POST", url, f"/v1/admin/namespaces/{namespace}/restem", key, json=body)
    typer.echo(json.dumps(job, indent=2) if as_json else job["id"])
    if follow:
        watch(job["id"], url=url, key=key)
