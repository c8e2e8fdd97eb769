"""Alembic, driven from code: no alembic.ini to find, one history for SQLite and Postgres."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).with_name("migrations")
_UPGRADE_LOCK_KEY = 0x63726564  # "cred": one upgrade at a time on a Postgres server


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade_to_head(engine: Engine) -> None:
    """Migrate to the newest revision, inside one transaction that also holds the lock, so
    that processes starting together on a fresh database migrate it once."""
    config = alembic_config()
    with engine.execution_options(credex_write=True).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
