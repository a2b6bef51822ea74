"""`selfadapt keys`: create, list and revoke API keys directly in the configured database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import Role, create_key, revoke_key
from app.db import migrate, repo
from app.db.models import ApiKey
from app.db.session import make_engine, make_sessionmaker
from app.errors import APIError
from app.settings import get_settings

T = TypeVar("T")

keys_app = typer.Typer(name="keys", help="Manage API keys.", no_args_is_help=True)


def _run(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Migrates the configured database, then runs `work` in one committed session."""
    settings = get_settings()
    migrate.upgrade(settings)

    async def _main() -> T:
        engine = make_engine(settings)
        try:
            async with make_sessionmaker(engine)() as session:
                result = await work(session)
                await session.commit()
                return result
        finally:
            await engine.dispose()

    try:
        return asyncio.run(_main())
    except APIError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(1) from e


def _line(row: ApiKey) -> str:
    state = "active" if row.revoked_at is None else f"revoked {row.revoked_at:%Y-%m-%d %H:%M}"
    used = f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never"
    return f"{row.id:>4}  {row.prefix:<12}  {row.role:<8}  {state:<24}  {used:<16}  {row.name}"


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="who or what uses the key")],
    role: Annotated[Role, typer.Option("--role", help="user < operator < admin")] = Role.user,
) -> None:
    """Create a key and print it once (only its hash is stored)."""

    async def work(session: AsyncSession) -> tuple[ApiKey, str]:
        return await create_key(session, name=name, role=role)

    row, plaintext = _run(work)
    typer.echo(f"created key {row.id} ({row.role}) for {row.name!r}; it will not be shown again:")
    typer.echo(plaintext)


@keys_app.command("list")
def list_keys(
    active_only: Annotated[bool, typer.Option("--active", help="hide revoked keys")] = False,
) -> None:
    """List keys (prefixes only)."""

    async def work(session: AsyncSession) -> list[ApiKey]:
        return list(await repo.list_api_keys(session, include_revoked=not active_only))

    rows = _run(work)
    typer.echo(f"{'id':>4}  {'prefix':<12}  {'role':<8}  {'state':<24}  {'last used':<16}  name")
    for row in rows:
        typer.echo(_line(row))


@keys_app.command("revoke")
def revoke(key_id: Annotated[int, typer.Argument(help="id from `selfadapt keys list`")]) -> None:
    """Revoke a key (gateways stop accepting it within the auth cache TTL)."""

    async def work(session: AsyncSession) -> ApiKey:
        return await revoke_key(session, key_id=key_id)

    row = _run(work)
    typer.echo(f"revoked key {row.id} ({row.prefix}, {row.name!r})")
