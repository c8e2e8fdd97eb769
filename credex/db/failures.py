"""What a database failure means to a user: the driver's exception classes and codes (never its
message text, but where SQLite gives no other sign) turned into credex's errors and exit codes.

``is_connection_error``: the database cannot be reached or used now (exit 69; a worker waits and
tries again). ``translate_db_error``: any known failure as a ``CredexError`` (the SQL and its
values never shown), None for a bug. ``permission_denied``: a role's missing privilege.
"""

from __future__ import annotations

import sys
import traceback

from sqlalchemy.exc import DBAPIError

from credex.db.urls import display_url
from credex.errors import (
    AppendOnly,
    ConstraintViolated,
    CredexError,
    InvalidInput,
    PermissionDenied,
    SchemaMismatch,
    Unavailable,
    UnreadableValue,
    redact,
)

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
SQLITE_CANNOT_WRITE = frozenset({3, 8, 10, 13})  # PERM, READONLY, IOERR, FULL
_SQLITE_UNUSABLE = SQLITE_CANNOT_WRITE | {11, 26}  # CORRUPT, NOTADB


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


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return redact(text.splitlines()[0]) if text else type(error).__name__


# The append-only triggers of migration 0008: Postgres raises this SQLSTATE; SQLite's RAISE(ABORT)
# in a trigger is SQLITE_CONSTRAINT_TRIGGER. Postgres's own "permission denied" is 42501.
_PG_APPEND_ONLY, PG_PERMISSION_DENIED = "CX001", "42501"
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
UPGRADE_HINT = "run `credex db upgrade` as the role that owns the schema"


def permission_denied(error: BaseException, *, hint: str = _ROLES_HINT) -> PermissionDenied | None:
    """Postgres refusing a privilege the role lacks (SQLSTATE 42501, whatever the words) as
    ``permission_denied`` (exit 1); None for any other error."""
    if sqlstate(error) != PG_PERMISSION_DENIED:
        return None
    return PermissionDenied(
        f"refused by the database: {first_line(getattr(error, 'orig', None) or error)} "
        f"(the role this command connects as lacks the privilege: {hint})"
    )


def _from_the_driver(error: BaseException) -> bool:
    """A driver's own exception, not wrapped by SQLAlchemy (bulk writes run on the driver's cursor)."""
    return any(
        (driver := sys.modules.get(name)) is not None and isinstance(error, driver.Error)
        for name in ("psycopg", "sqlite3")
    )


def sqlstate(error: BaseException) -> str | None:
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
        return InvalidInput(f"a value is not valid Unicode text: {first_line(error)}")
    if _raised_reading_a_row(error):
        return UnreadableValue(
            f"the database holds a value that is not of its column's type ({first_line(error)}): "
            "it was changed by hand; repair the row"
        )
    if not isinstance(error, DBAPIError) and not _from_the_driver(error):
        return None
    orig = getattr(error, "orig", None) or error
    if (refused := _refusal(error)) is not None:
        return refused
    if is_connection_error(error):
        return Unavailable(f"cannot use the database: {first_line(orig)}")
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _SQLITE_UNUSABLE:
        return Unavailable(f"cannot use the database: {first_line(orig)}")
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(orig, psycopg.DataError):
        return InvalidInput(f"the database refused a value: {first_line(orig)}")
    return None
