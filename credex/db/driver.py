"""Statements for hot paths, compiled once and run on the session's DBAPI cursor.

A redemption is ten short statements. Through ``Connection.execute`` each costs several times
what the database spends on it, and ``Connection.exec_driver_sql`` saves little of that (its
execution context and result are the cost): bench/redeem.py measured credex at 0.27-0.39 of the
bare driver on SQLite with Core, 0.25-0.55 with ``exec_driver_sql``, 0.44-0.69 on the cursor.

A ``DriverStatement`` is a Core statement (SQLAlchemy stays the one source of the SQL and of how
each value is stored), compiled once per dialect through SQLAlchemy's documented API:
``construct_expanded_state`` gives the SQL, the order of a positional driver's parameters and the
values the statement carries itself (its literals); each parameter's type (``binds``) gives its
dialect's bind processor, so a value is stored as Core stores it (on SQLite a datetime is text
such as ``2026-11-25 01:04:05.000000``). A value missing at a call is refused before the database
sees the statement. The paramstyle is the one SQLAlchemy renders for the driver: ``?`` for
sqlite3, ``%(name)s`` for psycopg (positional ``%s`` measured no faster).

It runs inside the session's transaction and never commits: the caller does (see
``credex.db.engine``). A driver error comes out as SQLAlchemy's ``DBAPIError`` subclass for the
driver's class (``IntegrityError``, ``OperationalError``…), without its parameters, and a lost
connection is invalidated as SQLAlchemy would, so callers and ``session_for`` treat these errors
as they treat any other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlmodel import Session


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]
    plan: tuple[tuple[str, Callable[[Any], Any] | None], ...]  # each parameter and its processor
    positional: bool  # the plan's order is the driver's; else the values go by name
    defaults: dict[str, Any]  # values the statement carries itself (its literals)


class DriverStatement:
    """``statement`` (with ``bindparam()`` names, or an INSERT given ``columns``) for the driver."""

    def __init__(self, statement, *, columns: Sequence[str] | None = None) -> None:
        self.statement = statement
        self.columns = list(columns) if columns is not None else None
        self._by_dialect: dict[str, _Compiled] = {}

    def _compiled(self, dialect, params: Mapping[str, Any]) -> _Compiled:
        done = self._by_dialect.get(dialect.name)
        if done is None:
            compiled = self.statement.compile(dialect=dialect, column_keys=self.columns)
            state = compiled.construct_expanded_state(params)  # refuses a missing value
            if state.parameter_expansion:  # an expanding IN: its SQL depends on the values
                raise ValueError("a DriverStatement cannot have expanding parameters")
            names = state.positiontup if state.positiontup is not None else tuple(state.parameters)
            plan = tuple(
                (name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
                for name in names
            )
            defaults = {name: value for name, value in state.parameters.items() if name not in params}
            done = _Compiled(state.statement, tuple(names), plan, state.positiontup is not None, defaults)
            self._by_dialect[dialect.name] = done
        return done

    def execute(self, cursor: DriverCursor, params: Mapping[str, Any]):
        """Run on ``cursor`` (the session's transaction); returns the DBAPI cursor, whose
        ``fetchone()`` gives a RETURNING row."""
        dialect = cursor.dialect
        done = self._compiled(dialect, params)
        given = done.defaults | params if done.defaults else params
        try:
            values = [given[name] if process is None else process(given[name]) for name, process in done.plan]
        except KeyError as missing:
            raise ValueError(f"no value for the statement's parameter {missing}") from None
        arguments = values if done.positional else dict(zip(done.names, values, strict=True))
        try:
            cursor.cursor.execute(done.sql, arguments)
        except dialect.loaded_dbapi.Error as error:
            lost = dialect.is_disconnect(error, cursor.dbapi_connection, cursor.cursor)
            wrapped = DBAPIError.instance(
                done.sql,
                None,
                error,
                dialect.loaded_dbapi.Error,
                hide_parameters=True,
                connection_invalidated=lost,
                dialect=dialect,
            )
            if lost:
                cursor.connection.invalidate(wrapped)
            raise wrapped from None
        return cursor.cursor


class DriverCursor:
    """A DBAPI cursor on the session's connection, inside the session's transaction."""

    def __init__(self, session: Session) -> None:
        self.connection = session.connection()
        self.dialect = self.connection.dialect
        self.dbapi_connection = self.connection.connection.dbapi_connection
        self.cursor = self.dbapi_connection.cursor()


def first_value(cursor) -> Any:
    """The first column of the first row, or None."""
    row = cursor.fetchone()
    return None if row is None else row[0]
