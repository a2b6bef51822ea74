"""`selfadapt jobs`: list, show and watch adaptation jobs through the gateway's API."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from app.cli.http import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, call

jobs_app = typer.Typer(
    name="jobs", help="Follow adaptation jobs (via a running gateway).", no_args_is_help=True
)


@jobs_app.callback()
def _quiet_http() -> None:
    """Follow adaptation jobs (via a running gateway)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll otherwise


TERMINAL = {"succeeded", "failed", "cancelled"}

JobArg = Annotated[str, typer.Argument(help="job id, e.g. adj_...")]


def _get(url: str, path: str, key: str | None, **params: Any) -> dict[str, Any]:
    query = {k: v for k, v in params.items() if v is not None}
    return call("GET", url, path, key, timeout_s=30, params=query)


def _when(ts: int | float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _job_line(job: dict[str, Any]) -> str:
    return (
        f"{job['id']:<32} {job['namespace']:<16} {job['status']:<10} {job['stage']:<10} "
        f"{job['progress'] * 100:5.1f}%  {job.get('decision') or '-':<15} "
        f"{job.get('result_version') or '-':<14} {_when(job['created_at'])}"
    )


def _event_line(event: dict[str, Any]) -> str:
    data = json.dumps(event["data"], separators=(",", ":")) if event.get("data") else ""
    when, attempt = _when(event["created_at"]), event["attempt"]
    return f"{when} #{attempt} {event['type']:<8} {event['message']} {data}"


@jobs_app.command("list")
def list_(
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
    status: Annotated[str | None, typer.Option("--status")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    body = _get(url, "/v1/adaptation/jobs", key, namespace=namespace, status=status, limit=limit)
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    typer.echo(
        f"{'id':<32} {'namespace':<16} {'status':<10} {'stage':<10} {'progress':>6}  "
        f"{'decision':<15} {'version':<14} created"
    )
    for job in body["data"]:
        typer.echo(_job_line(job))


@jobs_app.command("show")
def show(
    job_id: JobArg,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    events: Annotated[int, typer.Option("--events", help="recent events to show")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Show a job: status, stage, decision with reasons, scores and recent events."""
    job = _get(url, f"/v1/adaptation/jobs/{job_id}", key)
    recent = _get(url, f"/v1/adaptation/jobs/{job_id}/events", key, limit=events)["data"]
    if as_json:
        typer.echo(json.dumps({**job, "events": recent}, indent=2))
        return
    typer.echo(_job_line(job))
    typer.echo(
        f"  attempt {job['attempt']}/{job['max_attempts']}, documents: "
        f"{', '.join(job['document_ids'])}"
    )
    for reason in job.get("reasons") or []:
        typer.echo(f"  reason: {reason}")
    if job.get("scores"):
        typer.echo(f"  scores: {json.dumps(job['scores'])}")
    if job.get("error"):
        typer.echo(f"  error: {job['error']}")
    for event in reversed(recent):
        typer.echo("  " + _event_line(event))


@jobs_app.command("watch")
def watch(
    job_id: JobArg,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    interval: Annotated[float, typer.Option("--interval", help="seconds between polls")] = 1.0,
) -> None:
    """Follow a job with a live progress bar and its events until it finishes."""
    from tqdm import tqdm

    seen = 0
    with tqdm(total=100, unit="%", bar_format="{desc} |{bar}| {n:.0f}% [{elapsed}]") as bar:
        while True:
            job = _get(url, f"/v1/adaptation/jobs/{job_id}", key)
            events = _get(url, f"/v1/adaptation/jobs/{job_id}/events", key, limit=100)["data"]
            for event in sorted(events, key=lambda e: int(e["id"])):
                if int(event["id"]) > seen:
                    seen = int(event["id"])
                    bar.write(_event_line(event))
            bar.set_description(f"{job['status']}:{job['stage']} (attempt {job['attempt']})")
            bar.update(job["progress"] * 100 - bar.n)
            if job["status"] in TERMINAL:
                break
            time.sleep(interval)
    typer.echo(_job_line(job))
    if job["status"] != "succeeded":
        raise typer.Exit(1)
