"""Test data builders and throwaway databases shared by the test suites."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.auth import Role, create_key
from app.db import migrate
from app.db.models import ApiKey
from app.db.session import make_engine, make_sessionmaker
from app.settings import Settings

DB_BACKENDS = ["sqlite", "postgresql"]
POSTGRES_URL = os.environ.get(
    "SELFADAPT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextmanager
def temp_database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A sync URL of an empty database: a SQLite file, or a fresh PostgreSQL database.

    The PostgreSQL database is created beside POSTGRES_URL's and dropped afterwards, so runs
    are repeatable and parallel runs do not share tables. Fails when PostgreSQL is down.
    """
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'selfadapt.db'}"
        return
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"selfadapt_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as e:
        admin.dispose()
        # A missing database must fail the run, not skip silently: the suite promises PostgreSQL.
        pytest.fail(
            f"PostgreSQL not reachable at {POSTGRES_URL}: {e.orig}. Start it (see README) or "
            "point SELFADAPT_TEST_POSTGRES_URL at one."
        )
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def db_settings(url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=url, data_dir=tmp_path / "data", env="dev")


@asynccontextmanager
async def migrated_db(
    backend: str, tmp_path: Path
) -> AsyncIterator[tuple[AsyncEngine, async_sessionmaker[AsyncSession]]]:
    """An async engine + sessionmaker on a fresh, fully migrated database."""
    with temp_database_url(backend, tmp_path) as url:
        settings = db_settings(url, tmp_path)
        migrate.upgrade(settings)
        engine = make_engine(settings)
        try:
            yield engine, make_sessionmaker(engine)
        finally:
            await engine.dispose()


async def make_api_key(
    sessionmaker: async_sessionmaker[AsyncSession], *, name: str = "test", role: Role = Role.user
) -> tuple[ApiKey, str]:
    """Stores a key and returns its row and plaintext."""
    async with sessionmaker() as session:
        row, plaintext = await create_key(session, name=name, role=role)
        await session.commit()
    return row, plaintext
