"""Engines and sessions: SQLite pragmas and write locks, Postgres through psycopg 3,
and the check that the schema is current."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError
from sqlmodel import Session, create_engine

from credex.db import HEAD_REVISION
from credex.errors import (
    AppendOnly,
    CredexError,
    InvalidInput,
    NotMigrated,
    PermissionDenied,
    Unavailable,
    redact,
)

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 5

_engines: dict[str, Engine] = {}
_write_engines: dict[str, Engine] = {}  # the same engines, their transactions begun for writing
_current: set[str] = set()  # URLs whose schema was checked in this process
_lock = threading.Lock()


def normalise_url(url: str):
    """Parse a database URL; ``postgresql://`` means psycopg 3."""
    try:
        parsed = make_url(url)
    except Exception:
        raise InvalidInput(f"not a database URL: {redact(url)!r}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise InvalidInput(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql")
    return parsed


def display_url(url: str) -> str:
    """The URL as it may be shown to a user: never with its password."""
    try:
        return normalise_url(url).render_as_string(hide_password=True)
    except CredexError:
        return redact(url)


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # We issue BEGIN ourselves, so that writers can take the lock up front.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
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
            if parsed.get_backend_name() == "sqlite":
                engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
                _sqlite_setup(engine)
            else:
                engine = create_engine(
                    parsed,
                    connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
                    hide_parameters=True,
                )
            _engines[url] = engine
        return engine


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
            if is_connection_error(error):
                raise
            return None


def ensure_schema(url: str) -> Engine:
    """The engine for ``url``, its schema current: SQLite is migrated on first use;
    an out-of-date Postgres is refused until ``credex db upgrade``."""
    engine = get_engine(url)
    if url in _current:
        return engine
    try:
        revision = schema_revision(engine)
        if revision != HEAD_REVISION:
            if engine.dialect.name == "sqlite":
                upgrade(url)
            elif revision is None:
                raise NotMigrated(
                    f"the database {display_url(url)} has no credex schema: run `credex db upgrade`"
                )
            else:
                raise NotMigrated(
                    f"the database {display_url(url)} is at revision {revision}, "
                    f"credex needs {HEAD_REVISION}: run `credex db upgrade`"
                )
    except DBAPIError as error:
        raise unavailable(url, error) from None
    _current.add(url)
    return engine


def upgrade(url: str) -> tuple[str | None, str]:
    """Migrate ``url`` to the newest revision (idempotent). Returns (before, after)."""
    from credex.db.migrate import upgrade_to_head

    engine = get_engine(url)
    try:
        before = schema_revision(engine)
        upgrade_to_head(engine)
    except DBAPIError as error:
        raise unavailable(url, error) from None
    _current.add(url)
    return before, HEAD_REVISION


@contextmanager
def session_for(url: str, *, write: bool = False) -> Iterator[Session]:
    """A session whose transaction is committed by the caller; database failures
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


# psycopg: an OperationalError with no SQLSTATE is the client's own (refused, unknown host, server
# gone, the connection closed); from the server, class 08 (connection exception), a shutdown or
# restart (57P01-57P03) and too many connections. Deadlocks and serialization failures are
# OperationalErrors too, but the connection is fine: not these.
_PG_LOST_STATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# SQLite: the primary result codes of a database that cannot be had now or at all.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CANTOPEN = 5, 6, 14
_SQLITE_UNAVAILABLE = frozenset({_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CANTOPEN})


def is_connection_error(error: BaseException) -> bool:
    """Whether ``error`` means the database cannot be reached or used right now (exit 69, or a
    worker waits and tries again), judged by the driver's exception class and codes, and by
    SQLAlchemy's own verdict that the connection was invalidated; never by the message text."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    orig = getattr(error, "orig", None) or error
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _SQLITE_UNAVAILABLE  # extended codes carry the primary in the low byte
    psycopg = sys.modules.get("psycopg")  # loaded whenever a psycopg error exists
    if psycopg is not None and isinstance(orig, psycopg.OperationalError):
        state = orig.sqlstate
        return state is None or state.startswith("08") or state in _PG_LOST_STATES
    return False


def unavailable(url: str, error: BaseException) -> Unavailable:
    orig = getattr(error, "orig", error)
    detail = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return Unavailable(f"cannot use the database {display_url(url)}: {redact(detail)}")


# The append-only triggers of migration 0008: Postgres raises this SQLSTATE; SQLite's RAISE(ABORT)
# in a trigger is SQLITE_CONSTRAINT_TRIGGER. Postgres's own "permission denied" is 42501.
_PG_APPEND_ONLY, _PG_PERMISSION_DENIED = "CX001", "42501"
_SQLITE_CONSTRAINT_TRIGGER = 1811


def _refusal(error: BaseException) -> CredexError | None:
    """The database refusing on principle (an append-only table, a role's missing privilege)."""
    orig = getattr(error, "orig", None) or error
    first_line = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    state = getattr(orig, "sqlstate", None)
    if state == _PG_APPEND_ONLY or getattr(orig, "sqlite_errorcode", None) == _SQLITE_CONSTRAINT_TRIGGER:
        return AppendOnly(f"refused by the database: {redact(first_line)}")
    if state == _PG_PERMISSION_DENIED:
        return PermissionDenied(
            f"refused by the database: {redact(first_line)} "
            "(the role this command connects as lacks the privilege: see `credex db roles`)"
        )
    return None


def translate_db_error(error: BaseException) -> CredexError | None:
    """A known database failure as a user-facing error, or None."""
    if isinstance(error, CredexError):
        return error
    if isinstance(error, DBAPIError) and (refused := _refusal(error)) is not None:
        return refused
    if isinstance(error, DBAPIError) and is_connection_error(error):
        orig = getattr(error, "orig", error)
        return Unavailable(f"cannot use the database: {redact(str(orig).strip().splitlines()[0])}")
    return None
