"""Alembic migrations run up, down and up again on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from app.db import migrate
from app.db.base import Base
from app.db.session import make_engine
from tests.factories import db_settings

API_KEY_COLUMNS = {
    "id",
    "name",
    "key_hash",
    "prefix",
    "role",
    "created_at",
    "revoked_at",
    "last_used_at",
}


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _head() -> str | None:
    return ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_current_head()


def _version(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    migrate.upgrade(db_url)
    assert {"api_key", "alembic_version"} <= _tables(db_url)
    assert _version(db_url) == _head()

    migrate.downgrade(db_url, "base")
    assert "api_key" not in _tables(db_url)
    assert _version(db_url) is None

    migrate.upgrade(db_url)
    engine = create_engine(db_url)
    try:
        insp = inspect(engine)
        assert {c["name"] for c in insp.get_columns("api_key")} == API_KEY_COLUMNS
        indexes = {i["name"]: i for i in insp.get_indexes("api_key")}
        assert indexes["ix_api_key_key_hash"]["unique"]
        assert indexes["ix_api_key_key_hash"]["column_names"] == ["key_hash"]
        assert insp.get_pk_constraint("api_key")["constrained_columns"] == ["id"]
    finally:
        engine.dispose()


def test_migrations_match_models(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_upgrade_is_idempotent(db_url: str) -> None:
    migrate.upgrade(db_url)
    migrate.upgrade(db_url)
    assert _version(db_url) == _head()


def test_upgrade_creates_sqlite_directory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a' / 'b' / 'selfadapt.db'}"
    migrate.upgrade(url)
    assert (tmp_path / "a" / "b" / "selfadapt.db").is_file()


async def test_sqlite_engine_pragmas(tmp_path: Path) -> None:
    settings = db_settings(f"sqlite:///{tmp_path / 'new' / 'selfadapt.db'}", tmp_path)
    engine = make_engine(settings)
    try:
        async with engine.connect() as conn:
            journal = (await conn.execute(text("PRAGMA journal_mode"))).scalar()
            foreign_keys = (await conn.execute(text("PRAGMA foreign_keys"))).scalar()
            busy = (await conn.execute(text("PRAGMA busy_timeout"))).scalar()
    finally:
        await engine.dispose()
    assert (journal, foreign_keys, busy) == ("wal", 1, 5000)
