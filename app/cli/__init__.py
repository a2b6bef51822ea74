"""`selfadapt` command line: up, serve, worker, model, keys, adapters, jobs, restem."""

from __future__ import annotations

import logging

import typer

from app.cli.adapters import adapters_app
from app.cli.jobs import jobs_app
from app.cli.keys import keys_app
from app.cli.model import model_app
from app.cli.restem import restem_app
from app.cli.serve import serve, up
from app.cli.worker import worker

cli = typer.Typer(
    name="selfadapt",
    help="Online self-adapting LLM inference server.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
cli.command("up")(up)
cli.command("serve")(serve)
cli.command("worker")(worker)
cli.add_typer(model_app)
cli.add_typer(keys_app)
cli.add_typer(jobs_app)
cli.add_typer(adapters_app)
cli.add_typer(restem_app)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One INFO line per HTTP request (the worker's chat calls, its 1 s metrics poll while
    # training) drowns the job's own log; errors still come through.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cli()
