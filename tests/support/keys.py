"""API keys for tests and benchmarks: migrate a gateway's database, then create keys in it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from app.auth import Role, create_key
from app.db import migrate
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings


def create_keys(
    settings: Settings, *, prefix: str = "test", roles: Iterable[Role] = tuple(Role)
) -> dict[Role, str]:
    """One new key per role, named `<prefix>-<role>`; returns the secrets.

    Migrates first, so call it before any gateway on that database starts (they must not
    race to migrate)."""
    migrate.upgrade(settings)

    async def _make() -> dict[Role, str]:
        engine = make_engine(settings)
        try:
            async with make_sessionmaker(engine)() as session:
                keys = {}
                for role in roles:
                    _, keys[role] = await create_key(session, name=f"{prefix}-{role}", role=role)
                await session.commit()
                return keys
        finally:
            await engine.dispose()

    return asyncio.run(_make())
