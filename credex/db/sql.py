"""SQL shapes that keep a statement's text the same whatever the number of rows it is given, so
that SQLAlchemy compiles it once and the driver converts and prepares it once.

A list written out as one placeholder per item (``IN (…)``, a VALUES row per item, a CASE arm per
item) makes a new text for every length: on Postgres, psycopg then parses the whole text again on
every call (it caches only texts under 4 kB with at most 50 parameters): about a fifth of the
warehouse's samples in a py-spy profile under load. On Postgres a list is one array parameter
instead:

- ``one_of(column, name)``: ``column = ANY(:name)``; elsewhere ``column IN (:name…)``.
- ``unnested(alias, **columns)``: rows zipped from one array parameter per column
  (``SELECT unnest(:id) AS id, unnest(:carrier) AS carrier``), to insert from or to update a
  row from its own values. Postgres only: the callers keep their SQLite statement.
"""

from __future__ import annotations

from sqlalchemy import ARRAY, Boolean, any_, bindparam, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Subquery
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeEngine


class OneOf(ColumnElement[bool]):
    """``column IN (:name…)``, on Postgres ``column = ANY(:name)``: the parameter ``name`` is a
    list of values of the column's type."""

    inherit_cache = True
    type = Boolean()
    _is_implicitly_boolean = True  # a condition as it is, not "… = 1" where booleans are integers
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("name", InternalTraversal.dp_string),
    ]

    def __init__(self, column, name: str) -> None:
        self.column = column
        self.name = name


def one_of(column, name: str) -> OneOf:
    return OneOf(column, name)


@compiles(OneOf)
def _one_of_in(element: OneOf, compiler, **kw) -> str:
    return compiler.process(element.column.in_(bindparam(element.name, expanding=True)), **kw)


@compiles(OneOf, "postgresql")
def _one_of_any(element: OneOf, compiler, **kw) -> str:
    return compiler.process(element.column == any_(_array(element.name, element.column.type)), **kw)


def _array(name: str, item: TypeEngine):
    # The generic ARRAY, which Postgres's dialect renders as its own: building a statement does
    # not import that dialect, so a SQLite process never loads it (about 20 ms of imports).
    return bindparam(name, type_=ARRAY(item))


def unnested(alias: str, **columns: TypeEngine) -> Subquery:
    """Postgres: ``(SELECT unnest(:<alias>_<column>) AS <column>, …) AS <alias>``, one array
    parameter per column, all of the same length (their rows are zipped in order)."""
    return select(
        *(
            func.unnest(_array(f"{alias}_{name}", item), type_=item).label(name)
            for name, item in columns.items()
        )
    ).subquery(alias)


def is_postgres(session) -> bool:
    return session.get_bind().dialect.name == "postgresql"
