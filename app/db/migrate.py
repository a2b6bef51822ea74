"""Run the Alembic migrations in-process (CLI, `selfadapt up`, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

import app
from app.db.session import ensure_sqlite_dir
from app.settings import Settings

# The project is installed editable, so the repo root sits next to the `app` package.
ALEMBIC_DIR = Path(app.__file__).resolve().parent.parent / "alembic"


def _sync_url(settings_or_url: Settings | str) -> str:
    if isinstance(settings_or_url, Settings):
        return settings_or_url.sqlalchemy_url
    url = make_url(settings_or_url)
    if url.drivername == "sqlite+aiosqlite":  # Alembic runs on a sync connection
        url = url.set(drivername="sqlite")
    return url.render_as_string(hide_password=False)


def alembic_config(settings_or_url: Settings | str) -> Config:
    """An Alembic config for our scripts, pointed at the given database."""
    url = _sync_url(settings_or_url)
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    # Passed as an attribute, not a main option: ConfigParser would choke on '%' in passwords.
    config.attributes["url"] = url
    return config


def upgrade(settings_or_url: Settings | str, revision: str = "head") -> None:
    config = alembic_config(settings_or_url)
    ensure_sqlite_dir(config.attributes["url"])
    command.upgrade(config, revision)


def downgrade(settings_or_url: Settings | str, revision: str) -> None:
    config = alembic_config(settings_or_url)
    command.downgrade(config, revision)
