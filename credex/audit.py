"""``credex audit verify``: prove that points, outbox and warehouse agree, without changing anything.

Every rule is one small SQL query that returns only the rows breaking it (aggregates run in the
database, results are streamed), so memory stays flat however large the ledger grows. A query
names its columns ``id…`` (what the violation is about), ``expected…`` and ``found…``. Only a
database at the newest revision is read, so every table that revision made is there: one dropped
by hand is a violation (``schema.table``), and the checks that read it do not run.

Snapshots: the points database is read in one transaction (Postgres: REPEATABLE READ READ ONLY;
SQLite: one read transaction, whose first read fixes what it sees), the warehouse database in a
second one begun right after the first when it is another database. Points first: a redemption
the points side shows as confirmed had its shipment request committed before, so the warehouse's
later snapshot holds it; a shipment for a redemption newer than the points snapshot is not judged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

STREAM = {"stream_results": True, "yield_per": 2000}
REDEMPTION_CREATED = "redemption.created"
REFUNDED_STATUSES = ("cancelled", "returned")  # the redemption lifecycle: points given back once


class Check(NamedTuple):
    name: str
    sql: str
    needs: tuple[str, ...] = ()  # tables it reads that a later revision than the first made
    sqlite: str | None = None  # the query on SQLite, where it must differ

    def query(self, dialect: str) -> str:
        return self.sqlite if dialect == "sqlite" and self.sqlite else self.sql


@dataclass(frozen=True)
class Violation:
    check: str
    ids: list
    expected: Any
    found: Any

    def to_json(self) -> dict:
        return {"check": self.check, "ids": self.ids, "expected": self.expected, "found": self.found}


_SUM = "CAST(coalesce(sum({0}), 0) AS BIGINT)"  # Postgres sums BIGINT as NUMERIC
_IN_STATE = "CASE WHEN state = '{0}' THEN remaining ELSE 0 END"
_REDEMPTION_REF = "CAST(r.id AS VARCHAR(32))"  # a redemption's ledger entries carry its id as ref
_LOTS = (
    f"SELECT user_id, {_SUM.format(_IN_STATE.format('available'))} AS available, "
    f"{_SUM.format(_IN_STATE.format('pending'))} AS pending FROM point_lot GROUP BY user_id"
)
_LAST_SET = "SELECT sku, max(id) AS id FROM stock_movement WHERE kind = 'set' GROUP BY sku"
_REDEMPTION_KINDS = "('redemption', 'redemption_refund')"  # the ledger entries a redemption writes


def _without_redemption(name: str, query: str, *, ref: str, needs: tuple[str, ...] = ()) -> Check:
    """A check for rows whose ``ref`` column names a redemption that does not exist; ``query``
    holds ``{missing}`` where that condition goes. On SQLite the redemption is found by its rowid:
    a comparison of text with the id made text would read every redemption for every row."""
    anywhere = f"NOT EXISTS (SELECT 1 FROM redemption r WHERE {_REDEMPTION_REF} = {ref})"
    on_sqlite = (
        f"NOT EXISTS (SELECT 1 FROM redemption r WHERE r.id = CAST({ref} AS INTEGER) "
        f"AND {_REDEMPTION_REF} = {ref})"
    )
    return Check(name, query.format(missing=anywhere), needs, sqlite=query.format(missing=on_sqlite))


POINTS_CHECKS: tuple[Check, ...] = (
    Check(
        "ledger.append_only",  # the triggers of migration 0008 are there, and on
        "SELECT 'ledger_entry' AS id, 'UPDATE and DELETE refused' AS expected, "
        "'no enabled append-only trigger' AS found WHERE NOT EXISTS (SELECT 1 FROM pg_trigger "
        "WHERE tgrelid = CAST('ledger_entry' AS regclass) AND tgname = 'ledger_entry_append_only' "
        "AND tgenabled <> 'D')",
        sqlite="SELECT 'ledger_entry' AS id, 'UPDATE and DELETE refused' AS expected, "
        "'no append-only trigger' AS found WHERE (SELECT count(*) FROM sqlite_master WHERE type = 'trigger' "
        "AND name IN ('ledger_entry_no_update', 'ledger_entry_no_delete')) < 2",
    ),
    Check(
        "account.kept",  # an account with entries or lots cannot be deleted or renamed: on
        # Postgres the trigger of migration 0016, enabled; on SQLite the two foreign keys
        "SELECT 'account' AS id, 'DELETE or new key refused while entries or lots name it' AS expected, "
        "'no enabled account_in_use trigger' AS found WHERE NOT EXISTS (SELECT 1 FROM pg_trigger "
        "WHERE tgrelid = CAST('account' AS regclass) AND tgname = 'account_in_use' AND tgenabled <> 'D')",
        sqlite="SELECT 'account' AS id, "
        "'DELETE or new key refused while entries or lots name it' AS expected, "
        "'no foreign key to account from ledger_entry and point_lot' AS found WHERE "
        "(SELECT count(*) FROM pragma_foreign_key_list('ledger_entry') WHERE \"table\" = 'account') "
        "+ (SELECT count(*) FROM pragma_foreign_key_list('point_lot') WHERE \"table\" = 'account') < 2",
    ),
    Check(
        "account.nonnegative",
        "SELECT user_id AS id, 0 AS expected_at_least, balance AS found_balance, pending AS found_pending, "
        "debt AS found_debt FROM account WHERE balance < 0 OR pending < 0 OR debt < 0 ORDER BY user_id",
    ),
    Check(
        "account.ledger",  # balance, pending points and debt are each the sum of the ledger's column
        # From the ledger's side too: entries whose account is gone are a balance nobody holds
        # (found: null).
        "SELECT l.user_id AS id, l.points AS expected_balance, l.pending AS expected_pending, "
        "l.debt AS expected_debt, a.balance AS found_balance, a.pending AS found_pending, "
        "a.debt AS found_debt FROM ("
        f"SELECT user_id, {_SUM.format('points')} AS points, {_SUM.format('pending')} AS pending, "
        f"{_SUM.format('debt')} AS debt FROM ledger_entry GROUP BY user_id"
        ") l LEFT JOIN account a ON a.user_id = l.user_id "
        "WHERE a.user_id IS NULL OR a.balance <> l.points OR a.pending <> l.pending OR a.debt <> l.debt "
        "UNION ALL "
        "SELECT a.user_id, 0, 0, 0, a.balance, a.pending, a.debt FROM account a "
        "WHERE (a.balance <> 0 OR a.pending <> 0 OR a.debt <> 0) "
        "AND NOT EXISTS (SELECT 1 FROM ledger_entry e WHERE e.user_id = a.user_id) ORDER BY 1",
    ),
    Check(
        "ledger.running_balance",  # each entry's balance-after: the one before it plus its points
        # ``balance`` is the spendable balance after the entry, and ``points`` the entry's effect
        # on it for every kind (pending points and debt have columns of their own: a pending
        # award's points are 0, a credit's points are what is left once the debt is paid). Every
        # writer locks the account row before it takes an entry id, so a user's entries in id
        # order are the order the balance changed in: the rule is exact, first entry from 0.
        "SELECT user_id AS id, id AS id_entry, expected, found FROM ("
        "SELECT user_id, id, coalesce(lag(balance) OVER (PARTITION BY user_id ORDER BY id), 0) + points "
        "AS expected, balance AS found FROM ledger_entry"
        ") e WHERE expected <> found ORDER BY 1, 2",
    ),
    Check(
        "account.lots",  # the available lots hold the balance, the pending lots the pending points
        "SELECT a.user_id AS id, coalesce(l.available, 0) AS expected_balance, "
        "coalesce(l.pending, 0) AS expected_pending, a.balance AS found_balance, a.pending AS found_pending "
        "FROM account a LEFT JOIN ("
        f"{_LOTS}"
        ") l ON l.user_id = a.user_id "
        "WHERE a.balance <> coalesce(l.available, 0) OR a.pending <> coalesce(l.pending, 0) "
        "UNION ALL "  # lots whose account is gone (found: null)
        f"SELECT l.user_id, l.available, l.pending, NULL, NULL FROM ({_LOTS}) l "
        "WHERE NOT EXISTS (SELECT 1 FROM account a WHERE a.user_id = l.user_id) ORDER BY 1",
    ),
    Check(
        "lot.remaining",
        "SELECT id AS id, points AS expected_at_most, remaining AS found "
        "FROM point_lot WHERE remaining < 0 OR remaining > points ORDER BY id",
    ),
    Check(
        "lot.uses",  # what left a lot is what its uses record
        "SELECT p.id AS id, p.points - p.remaining AS expected, coalesce(u.used, 0) AS found "
        f"FROM point_lot p LEFT JOIN (SELECT lot_id, {_SUM.format('points')} AS used FROM lot_use "
        "GROUP BY lot_id) u ON u.lot_id = p.id "
        "WHERE p.points - p.remaining <> coalesce(u.used, 0) ORDER BY 1",
    ),
    Check(
        "catalog.stock_nonnegative",
        "SELECT sku AS id, 0 AS expected_at_least, stock AS found FROM catalog_item "
        "WHERE stock < 0 ORDER BY sku",
    ),
    Check(
        "redemption.ledger",  # its one ledger entry took its points from its shopper
        "SELECT r.id AS id, r.user_id AS expected_user, -r.points AS expected_points, "
        "e.user_id AS found_user, e.points AS found_points FROM redemption r "
        f"LEFT JOIN ledger_entry e ON e.kind = 'redemption' AND e.ref = {_REDEMPTION_REF} "
        "WHERE e.id IS NULL OR e.points <> -r.points OR e.user_id <> r.user_id ORDER BY r.id",
    ),
    _without_redemption(
        "ledger.unknown_redemption",  # a redemption's entry (or its refund's) with no redemption behind it
        "SELECT e.id AS id, e.kind AS id_kind, e.ref AS id_ref, 'its redemption' AS expected, NULL AS found "
        f"FROM ledger_entry e WHERE e.kind IN {_REDEMPTION_KINDS} AND {{missing}} ORDER BY e.id",
        ref="e.ref",
    ),
    Check(
        "redemption.message",  # its one redemption.created message, written with it
        # `relay purge` deletes confirmed messages: only a redemption whose create may have been
        # confirmed (a waybill, or cancelled by the warehouse's answer) may lack its own.
        "SELECT r.id AS id, 1 AS expected, coalesce(m.n, 0) AS found FROM redemption r LEFT JOIN ("
        "SELECT redemption_id, count(*) AS n FROM outbox_message "
        f"WHERE routing_key = '{REDEMPTION_CREATED}' GROUP BY redemption_id"
        ") m ON m.redemption_id = r.id "
        "WHERE m.n > 1 OR (m.n IS NULL AND r.express_no IS NULL AND r.status <> 'cancelled') ORDER BY r.id",
    ),
    Check(
        "redemption.message_id",
        "SELECT r.id AS id, m.id AS id_message, r.message_id AS expected, m.id AS found "
        "FROM redemption r JOIN outbox_message m ON m.redemption_id = r.id "
        f"AND m.routing_key = '{REDEMPTION_CREATED}' WHERE m.id <> r.message_id ORDER BY r.id",
    ),
    Check(
        "redemption.waybill",  # shipping means the warehouse confirmed a waybill
        "SELECT id AS id, 'an express number' AS expected, NULL AS found FROM redemption "
        "WHERE status = 'shipping' AND express_no IS NULL ORDER BY id",
    ),
    Check(
        "redemption.refund_once",  # a cancelled or returned redemption gets its points back, once
        "SELECT r.id AS id, "
        f"CASE WHEN r.status IN {REFUNDED_STATUSES!r} THEN 1 ELSE 0 END AS expected_refunds, "
        f"CASE WHEN r.status IN {REFUNDED_STATUSES!r} THEN r.points ELSE 0 END AS expected_points, "
        "r.status AS found_status, coalesce(f.n, 0) AS found_refunds, coalesce(f.points, 0) AS found_points "
        "FROM redemption r "
        "LEFT JOIN (SELECT ref, count(*) AS n, "
        f"{_SUM.format('points + pending - debt')} AS points FROM ledger_entry "
        "WHERE kind = 'redemption_refund' GROUP BY ref"
        f") f ON f.ref = {_REDEMPTION_REF} "
        f"WHERE (r.status IN {REFUNDED_STATUSES!r} AND (f.n IS NULL OR f.n <> 1 OR f.points <> r.points)) "
        f"OR (r.status NOT IN {REFUNDED_STATUSES!r} AND f.n IS NOT NULL) ORDER BY r.id",
    ),
    Check(
        "stock.movements",  # the last stock `catalog add/update` set, then what redemptions took
        # since and cancels and returns gave back. A set to unlimited (stock_after null) leaves
        # the gift unlimited, and so does never setting one (expected: null).
        "SELECT c.sku AS id, s.stock_after + coalesce(m.total, 0) AS expected, c.stock AS found "
        f"FROM catalog_item c LEFT JOIN ({_LAST_SET}) l ON l.sku = c.sku "
        "LEFT JOIN stock_movement s ON s.id = l.id "
        f"LEFT JOIN (SELECT m.sku, {_SUM.format('m.delta')} AS total FROM stock_movement m "
        f"JOIN ({_LAST_SET}) l ON l.sku = m.sku AND m.id > l.id GROUP BY m.sku) m ON m.sku = c.sku "
        "WHERE (s.stock_after IS NULL AND c.stock IS NOT NULL) OR (s.stock_after IS NOT NULL "
        "AND (c.stock IS NULL OR c.stock <> s.stock_after + coalesce(m.total, 0))) ORDER BY c.sku",
        needs=("stock_movement",),
    ),
    _without_redemption(
        "stock.unknown_redemption",  # stock taken or given back for a redemption that does not exist
        "SELECT m.id AS id, m.kind AS id_kind, m.ref AS id_ref, 'its redemption' AS expected, NULL AS found "
        "FROM stock_movement m WHERE m.kind <> 'set' AND (m.ref IS NULL OR {missing}) ORDER BY m.id",
        ref="m.ref",
        needs=("stock_movement",),
    ),
)

WAREHOUSE_CHECKS: tuple[Check, ...] = (
    Check(
        "waybill.once",  # an express number belongs to one shipment
        "SELECT carrier AS id, express_no AS id_express_no, 1 AS expected, count(*) AS found "
        "FROM shipment_request WHERE express_no IS NOT NULL GROUP BY carrier, express_no "
        "HAVING count(*) > 1 ORDER BY 1, 2",
    ),
)

COUNTED = {
    "accounts": "account",
    "ledger_entries": "ledger_entry",
    "lots": "point_lot",
    "catalog_items": "catalog_item",
    "redemptions": "redemption",
    "outbox_messages": "outbox_message",
}

# The cross-database comparison: both sides sorted by redemption id, read in step.
_REDEMPTIONS = "SELECT id, express_no FROM redemption ORDER BY id"
_SHIPMENTS = (
    "SELECT redemption_id, count(*) AS n, min(id) AS first_id, min(express_no) AS low, "
    "max(express_no) AS high FROM shipment_request WHERE type = 2 "
    "GROUP BY redemption_id ORDER BY redemption_id"
)


@dataclass
class Audit:
    """One run of the checks. ``violations()`` streams them; ``checked`` is complete once it
    is exhausted."""

    points_url: str
    warehouse_url: str | None = None
    checked: dict[str, int] = field(default_factory=dict)
    _ran: int = 0  # checks run so far

    def violations(self) -> Iterator[Violation]:
        self.checked.clear()
        self._ran = 0
        with ExitStack() as stack:
            points = stack.enter_context(snapshot(self.points_url))
            newest = points.execute(text("SELECT coalesce(max(id), 0) FROM redemption")).scalar()
            warehouse = points
            if self.warehouse_url and self.warehouse_url != self.points_url:
                warehouse = stack.enter_context(snapshot(self.warehouse_url))
            for name, table in COUNTED.items():
                self.checked[name] = _count(points, table)
            self.checked["shipment_requests"] = _count(warehouse, "shipment_request")
            yield from self._run(points, POINTS_CHECKS)
            yield from self._run(warehouse, WAREHOUSE_CHECKS)
            yield from compare_shipments(
                points.execute(text(_REDEMPTIONS), execution_options=STREAM),
                warehouse.execute(text(_SHIPMENTS), execution_options=STREAM),
                newest=newest,
                counts=self.checked,
            )
            self.checked["checks"] = self._ran + 1

    def _run(self, connection: Connection, checks: tuple[Check, ...]) -> Iterator[Violation]:
        from credex.db import HEAD_REVISION

        missing: dict[str, bool] = {}  # table -> missing, each looked up (and reported) once
        for check in checks:
            for table in check.needs:
                if table not in missing:
                    missing[table] = not inspect(connection).has_table(table)
                    if missing[table]:
                        yield Violation(
                            "schema.table", [table], f"present at revision {HEAD_REVISION}", "missing"
                        )
            if any(missing[table] for table in check.needs):
                continue
            self._ran += 1
            sql = check.query(connection.dialect.name)
            for row in connection.execute(text(sql), execution_options=STREAM):
                yield violation(check.name, row._mapping)


def violation(check: str, row) -> Violation:
    """A violation from a row whose columns are named ``id…``, ``expected…`` and ``found…``."""
    ids: list = []
    parts: dict[str, dict[str, Any]] = {"expected": {}, "found": {}}
    for key, value in row.items():
        if key.startswith("id"):
            ids.append(value)
            continue
        side, _, name = key.partition("_")
        parts[side][name] = value
    expected, found = (side[""] if list(side) == [""] else side for side in parts.values())
    return Violation(check, ids, expected, found)


def compare_shipments(
    redemptions: Iterator, shipments: Iterator, *, newest: int, counts: dict[str, int]
) -> Iterator[Violation]:
    """Each confirmed redemption (one with an express number) has exactly one shipment request
    with that number; no redemption has two; no shipment is for a redemption the points side
    does not know. Both inputs sorted by redemption id; read in step, one row of each in hand."""
    r = next(redemptions, None)
    s = next(shipments, None)
    counts["redemptions_with_shipments"] = 0
    while r is not None or s is not None:
        if s is None or (r is not None and r.id < s.redemption_id):
            if r.express_no is not None:
                yield Violation("shipment.confirmed", [r.id], 1, 0)
            r = next(redemptions, None)
        elif r is None or s.redemption_id < r.id:
            if s.redemption_id <= newest:  # newer ones came after the points snapshot
                yield Violation("shipment.unknown_redemption", [s.redemption_id, s.first_id], 0, s.n)
            s = next(shipments, None)
        else:
            counts["redemptions_with_shipments"] += 1
            if s.n != 1:
                yield Violation("shipment.once", [r.id], 1, s.n)
            if r.express_no is not None and not (s.low == s.high == r.express_no):
                found = s.low if s.low == s.high else [s.low, s.high]
                yield Violation("shipment.express_no", [r.id, s.first_id], r.express_no, found)
            r, s = next(redemptions, None), next(shipments, None)


def _count(connection: Connection, table: str) -> int:
    return connection.execute(text(f"SELECT count(*) FROM {table}")).scalar()


@contextmanager
def snapshot(url: str) -> Iterator[Connection]:
    """A read-only transaction on ``url``'s current schema, never migrating it (an auditor may
    not write); its first statement fixes what every later one sees."""
    from credex.db import HEAD_REVISION
    from credex.db.engine import (
        get_engine,
        is_connection_error,
        not_migrated,
        refuse_unknown_revision,
        schema_revision,
        unavailable,
    )
    from credex.db.urls import display_url, read_only_url, sqlite_file
    from credex.errors import NotMigrated

    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise NotMigrated(f"no credex database at {display_url(url)}")
    # A SQLite file is opened read-only: not even its journal mode changes.
    engine = get_engine(read_only_url(url))
    try:
        revision = schema_revision(engine)
        if revision != HEAD_REVISION:  # refused as every other command refuses it, never migrated
            refuse_unknown_revision(url, revision)
            raise not_migrated(url, revision)
        with engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            # The snapshot starts with the first read of a table (on SQLite, BEGIN alone takes none).
            connection.exec_driver_sql("SELECT count(*) FROM alembic_version")
            try:
                yield connection
            finally:
                connection.rollback()
    except DBAPIError as error:
        if is_connection_error(error):
            raise unavailable(url, error) from None
        raise
