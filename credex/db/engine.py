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

import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, ProgrammingError
from sqlmodel import Session, create_engine

from credex.db import HEAD_REVISION
from credex.db.urls import display_url, normalise_url
from credex.errors import (
    AppendOnly,
    ConstraintViolated,
    CredexError,
    InvalidInput,
    NotMigrated,
    PermissionDenied,
    SchemaMismatch,
    Unavailable,
    UnreadableValue,
    redact,
)

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
            if getattr(error, "sqlite_errorcode", 0) & 0xFF not in _SQLITE_CANNOT_WRITE:
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
                    f"cannot use the database URL {display_url(url)}: {_first_line(error)}"
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
            if is_connection_error(error) or _sqlstate(error) == _PG_PERMISSION_DENIED:
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
        raise permission_denied(error, hint=_UPGRADE_HINT) or unavailable(url, error) from None
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


# psycopg: an OperationalError with no SQLSTATE is the client's own (refused, unknown host, server
# gone, the connection closed); from the server, class 08 (connection exception), a shutdown or
# restart (57P01-57P03) and too many connections. Deadlocks and serialization failures are
# OperationalErrors too, but the connection is fine: not these.
_PG_LOST_STATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# SQLite: the primary result codes of a database that cannot be had now or at all.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CANTOPEN = 5, 6, 14
_SQLITE_UNAVAILABLE = frozenset({_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CANTOPEN})
# SQLite: a file that cannot be used as it is (read-only, no permission, a full disk, an I/O
# error, not a database at all): exit 69, but nothing a worker would wait out.
_SQLITE_CANNOT_WRITE = frozenset({3, 8, 10, 13})  # PERM, READONLY, IOERR, FULL
_SQLITE_UNUSABLE = _SQLITE_CANNOT_WRITE | {11, 26}  # CORRUPT, NOTADB


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return redact(text.splitlines()[0]) if text else type(error).__name__


# The append-only triggers of migration 0008: Postgres raises this SQLSTATE; SQLite's RAISE(ABORT)
# in a trigger is SQLITE_CONSTRAINT_TRIGGER. Postgres's own "permission denied" is 42501.
_PG_APPEND_ONLY, _PG_PERMISSION_DENIED = "CX001", "42501"
# A CHECK constraint refused the change: Postgres's check_violation, SQLite's SQLITE_CONSTRAINT_CHECK.
# (A UNIQUE or foreign key refused where credex did not expect it stays a bug: exit 70.)
_PG_CHECK, _SQLITE_CONSTRAINT_CHECK = "23514", 275
_SQLITE_CONSTRAINT_TRIGGER = 1811
# A table or column the schema's revision promises is missing. SQLite gives only its generic
# SQLITE_ERROR code for this, so its message's fixed prefix is what tells it apart.
_PG_UNDEFINED = frozenset({"42P01", "42703"})  # undefined_table, undefined_column
_SQLITE_ERROR = 1
_SQLITE_UNDEFINED = ("no such table:", "no such column:")


def _refusal(error: BaseException) -> CredexError | None:
    """The database refusing on principle (an append-only table, a role's missing privilege)."""
    orig = getattr(error, "orig", None) or error
    first_line = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    state = getattr(orig, "sqlstate", None)
    if state == _PG_APPEND_ONLY or getattr(orig, "sqlite_errorcode", None) == _SQLITE_CONSTRAINT_TRIGGER:
        return AppendOnly(f"refused by the database: {redact(first_line)}")
    if state in _PG_UNDEFINED or (
        getattr(orig, "sqlite_errorcode", None) == _SQLITE_ERROR
        and (first_line.startswith(_SQLITE_UNDEFINED) or " has no column named " in first_line)
    ):
        return SchemaMismatch(
            f"the database's schema is not the one its revision names ({redact(first_line)}): "
            "a table or column was renamed or dropped by hand; restore it"
        )
    if state == _PG_CHECK or getattr(orig, "sqlite_errorcode", None) == _SQLITE_CONSTRAINT_CHECK:
        # Only the first line: Postgres's DETAIL shows the row's values.
        return ConstraintViolated(
            f"refused by the database: {redact(first_line)} (a stored value was changed by hand, so "
            "the change would break a rule the database guards; nothing was written)"
        )
    return permission_denied(error)


_ROLES_HINT = "see `credex db roles`"
_UPGRADE_HINT = "run `credex db upgrade` as the role that owns the schema"


def permission_denied(error: BaseException, *, hint: str = _ROLES_HINT) -> PermissionDenied | None:
    """Postgres refusing a privilege the role lacks (SQLSTATE 42501, whatever the words) as
    ``permission_denied`` (exit 1); None for any other error."""
    if _sqlstate(error) != _PG_PERMISSION_DENIED:
        return None
    return PermissionDenied(
        f"refused by the database: {_first_line(getattr(error, 'orig', None) or error)} "
        f"(the role this command connects as lacks the privilege: {hint})"
    )


def _from_the_driver(error: BaseException) -> bool:
    """A driver's own exception, not wrapped by SQLAlchemy (bulk writes run on the driver's cursor)."""
    return any(
        (driver := sys.modules.get(name)) is not None and isinstance(error, driver.Error)
        for name in ("psycopg", "sqlite3")
    )


def _sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a psycopg error (wrapped by SQLAlchemy or not); None for SQLite's."""
    return getattr(getattr(error, "orig", None) or error, "sqlstate", None)


def _raised_reading_a_row(error: BaseException) -> bool:
    """Whether ``error`` was raised by SQLAlchemy turning a stored value into its column's Python
    type (a datetime from text, a number): a value that is not its column's type, which SQLite
    keeps when an UPDATE run by hand stores it. Judged by where it was raised, not its words."""
    if not isinstance(error, ValueError | TypeError | ArithmeticError):
        return False
    files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(error.__traceback__)][-2:]
    return any("sqlalchemy" in name and "processors" in name for name in files)


def translate_db_error(error: BaseException) -> CredexError | None:
    """A known database failure as a user-facing error, or None. Never the SQL or its values.

    Values the input rules let through but a database refuses (a Postgres data exception,
    class 22: too long, NUL, out of range; text that is not Unicode) are bad input, exit 2."""
    if isinstance(error, CredexError):
        return error
    if isinstance(error, UnicodeError):
        return InvalidInput(f"a value is not valid Unicode text: {_first_line(error)}")
    if _raised_reading_a_row(error):
        return UnreadableValue(
            f"the database holds a value that is not of its column's type ({_first_line(error)}): "
            "it was changed by hand; repair the row"
        )
    if not isinstance(error, DBAPIError) and not _from_the_driver(error):
        return None
    orig = getattr(error, "orig", None) or error
    if (refused := _refusal(error)) is not None:
        return refused
    if is_connection_error(error):
        return Unavailable(f"cannot use the database: {_first_line(orig)}")
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _SQLITE_UNUSABLE:
        return Unavailable(f"cannot use the database: {_first_line(orig)}")
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(orig, psycopg.DataError):
        return InvalidInput(f"the database refused a value: {_first_line(orig)}")
    return None
