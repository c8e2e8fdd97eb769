"""Reading a bulk batch's state and storing its plan, on the driver's connection inside the
session's transaction: one writer, the same statements and rows on both backends. Where they
differ is how many rows reach a table at once (executemany on SQLite, COPY on Postgres), how
ids are drawn (after the largest, under SQLite's write lock; from the sequence on Postgres), and
how a list travels as one parameter (JSON, an array).

On SQLite the write session's BEGIN IMMEDIATE means no other writer runs meanwhile: nothing can
race. On Postgres the accounts are locked in user id order, and a ref or an account another
transaction recorded first makes the batch start again (``Retry``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlmodel import Session

from credex.db.models import lot_state_is
from credex.points.lots import ledger_table, lot_table
from credex.points.planner import AVAILABLE, USED, Account, Plan, StoredLot

# SQLite's settings for a bulk run's connection, set in each batch's transaction (where SQLite
# allows these two to change; temp_store, for one, it refuses). Neither changes what a commit
# writes or when it is durable: journal_mode WAL and synchronous NORMAL stay as the engine set
# them, and every commit is in the WAL when it returns.
# - cache_size 64 MiB instead of the default 2 MiB: a batch inserts into the ledger's and the
#   lots' indexes at every shopper's place in them; with the default cache those pages are
#   evicted and read back from the file for every batch, and a long run grows slower than its
#   size. The cache is per connection and released with it; peak memory stays under 200 MiB.
# - wal_autocheckpoint 16384 pages (64 MiB at 4 KiB pages) instead of 1000: committed pages are
#   copied from the WAL into the database less often, so an index page changed by many batches
#   is copied once rather than once per batch or two (200k rows: about 15% faster). The WAL file
#   grows to about that size and is checkpointed as before, at the latest when the last
#   connection closes.
BULK_PRAGMAS = ("cache_size = -65536", "wal_autocheckpoint = 16384")

_ACCOUNT_COLUMNS = ("user_id", "balance", "pending", "debt", "earned", "redeemed", "created_at", "updated_at")
_LEDGER_COLUMNS = (
    "id", "user_id", "kind", "ref", "points", "pending", "debt", "balance", "detail", "operator", "reason",
    "created_at",
)  # fmt: skip
_LOT_COLUMNS = (
    "id", "user_id", "entry_id", "points", "remaining", "state", "available_at", "expires_at", "created_at",
)  # fmt: skip
_USE_COLUMNS = ("lot_id", "entry_id", "points")


Reserved = tuple[Sequence[int], Sequence[int]]  # a batch's entry ids and lot ids, drawn beforehand


class Retry(Exception):
    """Another transaction used one of the batch's refs or created one of its accounts first."""


class BatchWriter:
    """The statements and rows of a batch, for either backend (``writer_for`` picks one)."""

    placeholder = "?"  # the driver's parameter marker
    values_of = "json_each(?)"  # a list parameter as rows of one column, ``value``
    lock = ""  # what locks the accounts read (SQLite: the transaction's write lock already does)

    def __init__(self, session: Session) -> None:
        self.session = session
        self._statements: dict[str, str] = {}

    # --- what the backends do differently ---------------------------------------------------

    def _list(self, values: list[str]) -> Any:
        return json.dumps(values)

    def _stamp(self, value: datetime | None) -> Any:
        return value

    def _next_ids(self, table: str, count: int) -> Sequence[int]:
        raise NotImplementedError

    def _insert(self, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> None:
        self.cursor.executemany(
            self._sql(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({_marks(columns)})"), rows
        )

    def _insert_new(self, table: str, columns: Sequence[str], rows: list[tuple], key: str) -> int:
        """Insert the rows whose ``key`` is not taken; how many were."""
        self.cursor.executemany(
            self._sql(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({_marks(columns)}) "
                f"ON CONFLICT ({key}) DO NOTHING"
            ),
            rows,
        )
        return self.cursor.rowcount

    def _update(self, table: str, key: str, columns: Sequence[str], rows: list[tuple]) -> None:
        """Set ``columns`` of the rows whose ``key`` each tuple ends with."""
        settings = ", ".join(f"{column} = ?" for column in columns)
        self.cursor.executemany(self._sql(f"UPDATE {table} SET {settings} WHERE {key} = ?"), rows)

    # --- the same on both -------------------------------------------------------------------

    def _sql(self, text: str) -> str:
        sql = self._statements.get(text)
        if sql is None:
            sql = self._statements[text] = text.replace("?", self.placeholder)
        return sql

    def begin(self) -> None:
        self.db = self.session.connection().connection.driver_connection
        self.cursor = self.db.cursor()

    def accounts(self, users: list[str], *, lock: bool) -> dict[str, Account]:
        rows = self.cursor.execute(
            self._sql(
                "SELECT user_id, balance, pending, debt, earned FROM account "
                f"WHERE user_id IN (SELECT value FROM {self.values_of}) ORDER BY user_id"
                + (self.lock if lock else "")
            ),
            (self._list(users),),
        ).fetchall()
        return {row[0]: Account._make(row[1:]) for row in rows}

    def used_refs(self, refs: list[str]) -> dict[str, tuple[str, str, int]]:
        """ref -> (user id, detail, entry id) of the grants already recorded with ``refs``."""
        rows = self.cursor.execute(
            self._sql(
                "SELECT ref, user_id, detail, id FROM ledger_entry "
                f"WHERE kind = 'grant' AND ref IN (SELECT value FROM {self.values_of})"
            ),
            (self._list(refs),),
        ).fetchall()
        return {ref: (user, detail, id) for ref, user, detail, id in rows}

    def balances_before(self, users: list[str], bound: int) -> dict[str, int]:
        """Each user's balance after their last entry with an id below ``bound``."""
        rows = self.cursor.execute(
            self._sql(
                "SELECT value, (SELECT balance FROM ledger_entry WHERE user_id = value AND id < ? "
                f"ORDER BY id DESC LIMIT 1) FROM {self.values_of}"
            ),
            (bound, self._list(users)),
        ).fetchall()
        return {user: balance or 0 for user, balance in rows}

    def lots_of(self, users: list[str]) -> dict[str, list[StoredLot]]:
        """The available lots of ``users`` in spending order (read after their accounts are locked)."""
        lot = lot_table.c
        lots: dict[str, list[StoredLot]] = {user: [] for user in users}
        rows = self.session.execute(
            select(lot.user_id, lot.id, lot.available_at, lot.remaining)
            .where(lot.user_id.in_(users), lot_state_is(AVAILABLE))
            .order_by(lot.user_id, lot.available_at, lot.id)
        )
        for user, *stored in rows:
            lots[user].append(StoredLot(*stored))
        return lots

    def write(self, plan: Plan, *, now: datetime, operator: str, ids: Reserved | None = None) -> int | None:
        """Store the plan; the first entry id it used (None: no entry). ``ids``: entry and lot
        ids drawn beforehand (``reserve``), at least as many as the plan has; else drawn now."""
        stamp = self._stamp(now)
        stamps: dict[datetime | None, Any] = {now: stamp, None: None}

        def stamped(value: datetime | None) -> Any:
            done = stamps.get(value)
            if done is None and value is not None:
                done = stamps[value] = self._stamp(value)
            return done

        accounts = plan.accounts
        if ids is None:
            entry_ids = self._next_ids("ledger_entry", len(plan.entries))
            lot_ids = self._next_ids("point_lot", len(plan.lots))
        else:
            entry_ids, lot_ids = ids
        if plan.created:
            created = [(u, *accounts[u], 0, stamp, stamp) for u in plan.created]
            if self._insert_new("account", _ACCOUNT_COLUMNS, created, "user_id") != len(created):
                raise Retry("an account was created meanwhile")
        entries = [
            (entry_ids[n], user, kind, ref, points, pending, debt, balance, detail, operator, reason, stamp)
            for n, (user, kind, ref, points, pending, debt, balance, detail, reason) in enumerate(
                plan.entries
            )
        ]
        if self._insert_new("ledger_entry", _LEDGER_COLUMNS, entries, "kind, ref") != len(entries):
            raise Retry("a ref of the batch is recorded already")
        self._insert(
            "point_lot",
            _LOT_COLUMNS,
            (
                (
                    lot_ids[n],
                    user,
                    entry_ids[entry],
                    points,
                    left,
                    state,
                    stamped(since),
                    stamped(until),
                    stamp,
                )
                for n, (entry, user, points, left, state, since, until) in enumerate(plan.lots)
            ),
        )
        if plan.uses:
            self._insert(
                "lot_use",
                _USE_COLUMNS,
                (
                    (lot_ids[lot] if new else lot, entry_ids[entry], points)
                    for lot, entry, points, new in plan.uses
                ),
            )
        if plan.stored_lots:
            self._update(
                "point_lot",
                "id",
                ("remaining", "state"),
                [(left, AVAILABLE if left else USED, lot) for lot, left in plan.stored_lots.items()],
            )
        created_now = set(plan.created)
        changed = [(*accounts[u], stamp, u) for u in accounts if u not in created_now]
        if changed:
            self._update("account", "user_id", (*Account._fields, "updated_at"), changed)
        return entry_ids[0] if plan.entries else None


def _marks(columns: Sequence[str]) -> str:
    return ", ".join("?" for _ in columns)


class SqliteWriter(BatchWriter):
    """executemany with prepared statements, the connection set up for bulk work."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        dialect = session.bind.dialect
        self._stamp = ledger_table.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)

    def begin(self) -> None:
        super().begin()
        for pragma in BULK_PRAGMAS:  # cheap; the pool may hand over another connection
            self.db.execute(f"PRAGMA {pragma}")

    def _next_ids(self, table: str, count: int) -> Sequence[int]:
        (last,) = self.cursor.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()
        return range(last + 1, last + 1 + count)


class PostgresWriter(BatchWriter):
    """COPY into every table; a ref or an account taken meanwhile fails the COPY (``Retry``)."""

    placeholder = "%s"
    # Lists go as binary arrays (%b): psycopg writes a text array in Python, quoting each element,
    # about three times as slow (a batch's balances: nine arrays of 5,000).
    values_of = "unnest(%b::text[]) AS value"
    lock = " FOR NO KEY UPDATE"  # as lots.lock_account, and for the same reason

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.sequences: dict[str, str] = {}
        self._column_types: dict[str, dict[str, int]] = {}

    def _list(self, values: list[str]) -> Any:
        return values

    def _next_ids(self, table: str, count: int) -> Sequence[int]:
        if not count:
            return []
        sequence = self.sequences.get(table)
        if sequence is None:
            sequence = self.sequences[table] = self.cursor.execute(
                "SELECT pg_get_serial_sequence(%s, 'id')", (table,)
            ).fetchone()[0]
        rows = self.cursor.execute(
            "SELECT nextval(%s::regclass) FROM generate_series(1, %s)", (sequence, count)
        ).fetchall()
        return sorted(row[0] for row in rows)  # in file order, whatever other sessions took between

    def reserve(self, count: int) -> Reserved:
        """Entry and lot ids for a batch of ``count`` grants, drawn before it is planned (at
        most one entry and one lot per grant; the ids a batch leaves unused are a gap, as a
        sequence leaves after any rollback). A sequence is not transactional: a batch that
        starts again keeps them."""
        return self._next_ids("ledger_entry", count), self._next_ids("point_lot", count)

    def blocked(self, backends: list[int]) -> bool:
        """Whether any of these server processes waits for a lock."""
        if not backends:
            return False
        return bool(
            self.cursor.execute(
                "SELECT coalesce(bool_or(cardinality(pg_blocking_pids(p)) > 0), false) "
                "FROM unnest(%s::int[]) AS p",
                (backends,),
            ).fetchone()[0]
        )

    def backend_pid(self) -> int:
        return self.db.info.backend_pid

    def _insert(self, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> None:
        # Binary COPY: psycopg dumps numbers and times in C without making text of them, and the
        # server does not parse them back (500k lots, making the rows included: the client's CPU
        # 0.5-0.7 s against 2.3-2.4 s with text COPY, the server's 5.1-5.5 s against 5.7-6.2 s).
        # It needs each column's exact type, read once from the catalog.
        types = self._column_types.get(table)
        if types is None:
            rows_of_catalog = self.cursor.execute(
                "SELECT attname, atttypid FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                (table,),
            ).fetchall()
            types = self._column_types[table] = dict(rows_of_catalog)
        with self.cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([types[column] for column in columns])
            write_row = copy.write_row
            for row in rows:
                write_row(row)

    def _insert_new(self, table: str, columns: Sequence[str], rows: list[tuple], key: str) -> int:
        # COPY straight into the table, as a DBA's script would. A key already taken (an account
        # another run created since the batch read its accounts, or a ref recorded before: the
        # batch may not have looked its refs up) fails the COPY at the unique index: 0 rows, the
        # transaction is aborted, and ``write`` starts the batch again as on SQLite.
        import psycopg.errors

        try:
            self._insert(table, columns, rows)
        except psycopg.errors.UniqueViolation:
            return 0
        return len(rows)

    _TYPES = {"id": "bigint", "user_id": "text", "state": "text", "updated_at": "timestamptz"}  # else bigint

    def _update(self, table: str, key: str, columns: Sequence[str], rows: list[tuple]) -> None:
        # One statement over a column of values each (arrays), not a round trip per row.
        names = (*columns, key)
        arrays = ", ".join(f"%b::{self._TYPES.get(name, 'bigint')}[]" for name in names)
        settings = ", ".join(f"{column} = v.{column}" for column in columns)
        self.cursor.execute(
            f"UPDATE {table} AS t SET {settings} FROM unnest({arrays}) AS v({', '.join(names)}) "
            f"WHERE t.{key} = v.{key}",
            [list(values) for values in zip(*rows, strict=True)],
        )


def writer_for(session: Session) -> BatchWriter:
    """The backend's writer, picked once for a run."""
    return PostgresWriter(session) if session.bind.dialect.name == "postgresql" else SqliteWriter(session)
