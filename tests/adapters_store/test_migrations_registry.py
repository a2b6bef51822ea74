"""The registry migration runs up, down to 0001 and up again on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

import adapters_store.models  # noqa: F401  (registers the registry tables on Base.metadata)
from app.db import migrate
from app.db.base import Base

REGISTRY_COLUMNS = {
    "namespace": {"id", "name", "settings", "last_version", "created_at", "created_by"},
    "adapter_version": {
        "id", "namespace_id", "version", "status", "base_model", "blob_sha256", "size_bytes",
        "peft_config", "rank", "parent_version_id", "job_id", "scores", "created_at",
        "created_by", "note",
    },
    "alias": {"id", "namespace_id", "name", "version_id", "pinned", "updated_at"},
    "audit_event": {
        "id", "at", "actor", "action", "namespace", "target", "before", "after", "reason",
    },
}  # fmt: skip
REVISION = "0002_adapter_registry"


def _version(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def _columns(url: str) -> dict[str, set[str]]:
    engine = create_engine(url)
    try:
        insp = inspect(engine)
        return {t: {c["name"] for c in insp.get_columns(t)} for t in insp.get_table_names()}
    finally:
        engine.dispose()


def _head() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    migrate.upgrade(db_url, REVISION)
    assert _version(db_url) == REVISION
    columns = _columns(db_url)
    for table, expected in REGISTRY_COLUMNS.items():
        assert columns[table] == expected, table

    migrate.downgrade(db_url, "0001_api_keys")
    assert _version(db_url) == "0001_api_keys"
    remaining = set(_columns(db_url))
    assert not remaining & set(REGISTRY_COLUMNS)
    assert "api_key" in remaining

    migrate.upgrade(db_url, REVISION)
    assert _version(db_url) == REVISION
    assert set(REGISTRY_COLUMNS) <= set(_columns(db_url))


def test_registry_constraints(db_url: str) -> None:
    migrate.upgrade(db_url, REVISION)
    engine = create_engine(db_url)
    try:
        insp = inspect(engine)
        uniques = {
            t: {tuple(u["column_names"]) for u in insp.get_unique_constraints(t)}
            for t in ("namespace", "adapter_version", "alias")
        }
        assert uniques == {
            "namespace": {("name",)},
            "adapter_version": {("namespace_id", "version")},
            "alias": {("namespace_id", "name")},
        }
        fks = {
            (fk["constrained_columns"][0], fk["referred_table"], fk["options"].get("ondelete"))
            for fk in insp.get_foreign_keys("adapter_version")
        }
        assert fks == {
            ("namespace_id", "namespace", None),
            ("parent_version_id", "adapter_version", "SET NULL"),
        }
        indexes = {i["name"] for i in insp.get_indexes("adapter_version")}
        assert "ix_adapter_version_blob_sha256" in indexes
    finally:
        engine.dispose()


def test_head_matches_models(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_head_down_to_base_and_back(db_url: str) -> None:
    migrate.upgrade(db_url)
    assert _version(db_url) == _head()
    assert set(REGISTRY_COLUMNS) <= set(_columns(db_url))
    migrate.downgrade(db_url, "base")
    assert set(_columns(db_url)) == {"alembic_version"}
    migrate.upgrade(db_url)
    assert _version(db_url) == _head()
