"""`selfadapt up` (first-start bootstrap, then everything) and `selfadapt serve` (gateway only)."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer

from app.settings import Settings, get_settings

HostOpt = Annotated[str | None, typer.Option("--host", help="default: SELFADAPT_SERVER__HOST")]
PortOpt = Annotated[int | None, typer.Option("--port", help="default: SELFADAPT_SERVER__PORT")]


def _with_listener(host: str | None, port: int | None) -> Settings:
    settings = get_settings()
    server = settings.server.model_copy(
        update={k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    )
    return settings.model_copy(update={"server": server})


def _bootstrap(settings: Settings) -> None:
    """Migrate, prepare the model and make sure an admin key exists (printed once)."""
    from app.auth import ensure_admin_key
    from app.db import migrate
    from app.db.session import make_engine, make_sessionmaker
    from app.model_prep import resolve_model_dir

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings)
    model_dir = resolve_model_dir(settings)
    typer.echo(f"model: {model_dir}")

    async def _admin_key() -> str | None:
        engine = make_engine(settings)
        try:
            preset = settings.bootstrap_admin_key
            return await ensure_admin_key(
                make_sessionmaker(engine),
                preset=preset.get_secret_value() if preset is not None else None,
            )
        finally:
            await engine.dispose()

    key = asyncio.run(_admin_key())
    if key is not None:
        typer.echo(
            "\nCreated the first admin key. It is shown only this once; store it now:\n\n"
            f"    {key}\n\n"
            "Make more keys with `selfadapt keys create --name NAME --role user`.\n"
        )


def _run_gateway(settings: Settings) -> None:
    import uvicorn

    from app.main import create_app

    typer.echo(
        f"gateway on http://{settings.server.host}:{settings.server.port} "
        "(ready when GET /readyz answers 200)"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        timeout_keep_alive=settings.server.keep_alive_s,
        timeout_graceful_shutdown=10,
    )


def up(host: HostOpt = None, port: PortOpt = None) -> None:
    """Start the whole system: gateway, one worker and (without SELFADAPT_REDIS_URL) an
    embedded Redis (first start: model + admin key + the worker's key)."""
    from app.cli.worker import embedded_redis, worker_process
    from app.signals import exit_on_sigterm

    # SIGTERM (and a repeated Ctrl-C) must not skip stopping the worker and Redis below.
    exit_on_sigterm((signal.SIGTERM, signal.SIGINT))
    settings = _with_listener(host, port)
    _bootstrap(settings)
    with embedded_redis(settings) as settings, worker_process(settings):
        _run_gateway(settings)


def serve(host: HostOpt = None, port: PortOpt = None) -> None:
    """Start only the gateway (migrations run; the model must be prepared)."""
    _run_gateway(_with_listener(host, port))
