"""Bulk grants: many ``award grant`` rows from a file, applied in batches with the driver's bulk
paths, ending exactly as if each row had been granted one by one in file order.

Each batch is one transaction: read and check the rows first (no lock held), then lock the
accounts the batch touches (sorted user ids; on SQLite the write session's BEGIN IMMEDIATE),
read their balances, debt and lots and the refs already used, work out every row's outcome in
memory in file order (duplicate, rejected, or the entry, lot and lot uses it writes), write it
all with executemany (SQLite) or COPY and set-based statements (Postgres), and commit. A run
killed half way has committed whole batches only: their rows are duplicates next time, and the
corrections it refused are judged again where they stand in the file (``Replay``).
"""

from __future__ import annotations

import bisect
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlmodel import Session

from credex.db.models import EntryKind, LotState, lot_state_is, utcnow
from credex.errors import CredexError, Unavailable
from credex.points.bulk_files import Grant, Rejected, UnreadableFile
from credex.points.lifecycle import ledger_table, lot_table
from credex.points.rules import INT64_MAX

BATCH_SIZE = 5000
DEFAULT_REASON = "bulk grant"
RETRIES = 5  # a batch that met a concurrent award of the same ref or account starts again

_GRANT = EntryKind.grant.value
_AVAILABLE = LotState.available.value
_USED = LotState.used.value


@dataclass
class BulkReport:
    """What a run did (or, dry, would do). ``points_awarded`` sums the applied rows' points."""

    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    points_awarded: int = 0
    rows: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


class _Retry(Exception):
    """Another transaction used one of the batch's refs or created one of its accounts first."""


# --- working out a batch --------------------------------------------------------------------------


@dataclass
class _Plan:
    """A batch's writes, in file order. Entries and new lots are numbered from 0 in the order
    they are written; their ids are given once the batch knows how many it needs."""

    entries: list  # [user_id, ref, points, debt, balance, detail, reason]
    lots: list  # [entry number, user_id, points, remaining]
    new_lot_uses: list  # (lot number, entry number, points)
    old_lot_uses: list  # (lot id, entry number, points)
    old_lots: dict  # lot id -> what remains of it
    accounts: dict  # user id -> [balance, debt, earned] after the batch, for every changed account
    created: list  # user ids of the accounts the batch creates, sorted


class _Lot:
    """An available lot in an account's spending order: (available_at, id)."""

    __slots__ = ("available_at", "id", "number", "remaining")

    def __init__(self, available_at: datetime, id: int, number: int | None, remaining: int) -> None:
        self.available_at, self.id, self.number, self.remaining = available_at, id, number, remaining

    def __lt__(self, other: _Lot) -> bool:
        return (self.available_at, self.id) < (other.available_at, other.id)


class Replay:
    """Where an earlier run of the same file left off, so that a correction is judged on the
    balance at its place in the file, as a single run would have judged it.

    A run applies rows in file order with ever larger entry ids, so the rows an earlier (killed,
    or complete) run applied are duplicates now, and their entries mark how far it got: the
    largest such id before a row (``seen``) bounds the entries that came before that row. When a
    user's balance has grown since (the earlier run went on to later rows), the growth does not
    count for a correction that run refused; it is refused again. Entries this run writes
    (ids from ``own_from``) are never marks. Holds a few numbers, whatever the file's size."""

    def __init__(self, balances_before: Callable[[list[str], int], dict[str, int]]) -> None:
        self.balances_before = balances_before  # user -> balance after their last entry with id < bound
        self.seen = 0  # the largest id of an earlier run's entry met so far in file order
        self.own_from: int | None = None  # the first entry id this run wrote
        self.settled: dict[str, int] = {}  # per batch: the balance before this run's entries
        self._cache: dict[tuple[str, int], int] = {}

    def start_batch(self, committed: dict[str, int], takers: list[str]) -> None:
        """``committed``: the batch's balances in the database (before this batch)."""
        self._cache.clear()
        if self.own_from is None:
            self.settled = committed
        else:
            self.settled = self.balances_before(takers, self.own_from) if takers else {}
        if self.seen and takers:
            bound = self.seen + 1
            for user, balance in self.balances_before(takers, bound).items():
                self._cache[user, bound] = balance

    def is_mark(self, entry_id: int | None) -> bool:
        return entry_id is not None and (self.own_from is None or entry_id < self.own_from)

    def growth(self, user: str, bound: int) -> int:
        """How much ``user``'s balance grew between the mark ``bound`` and this run."""
        before = self._cache.get((user, bound))
        if before is None:
            before = self._cache[user, bound] = self.balances_before([user], bound).get(user, 0)
        return self.settled.get(user, 0) - before


def plan_batch(
    batch: list[Grant | Rejected],
    *,
    accounts: dict[str, list[int]],
    used_refs: dict[str, tuple[str, str, int | None]],
    lots: dict[str, list[_Lot]] | None,
    report: BulkReport,
    on_rejected: Callable[[Rejected], None],
    now: datetime,
    replay: Replay | None = None,
) -> _Plan:
    """Every row's outcome in file order, as ``award grant`` one by one would have it.

    ``accounts``: [balance, debt, earned] of the batch's existing accounts (locked);
    ``used_refs``: ref -> (user id, detail, entry id) of the grants already recorded with the
    batch's refs; ``lots``: the available lots, oldest first, of the accounts the batch takes
    points from (None: a dry run, which writes no lots); ``replay``: where earlier runs of the
    file left off (None: judge corrections on the balance alone)."""
    plan = _Plan([], [], [], [], {}, {}, [])
    entries, new_lots, changed = plan.entries, plan.lots, plan.accounts
    first_lot_id = 1 << 62  # new lots come after every existing one with the same available_at
    first_mark: list[int | None] = []  # worked out when a correction first needs it

    def mark_ahead() -> int | None:
        # A correction before the run's first mark: the earlier run had applied nothing before
        # it, so its balance then is the one before the batch's earliest mark.
        if not first_mark:
            marks = [
                prior[2]
                for row in batch
                if row.__class__ is Grant
                and (prior := used_refs.get(row.ref)) is not None
                and prior[0] == row.user_id
                and prior[1] == f"points={row.points}"
                and replay.is_mark(prior[2])
            ]
            first_mark.append(min(marks, default=None))
        return first_mark[0]

    for row in batch:
        if row.__class__ is Rejected:
            report.rejected += 1
            on_rejected(row)
            continue
        user, points, ref = row.user_id, row.points, row.ref
        detail = f"points={points}"
        prior = used_refs.get(ref)
        if prior is not None:
            if prior[0] == user and prior[1] == detail:
                report.duplicates += 1
                if replay is not None and replay.is_mark(prior[2]) and prior[2] > replay.seen:
                    replay.seen = prior[2]
            else:
                report.rejected += 1
                on_rejected(
                    Rejected(
                        row.line,
                        f"ref {ref} was already used for {prior[0]} ({prior[1]}) with other content",
                        row.original,
                    )
                )
            continue
        account = changed.get(user) or accounts.get(user)
        balance, debt, earned = account if account is not None else (0, 0, 0)
        if points > 0:
            paid = debt if debt < points else points
            to_balance = points - paid
            if balance + to_balance > INT64_MAX or earned + points > INT64_MAX:
                report.rejected += 1
                on_rejected(
                    Rejected(row.line, f"{user}'s balance would exceed {INT64_MAX} points", row.original)
                )
                continue
            balance += to_balance
            entry = len(entries)
            entries.append((user, ref, to_balance, -paid, balance, detail, row.reason))
            number = len(new_lots)
            remaining = points - paid
            new_lots.append([entry, user, points, remaining])
            if paid:
                plan.new_lot_uses.append((number, entry, paid))
            if lots is not None and remaining and user in lots:
                queue = lots[user]
                lot = _Lot(now, first_lot_id + number, number, remaining)
                if not queue or not lot < queue[-1]:
                    queue.append(lot)
                else:  # a lot dated after now (a clock ahead of ours): keep the spending order
                    bisect.insort(queue, lot)
            changed[user] = [balance, debt - paid, earned + points]
        else:
            judged = balance
            if replay is not None:
                bound = replay.seen + 1 if replay.seen else mark_ahead()
                if bound is not None:
                    grown = replay.growth(user, bound)
                    if grown > 0:
                        judged = balance - grown
            if judged < -points:
                report.rejected += 1
                on_rejected(
                    Rejected(
                        row.line,
                        f"{user} has {judged} points; taking {-points} would go below zero",
                        row.original,
                    )
                )
                continue
            balance += points
            entry = len(entries)
            entries.append((user, ref, points, 0, balance, detail, row.reason))
            if lots is not None:
                _take_oldest(plan, lots[user], -points, entry, user)
            changed[user] = [balance, debt, earned + points]
        if account is None:  # the account is created by its first award
            plan.created.append(user)
        used_refs[ref] = (user, detail, None)
        report.applied += 1
        report.points_awarded += points
    plan.created.sort()
    return plan


def _take_oldest(plan: _Plan, queue: list[_Lot], points: int, entry: int, user: str) -> None:
    """Take ``points`` from the account's lots, oldest first, recording each use."""
    left = points
    while left:
        if not queue:  # the balance said the points were there: a broken invariant, never a user error
            raise RuntimeError(f"{user}'s lots hold {points - left} points, {points} were taken")
        lot = queue[0]
        take = lot.remaining if lot.remaining < left else left
        lot.remaining -= take
        left -= take
        if lot.number is None:
            plan.old_lot_uses.append((lot.id, entry, take))
            plan.old_lots[lot.id] = lot.remaining
        else:
            plan.new_lot_uses.append((lot.number, entry, take))
            plan.lots[lot.number][3] = lot.remaining
        if not lot.remaining:
            queue.pop(0)


# --- the databases ---------------------------------------------------------------------------------


def _lots_of(session: Session, users: list[str]) -> dict[str, list[_Lot]]:
    """The available lots of ``users`` in spending order (read after their accounts are locked)."""
    lot = lot_table.c
    queues: dict[str, list[_Lot]] = {user: [] for user in users}
    rows = session.execute(
        select(lot.user_id, lot.id, lot.remaining, lot.available_at)
        .where(lot.user_id.in_(users), lot_state_is(_AVAILABLE))
        .order_by(lot.user_id, lot.available_at, lot.id)
    )
    for row in rows:
        queues[row.user_id].append(_Lot(row.available_at, row.id, None, row.remaining))
    return queues


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


class _Sqlite:
    """executemany with prepared statements, in the write session's BEGIN IMMEDIATE transaction:
    no other writer can run meanwhile, so ids are the next ones and nothing can race."""

    def __init__(self, session: Session) -> None:
        self.session = session
        dialect = session.bind.dialect
        self.stamp = ledger_table.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)

    def begin(self) -> None:
        self.db = self.session.connection().connection.driver_connection
        for pragma in BULK_PRAGMAS:  # cheap; the pool may hand over another connection
            self.db.execute(f"PRAGMA {pragma}")

    def accounts(self, users: list[str], *, lock: bool) -> dict[str, list[int]]:
        rows = self.db.execute(
            "SELECT user_id, balance, debt, earned FROM account "
            "WHERE user_id IN (SELECT value FROM json_each(?))",
            (json.dumps(users),),
        )
        return {user: [balance, debt, earned] for user, balance, debt, earned in rows}

    def used_refs(self, refs: list[str]) -> dict[str, tuple[str, str, int]]:
        rows = self.db.execute(
            "SELECT ref, user_id, detail, id FROM ledger_entry "
            "WHERE kind = 'grant' AND ref IN (SELECT value FROM json_each(?))",
            (json.dumps(refs),),
        )
        return {ref: (user, detail, id) for ref, user, detail, id in rows}

    def balances_before(self, users: list[str], bound: int) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT value, (SELECT balance FROM ledger_entry WHERE user_id = value AND id < ? "
            "ORDER BY id DESC LIMIT 1) FROM json_each(?)",
            (bound, json.dumps(users)),
        )
        return {user: balance or 0 for user, balance in rows}

    def _next_ids(self, table: str, count: int) -> range:
        (last,) = self.db.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()
        return range(last + 1, last + 1 + count)

    def write(self, plan: _Plan, *, now: datetime, operator: str, expires_at: datetime | None) -> int | None:
        """Write the plan; the first entry id it used (None: no entry)."""
        db, stamp = self.db, self.stamp(now)
        expiry = self.stamp(expires_at) if expires_at is not None else None
        entry_ids = self._next_ids("ledger_entry", len(plan.entries))
        lot_ids = self._next_ids("point_lot", len(plan.lots))
        accounts = plan.accounts
        db.executemany(
            "INSERT INTO account (user_id, balance, earned, redeemed, pending, debt, created_at, updated_at) "
            "VALUES (?, ?, ?, 0, 0, ?, ?, ?)",
            [(u, accounts[u][0], accounts[u][2], accounts[u][1], stamp, stamp) for u in plan.created],
        )
        db.executemany(
            "INSERT INTO ledger_entry (id, user_id, kind, ref, points, pending, debt, balance, detail, "
            "operator, reason, created_at) VALUES (?, ?, 'grant', ?, ?, 0, ?, ?, ?, ?, ?, ?)",
            [
                (
                    entry_ids[n],
                    user,
                    ref,
                    points,
                    debt,
                    balance,
                    detail,
                    operator,
                    reason or DEFAULT_REASON,
                    stamp,
                )
                for n, (user, ref, points, debt, balance, detail, reason) in enumerate(plan.entries)
            ],
        )
        db.executemany(
            "INSERT INTO point_lot (id, user_id, entry_id, points, remaining, state, available_at, "
            "expires_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    lot_ids[n],
                    user,
                    entry_ids[entry],
                    points,
                    left,
                    _AVAILABLE if left else _USED,
                    stamp,
                    expiry,
                    stamp,
                )
                for n, (entry, user, points, left) in enumerate(plan.lots)
            ],
        )
        uses = [(lot_ids[lot], entry_ids[entry], points) for lot, entry, points in plan.new_lot_uses]
        uses += [(lot, entry_ids[entry], points) for lot, entry, points in plan.old_lot_uses]
        db.executemany("INSERT INTO lot_use (lot_id, entry_id, points) VALUES (?, ?, ?)", uses)
        db.executemany(
            "UPDATE point_lot SET remaining = ?, state = ? WHERE id = ?",
            [(left, _AVAILABLE if left else _USED, lot) for lot, left in plan.old_lots.items()],
        )
        created = set(plan.created)
        db.executemany(
            "UPDATE account SET balance = ?, debt = ?, earned = ?, updated_at = ? WHERE user_id = ?",
            [(b, d, e, stamp, u) for u, (b, d, e) in accounts.items() if u not in created],
        )
        return entry_ids[0] if entry_ids else None


class _Postgres:
    """COPY into a staging table merged with ON CONFLICT, COPY for lots and their uses, and one
    statement over arrays for each kind of update. The accounts are locked in user id order."""

    _LEDGER_COLUMNS = (
        "id, user_id, kind, ref, points, pending, debt, balance, detail, operator, reason, created_at"
    )

    def __init__(self, session: Session) -> None:
        self.session = session
        self.sequences: dict[str, str] = {}

    def begin(self) -> None:
        self.db = self.session.connection().connection.driver_connection
        self.cursor = self.db.cursor()

    def accounts(self, users: list[str], *, lock: bool) -> dict[str, list[int]]:
        rows = self.cursor.execute(
            "SELECT user_id, balance, debt, earned FROM account WHERE user_id = ANY(%s) ORDER BY user_id"
            + (" FOR UPDATE" if lock else ""),
            (users,),
        ).fetchall()
        return {user: [balance, debt, earned] for user, balance, debt, earned in rows}

    def used_refs(self, refs: list[str]) -> dict[str, tuple[str, str, int]]:
        rows = self.cursor.execute(
            "SELECT ref, user_id, detail, id FROM ledger_entry WHERE kind = 'grant' AND ref = ANY(%s)",
            (refs,),
        ).fetchall()
        return {ref: (user, detail, id) for ref, user, detail, id in rows}

    def balances_before(self, users: list[str], bound: int) -> dict[str, int]:
        rows = self.cursor.execute(
            "SELECT u, (SELECT balance FROM ledger_entry WHERE user_id = u AND id < %s "
            "ORDER BY id DESC LIMIT 1) FROM unnest(%s::text[]) AS u",
            (bound, users),
        ).fetchall()
        return {user: balance or 0 for user, balance in rows}

    def _next_ids(self, table: str, count: int) -> list[int]:
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

    def write(self, plan: _Plan, *, now: datetime, operator: str, expires_at: datetime | None) -> int | None:
        """Write the plan; the first entry id it used (None: no entry)."""
        cursor, accounts = self.cursor, plan.accounts
        entry_ids = self._next_ids("ledger_entry", len(plan.entries))
        lot_ids = self._next_ids("point_lot", len(plan.lots))
        if plan.created:
            columns = list(zip(*((u, *accounts[u]) for u in plan.created), strict=True))
            cursor.execute(
                "INSERT INTO account (user_id, balance, debt, earned, redeemed, pending, created_at, "
                "updated_at) SELECT u, b, d, e, 0, 0, %s, %s "
                "FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[]) AS t(u, b, d, e) "
                "ORDER BY u ON CONFLICT (user_id) DO NOTHING",
                (now, now, *map(list, columns)),
            )
            if cursor.rowcount != len(plan.created):
                raise _Retry("an account was created meanwhile")
        cursor.execute(
            "CREATE TEMP TABLE IF NOT EXISTS bulk_ledger_entry (LIKE ledger_entry) ON COMMIT DELETE ROWS"
        )
        with cursor.copy(f"COPY bulk_ledger_entry ({self._LEDGER_COLUMNS}) FROM STDIN") as copy:
            write_row = copy.write_row
            for n, (user, ref, points, debt, balance, detail, reason) in enumerate(plan.entries):
                write_row(
                    (
                        entry_ids[n],
                        user,
                        _GRANT,
                        ref,
                        points,
                        0,
                        debt,
                        balance,
                        detail,
                        operator,
                        reason or DEFAULT_REASON,
                        now,
                    )
                )
        cursor.execute(
            f"INSERT INTO ledger_entry ({self._LEDGER_COLUMNS}) SELECT {self._LEDGER_COLUMNS} "
            "FROM bulk_ledger_entry ON CONFLICT (kind, ref) DO NOTHING"
        )
        if cursor.rowcount != len(plan.entries):
            raise _Retry("a ref was used meanwhile")
        with cursor.copy(
            "COPY point_lot (id, user_id, entry_id, points, remaining, state, available_at, expires_at, "
            "created_at) FROM STDIN"
        ) as copy:
            write_row = copy.write_row
            for n, (entry, user, points, left) in enumerate(plan.lots):
                write_row(
                    (
                        lot_ids[n],
                        user,
                        entry_ids[entry],
                        points,
                        left,
                        _AVAILABLE if left else _USED,
                        now,
                        expires_at,
                        now,
                    )
                )
        if plan.new_lot_uses or plan.old_lot_uses:
            with cursor.copy("COPY lot_use (lot_id, entry_id, points) FROM STDIN") as copy:
                for lot, entry, points in plan.new_lot_uses:
                    copy.write_row((lot_ids[lot], entry_ids[entry], points))
                for lot, entry, points in plan.old_lot_uses:
                    copy.write_row((lot, entry_ids[entry], points))
        if plan.old_lots:
            ids, left = list(plan.old_lots), list(plan.old_lots.values())
            cursor.execute(
                "UPDATE point_lot p SET remaining = t.r, state = CASE WHEN t.r = 0 THEN %s ELSE p.state END "
                "FROM unnest(%s::bigint[], %s::bigint[]) AS t(id, r) WHERE p.id = t.id",
                (_USED, ids, left),
            )
        created = set(plan.created)
        existing = [(u, *v) for u, v in accounts.items() if u not in created]
        if existing:
            users, balances, debts, earned = (list(c) for c in zip(*existing, strict=True))
            cursor.execute(
                "UPDATE account a SET balance = t.b, debt = t.d, earned = t.e, updated_at = %s "
                "FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[]) AS t(u, b, d, e) "
                "WHERE a.user_id = t.u",
                (now, users, balances, debts, earned),
            )
        return entry_ids[0] if entry_ids else None


class _DryRun:
    """What earlier batches of a dry run would have changed, kept in a scratch SQLite file so
    that memory stays flat however long the file: accounts and the refs granted."""

    def __init__(self) -> None:
        import sqlite3

        handle, self.path = tempfile.mkstemp(prefix="credex-dry-run-", suffix=".db")
        os.close(handle)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute("CREATE TABLE account (user_id TEXT PRIMARY KEY, balance, debt, earned)")
        self.db.execute("CREATE TABLE grant_ref (ref TEXT PRIMARY KEY, user_id, detail)")

    def close(self) -> None:
        self.db.close()
        os.unlink(self.path)

    def overlay_accounts(self, accounts: dict[str, list[int]], users: list[str]) -> None:
        rows = self.db.execute(
            "SELECT user_id, balance, debt, earned FROM account "
            "WHERE user_id IN (SELECT value FROM json_each(?))",
            (json.dumps(users),),
        )
        for user, balance, debt, earned in rows:
            accounts[user] = [balance, debt, earned]

    def overlay_refs(self, used: dict[str, tuple[str, str, int | None]], refs: list[str]) -> None:
        rows = self.db.execute(
            "SELECT ref, user_id, detail FROM grant_ref WHERE ref IN (SELECT value FROM json_each(?))",
            (json.dumps(refs),),
        )
        for ref, user, detail in rows:
            used[ref] = (user, detail, None)  # granted by this (dry) run

    def record(self, plan: _Plan) -> None:
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT OR REPLACE INTO account VALUES (?, ?, ?, ?)", [(u, *v) for u, v in plan.accounts.items()]
        )
        self.db.executemany(
            "INSERT INTO grant_ref VALUES (?, ?, ?)",
            [(ref, user, detail) for user, ref, _p, _d, _b, detail, _r in plan.entries],
        )
        self.db.execute("COMMIT")


# --- the run ---------------------------------------------------------------------------------------


def _apply(
    session: Session,
    backend: _Sqlite | _Postgres,
    batch: list[Grant | Rejected],
    *,
    report: BulkReport,
    on_rejected: Callable[[Rejected], None],
    operator: str,
    expiry_days: int,
    dry_run: _DryRun | None,
    replay: Replay,
) -> None:
    """One batch in one transaction; started again (state read anew) when a concurrent
    transaction took one of its refs or created one of its accounts first."""
    grants = [row for row in batch if row.__class__ is Grant]
    users = sorted({row.user_id for row in grants})
    refs = list({row.ref for row in grants})
    takers = sorted({row.user_id for row in grants if row.points < 0})
    seen = replay.seen
    for attempt in range(RETRIES + 1):
        outcome = BulkReport()
        rejected: list[Rejected] = []
        now = utcnow()
        replay.seen = seen
        try:
            backend.begin()
            accounts = backend.accounts(users, lock=dry_run is None) if users else {}
            used = backend.used_refs(refs) if refs else {}
            if takers:
                replay.start_batch({user: accounts[user][0] for user in takers if user in accounts}, takers)
            if dry_run is not None:
                dry_run.overlay_accounts(accounts, users)
                dry_run.overlay_refs(used, refs)
            lots = _lots_of(session, takers) if takers and dry_run is None else None
            plan = plan_batch(
                batch,
                accounts=accounts,
                used_refs=used,
                lots=lots,
                report=outcome,
                on_rejected=rejected.append,
                now=now,
                replay=replay,
            )
            if dry_run is None:
                expires_at = now + timedelta(days=expiry_days) if expiry_days > 0 else None
                first_id = backend.write(plan, now=now, operator=operator, expires_at=expires_at)
                session.commit()
                if replay.own_from is None:
                    replay.own_from = first_id
            else:
                session.rollback()
                dry_run.record(plan)
            break
        except Exception as error:
            session.rollback()
            if attempt < RETRIES and _worth_retrying(error):
                time.sleep(0.01 * 2**attempt)
                continue
            raise _as_credex_error(session, error) from error
    else:  # pragma: no cover - the loop always breaks or raises
        raise AssertionError("unreachable")
    for row in rejected:  # reported once the batch's outcome is final
        on_rejected(row)
    for field in ("applied", "duplicates", "rejected", "points_awarded"):
        setattr(report, field, getattr(report, field) + getattr(outcome, field))


def _worth_retrying(error: BaseException) -> bool:
    if isinstance(error, _Retry):
        return True
    try:
        import psycopg.errors
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(error, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure)


def _as_credex_error(session: Session, error: BaseException) -> BaseException:
    """A lost database as Unavailable (exit 69); anything else as it is."""
    from credex.db.engine import is_connection_error, unavailable

    if isinstance(error, CredexError):
        return error
    if isinstance(error, _Retry):
        return Unavailable(f"the database kept changing under one batch ({error}): try again")
    if is_connection_error(error):
        return unavailable(session.bind.url.render_as_string(hide_password=False), error)
    return error


def grant_bulk(
    session: Session,
    rows: Iterable[Grant | Rejected],
    *,
    operator: str,
    expiry_days: int = 0,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    on_rejected: Callable[[Rejected], None] | None = None,
    on_batch: Callable[[BulkReport], None] | None = None,
) -> BulkReport:
    """Apply ``rows`` (from ``bulk_files.open_grants``) as grants, ``batch_size`` rows per
    transaction; with ``dry_run`` nothing is written and the report says what would happen.

    ``on_rejected`` sees every refused row in file order, ``on_batch`` the report after each
    batch. An UnreadableFile from ``rows`` stops the run after applying the rows before it; the
    exception carries the report so far as ``report``."""
    report = BulkReport(dry_run=dry_run)
    notify = on_rejected or (lambda _row: None)
    dialect = session.bind.dialect.name
    backend = _Postgres(session) if dialect == "postgresql" else _Sqlite(session)
    scratch = _DryRun() if dry_run else None
    replay = Replay(backend.balances_before)
    batch: list[Grant | Rejected] = []

    def flush() -> None:
        _apply(
            session,
            backend,
            batch,
            report=report,
            on_rejected=notify,
            operator=operator,
            expiry_days=expiry_days,
            dry_run=scratch,
            replay=replay,
        )
        report.rows += len(batch)
        batch.clear()
        if on_batch is not None:
            on_batch(report)

    try:
        try:
            for row in rows:
                batch.append(row)
                if len(batch) >= batch_size:
                    flush()
        except UnreadableFile as error:
            if batch:  # the rows before the unreadable line count, as they would one by one
                flush()
            error.report = report
            raise
        if batch:
            flush()
    finally:
        if scratch is not None:
            scratch.close()
    return report


def summary(report: BulkReport, **extra: Any) -> dict:
    """The summary as printed: the four counts first."""
    return {**report.as_dict(), **extra}
