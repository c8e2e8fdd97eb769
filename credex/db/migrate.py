"""Alembic, driven from code: no alembic.ini to find, one history for SQLite and Postgres."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Engine

from credex.errors import NotMigrated

MIGRATIONS = Path(__file__).with_name("migrations")
_UPGRADE_LOCK_KEY = 0x63726564  # "cred": one upgrade at a time on a Postgres server


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def unknown_revision(name: str, revision: str) -> NotMigrated:
    return NotMigrated(
        f"the database {name} is at revision {revision}, which this credex does not know "
        f"(it needs {head_revision()}): a newer credex migrated it; use that version, or restore a backup"
    )


def upgrade_to_head(engine: Engine, name: str) -> str | None:
    """Migrate to the newest revision, inside one transaction that also holds the lock, so
    that processes starting together on a fresh database migrate it once. Returns the revision
    found once the lock was held (None: no schema); a revision credex does not know is refused
    (NotMigrated) and left alone. ``name`` is the database as it may be shown."""
    config = alembic_config()
    with engine.execution_options(credex_write=True).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK_KEY})
        before = MigrationContext.configure(connection).get_current_revision()
        if before is not None and before not in known_revisions():
            raise unknown_revision(name, before)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return before
