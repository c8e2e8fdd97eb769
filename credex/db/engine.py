"""Engines and sessions: SQLite pragmas and write locks, Postgres through psycopg 3,
and the check that the schema is current.

Who commits, everywhere in credex:

- A service ends its own transaction. A service is a function a command, a worker or a script
  calls with a session to make one change a user sees: the awards, ``redeem``,
  ``cancel_redemption``, the catalog's add and update, ``refund_order``, ``sync_deliveries``, the
  relay's operators, and the cron jobs (``settle_pending``, ``expire_lapsed``: one transaction per
  account). It commits what it wrote, or rolls back, before it returns or raises a
  ``CredexError``, so one session can serve many calls (a script redeeming in a loop).
- Everything a service calls with its session works inside that transaction and never commits
  or rolls back: lifecycle's helpers, the outbox's and the shipments' functions, and
  ``credex.db.driver``'s statements on the session's cursor.
- ``session_for`` and ``open_session`` never commit. What is left uncommitted when the session
  closes is rolled back; ``session_for`` also rolls back on a database error before raising it.
- A worker that holds a session of its own commits in the call that ends the work it began: a
  relay's claim is committed with its record (``credex.relay.claims``), the warehouse's steps
  one by one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, ProgrammingError
from sqlmodel import Session, create_engine

from credex.db import HEAD_REVISION
from credex.db.failures import (
    PG_PERMISSION_DENIED,
    SQLITE_CANNOT_WRITE,
    UPGRADE_HINT,
    first_line,
    is_connection_error,
    permission_denied,
    sqlstate,
    unavailable,
)
from credex.db.urls import display_url, normalise_url
from credex.errors import InvalidInput, NotMigrated

SQLITE_BUSY_TIMEOUT_S = 30.0  # CREDEX_SQLITE_BUSY_TIMEOUT overrides it
POSTGRES_CONNECT_TIMEOUT_S = 5

_engines: dict[str, Engine] = {}
_write_engines: dict[str, Engine] = {}  # the same engines, their transactions begun for writing
_current: set[str] = set()  # URLs whose schema was checked in this process
_lock = threading.Lock()


def sqlite_busy_timeout() -> float:
    """Seconds a SQLite writer waits for a lock held by another program: CREDEX_SQLITE_BUSY_TIMEOUT
    (checked like every setting), else 30."""
    import os

    if "CREDEX_SQLITE_BUSY_TIMEOUT" not in os.environ:
        return SQLITE_BUSY_TIMEOUT_S
    from credex.config import get_settings

    return get_settings().sqlite_busy_timeout


def _sqlite_setup(engine: Engine, busy_timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # We issue BEGIN ourselves, so that writers can take the lock up front.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
        except Exception as error:  # sqlite3.OperationalError, without importing it for Postgres
            # A read-only file (or directory) cannot switch to WAL: it is read as it is, and
            # a write says it is read-only (exit 69).
            if getattr(error, "sqlite_errorcode", 0) & 0xFF not in SQLITE_CANNOT_WRITE:
                raise
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        # BEGIN IMMEDIATE: a writer waits for the lock at the start (busy_timeout applies)
        # instead of failing with SQLITE_BUSY when a read lock must be upgraded.
        if connection.get_execution_options().get("credex_write"):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


def get_engine(url: str) -> Engine:
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            parsed = normalise_url(url)
            try:
                if parsed.get_backend_name() == "sqlite":
                    busy_timeout = sqlite_busy_timeout()
                    engine = create_engine(parsed, connect_args={"timeout": busy_timeout})
                    _sqlite_setup(engine, busy_timeout)
                else:
                    engine = create_engine(
                        parsed,
                        connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
                        hide_parameters=True,
                    )
            except (ArgumentError, ImportError) as error:  # a URL SQLAlchemy cannot use
                raise InvalidInput(
                    f"cannot use the database URL {display_url(url)}: {first_line(error)}"
                ) from None
            _engines[url] = engine
        return engine


def forget_inherited_engines() -> None:
    """In a process forked from one that used the database: drop the engines it inherited
    without closing their connections, which are still the parent's (SQLAlchemy's
    ``dispose(close=False)``; psycopg does not close a connection another process opened when
    it is collected). This process connects anew."""
    global _lock
    _lock = threading.Lock()  # in case another thread of the parent held it at the fork
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()
    _write_engines.clear()


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _write_engines.clear()
        _current.clear()


def schema_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        try:
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except (OperationalError, ProgrammingError) as error:
            # No table to read: no schema. A table this role may not read is no answer at all:
            # that is said as what it is (permission_denied), not as a schema to create.
            if is_connection_error(error) or sqlstate(error) == PG_PERMISSION_DENIED:
                raise
            return None


# Tables every redemption rewrites several times (outbox, redemption, shipment request): where
# nothing vacuums them, their dead row versions pile up and the workers' statements slow with them
# (bench/latency.py: at 300/s, from ~150 ms to ~2 s within a minute).
CHURNED_TABLES = ("outbox_message", "redemption", "shipment_request")


def vacuum_warning(engine: Engine) -> str | None:
    """Postgres with the server's autovacuum off: what that costs and what to do; else None."""
    if engine.dialect.name != "postgresql":
        return None
    try:
        with engine.connect() as connection:
            if connection.execute(text("SELECT current_setting('autovacuum')")).scalar() != "off":
                return None
    except DBAPIError:  # a warning is worth no failure: the worker's next statement reports a lost server
        return None
    return (
        f"the database server's autovacuum is off: {', '.join(CHURNED_TABLES)} keep every dead row "
        "version until something vacuums them, and the relay and the warehouse slow down as they "
        "pile up; turn autovacuum on, or run VACUUM on those tables regularly (from cron)"
    )


def refuse_unknown_revision(url: str, revision: str | None) -> None:
    """NotMigrated for a revision this credex does not know: a newer credex migrated the database,
    which is left alone (no command migrates or reads it)."""
    if revision is not None:
        from credex.db.migrate import known_revisions, unknown_revision

        if revision not in known_revisions():
            raise unknown_revision(display_url(url), revision)


def not_migrated(url: str, revision: str | None) -> NotMigrated:
    """A database behind the newest revision (or with no schema), for `credex db upgrade`."""
    if revision is None:
        return NotMigrated(f"the database {display_url(url)} has no credex schema: run `credex db upgrade`")
    return NotMigrated(
        f"the database {display_url(url)} is at revision {revision}, "
        f"credex needs {HEAD_REVISION}: run `credex db upgrade`"
    )


def ensure_schema(url: str) -> Engine:
    """The engine for ``url``, its schema current: SQLite is migrated on first use;
    an out-of-date Postgres is refused until ``credex db upgrade``."""
    engine = get_engine(url)
    if url in _current:
        return engine
    try:
        revision = schema_revision(engine)
        if revision != HEAD_REVISION:
            refuse_unknown_revision(url, revision)
            if engine.dialect.name != "sqlite":
                raise not_migrated(url, revision)
            upgrade(url)
    except DBAPIError as error:
        raise permission_denied(error) or unavailable(url, error) from None
    _current.add(url)
    return engine


def upgrade(url: str) -> tuple[str | None, str]:
    """Migrate ``url`` to the newest revision (idempotent). Returns (before, after)."""
    from credex.db.migrate import upgrade_to_head

    engine = get_engine(url)
    try:
        before = upgrade_to_head(engine, display_url(url))
    except DBAPIError as error:
        raise permission_denied(error, hint=UPGRADE_HINT) or unavailable(url, error) from None
    _current.add(url)
    return before, HEAD_REVISION


@contextmanager
def session_for(url: str, *, write: bool = False) -> Iterator[Session]:
    """A session for a service to commit (see the module's docstring); database failures
    that mean "cannot reach it" become :class:`Unavailable`."""
    session = Session(bind=_bind(url, write), expire_on_commit=False)
    try:
        yield session
    except DBAPIError as error:
        session.rollback()
        if is_connection_error(error):
            raise unavailable(url, error) from None
        raise
    finally:
        session.close()


def open_session(url: str, *, write: bool = False) -> Session:
    """A session for work that spans several calls (the caller closes it); unlike
    ``session_for`` it does not turn database errors into Unavailable: see ``translate_db_error``."""
    return Session(bind=_bind(url, write), expire_on_commit=False)


def _bind(url: str, write: bool) -> Engine:
    engine = ensure_schema(url)
    if not write:
        return engine
    bound = _write_engines.get(url)
    if bound is None:  # cleared with the engines by dispose_engines()
        bound = _write_engines[url] = engine.execution_options(credex_write=True)
    return bound
