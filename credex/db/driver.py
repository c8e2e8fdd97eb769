"""Statements for hot paths, run straight on the driver's cursor.

A redemption is eight short statements; through SQLAlchemy's execute machinery each costs
several times what the database spends on it. A ``DriverStatement`` is a Core statement compiled
once per dialect (SQLAlchemy stays the one source of the SQL and of how each value is stored),
whose parameters go through the columns' own bind processors, executed on the session's DBAPI
connection inside the session's transaction. Driver errors come out as SQLAlchemy's, so callers
and ``session_for`` treat them as they treat any other.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

_PYFORMAT = re.compile(r"%\((\w+)\)s")


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # the parameters, in the order a positional driver wants them
    processors: tuple[Callable[[Any], Any] | None, ...]
    defaults: dict[str, Any]  # values the statement carries itself (literals become parameters)
    positional: bool


class DriverStatement:
    """``statement`` (with ``bindparam()`` names, or an INSERT given ``columns``) for the driver."""

    def __init__(self, statement, *, columns: Sequence[str] | None = None) -> None:
        self.statement = statement
        self.columns = list(columns) if columns is not None else None
        self._by_dialect: dict[str, _Compiled] = {}

    def _compiled(self, dialect) -> _Compiled:
        compiled = self._by_dialect.get(dialect.name)
        if compiled is None:
            done = self.statement.compile(dialect=dialect, column_keys=self.columns)
            binds = {name: bind for bind, name in done.bind_names.items()}
            sql, positional = done.string, bool(done.positional)
            if positional:
                names = tuple(done.positiontup)
            elif dialect.paramstyle == "pyformat" and "%%" not in sql:
                # Positional %s: psycopg maps names to positions on every execute otherwise.
                names = tuple(_PYFORMAT.findall(sql))
                sql, positional = _PYFORMAT.sub("%s", sql), True
            else:
                names = tuple(done.bind_names.values())
            processors = tuple(binds[name].type.bind_processor(dialect) for name in names)
            defaults = {name: bind.effective_value for name, bind in binds.items() if not bind.required}
            compiled = _Compiled(sql, names, processors, defaults, positional)
            self._by_dialect[dialect.name] = compiled
        return compiled

    def execute(self, cursor: DriverCursor, params: Mapping[str, Any]):
        """Run on ``cursor`` (the session's transaction); returns the DBAPI cursor, whose
        ``fetchone()`` gives a RETURNING row."""
        compiled = self._compiled(cursor.dialect)
        given = compiled.defaults | dict(params) if compiled.defaults else params
        values = [
            given[name] if process is None else process(given[name])
            for name, process in zip(compiled.names, compiled.processors, strict=True)
        ]
        arguments = values if compiled.positional else dict(zip(compiled.names, values, strict=True))
        try:
            cursor.cursor.execute(compiled.sql, arguments)
        except cursor.dialect.loaded_dbapi.Error as error:
            raise DBAPIError.instance(
                compiled.sql,
                None,
                error,
                cursor.dialect.loaded_dbapi.Error,
                hide_parameters=True,
                dialect=cursor.dialect,
            ) from None
        return cursor.cursor


class DriverCursor:
    """The DBAPI cursor of a session's connection, inside the session's transaction."""

    def __init__(self, session: Session) -> None:
        connection = session.connection()
        self.dialect = connection.dialect
        self.cursor = connection.connection.dbapi_connection.cursor()


def first_value(cursor) -> Any:
    """The first column of the first row, or None."""
    row = cursor.fetchone()
    return None if row is None else row[0]
