"""Fixtures for the SQL layer: an empty database per test on each backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factories import DB_BACKENDS, temp_database_url


@pytest.fixture(params=DB_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Sync URL of an empty SQLite file or a fresh PostgreSQL database."""
    with temp_database_url(request.param, tmp_path) as url:
        yield url
