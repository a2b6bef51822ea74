"""`selfadapt adapters`: list, show, promote, roll back, import and audit through the admin API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from adapters_store.validation import ALLOWED_FILES
from app.cli.http import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, call

adapters_app = typer.Typer(
    name="adapters", help="Manage adapter versions (via a running gateway).", no_args_is_help=True
)

NamespaceArg = Annotated[str, typer.Argument(help="namespace, e.g. acme")]
VersionArg = Annotated[str, typer.Argument(help="version number, e.g. 7 or v7")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="kept in the audit trail")]


def _emit(body: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    for line in lines:
        typer.echo(line)


def _version_line(v: dict[str, Any]) -> str:
    aliases = ",".join(v.get("aliases") or []) or "-"
    scores = json.dumps(v["scores"], separators=(",", ":")) if v.get("scores") else "-"
    return (
        f"{v['name']:<24} {v['status']:<10} {aliases:<28} parent={v.get('parent') or '-':<16} "
        f"r={v['rank']:<3} {v['created_at'][:19]}  {v['created_by']}  scores={scores}"
    )


def _change_line(body: dict[str, Any]) -> str:
    previous = body.get("previous") or "none"
    return f"{body['namespace']}: champion is now {body['champion']['name']} (was {previous})"


@adapters_app.command("list")
def list_(
    namespace: Annotated[str | None, typer.Argument(help="namespace; omit to list them")] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List namespaces, or one namespace's versions."""
    if namespace is None:
        body = call("GET", url, "/v1/admin/namespaces", key)
        lines = [f"{n['name']:<24} champion={n.get('champion') or '-'}" for n in body["data"]]
    else:
        body = call("GET", url, f"/v1/admin/namespaces/{namespace}/versions", key)
        lines = [_version_line(v) for v in body["data"]]
    _emit(body, as_json, lines)


@adapters_app.command("show")
def show(
    namespace: NamespaceArg,
    version: VersionArg,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
) -> None:
    """Show one version (JSON)."""
    body = call("GET", url, f"/v1/admin/namespaces/{namespace}/versions/{version}", key)
    _emit(body, True, [])


@adapters_app.command("promote")
def promote(
    namespace: NamespaceArg,
    version: VersionArg,
    reason: ReasonOpt = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a version the namespace's champion."""
    path = f"/v1/admin/namespaces/{namespace}/versions/{version}/promote"
    body = call("POST", url, path, key, json={"reason": reason})
    _emit(body, as_json, [_change_line(body)])


@adapters_app.command("rollback")
def rollback(
    namespace: NamespaceArg,
    to: Annotated[
        int | None, typer.Option("--to", help="version number; default: previous")
    ] = None,
    reason: ReasonOpt = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move the champion back to the previous one (or to --to VERSION)."""
    body = call(
        "POST",
        url,
        f"/v1/admin/namespaces/{namespace}/rollback",
        key,
        json={"to_version": to, "reason": reason},
    )
    _emit(body, as_json, [_change_line(body)])


@adapters_app.command("import")
def import_(
    namespace: NamespaceArg,
    folder: Annotated[Path, typer.Argument(help="PEFT folder (adapter_config.json + safetensors)")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a PEFT LoRA folder as a new candidate version (only its adapter files are sent)."""
    if not folder.is_dir():
        typer.echo(f"error: {folder} is not a directory", err=True)
        raise typer.Exit(2)
    names = sorted(p.name for p in folder.iterdir() if p.name in ALLOWED_FILES and p.is_file())
    if not names:
        typer.echo(f"error: {folder} holds no {' or '.join(sorted(ALLOWED_FILES))}", err=True)
        raise typer.Exit(2)
    handles = [(folder / n).open("rb") for n in names]
    try:
        files = [
            ("files", (n, fh, "application/octet-stream"))
            for n, fh in zip(names, handles, strict=True)
        ]
        path = f"/v1/admin/namespaces/{namespace}/versions:import"
        body = call("POST", url, path, key, files=files)
    finally:
        for fh in handles:
            fh.close()
    _emit(
        body, as_json, [f"imported {body['name']} ({body['status']}, sha256 {body['blob_sha256']})"]
    )


@adapters_app.command("audit")
def audit(
    namespace: Annotated[str | None, typer.Option("--namespace", help="only this one")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500)] = 50,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show registry changes, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if namespace:
        params["namespace"] = namespace
    body = call("GET", url, "/v1/admin/audit", key, params=params)
    lines = [
        f"{e['at'][:19]}  {e['actor']:<16} {e['action']:<18} {e['target']:<20} "
        f"{e.get('reason') or ''}"
        for e in body["data"]
    ]
    _emit(body, as_json, lines)
