"""Bulk grants: many ``award grant`` rows from a file, applied in batches with the driver's bulk
paths, ending exactly as if each row had been granted one by one in file order.

Each batch is one transaction: read and check the rows first (no lock held), then lock the
accounts the batch touches (sorted user ids; on SQLite the write session's BEGIN IMMEDIATE),
read their balances, debt and lots and the refs already used, work out every row's outcome in
file order with the planner that ``award grant`` uses on one row (duplicate, rejected, or the
entry, lot and lot uses it writes), store the plan (``bulk_writers``: executemany on SQLite,
COPY on Postgres), and commit. A run killed half way has committed whole batches only: their
rows are duplicates next time, and the corrections it refused are judged again where they stand
in the file (``Replay``).

(A little over 400 lines on purpose: a batch's steps and the replay of an earlier run are one
transaction's story; the rules are planner.py's and the writing bulk_writers.py's.)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session

from credex.db.models import EntryKind, utcnow
from credex.errors import CredexError, Unavailable
from credex.points.bulk_files import Grant, Rejected, UnreadableFile
from credex.points.bulk_writers import BULK_PRAGMAS, BatchWriter, Retry, writer_for
from credex.points.planner import Account, Plan, Planner, Refusal, StoredLot

__all__ = ["BULK_PRAGMAS", "BulkReport", "grant_bulk", "summary"]  # BULK_PRAGMAS: bench/bulk.py

BATCH_SIZE = 5000
DEFAULT_REASON = "bulk grant"
RETRIES = 5  # a batch that met a concurrent award of the same ref or account starts again

_GRANT = EntryKind.grant.value


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


# --- working out a batch --------------------------------------------------------------------------


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
        # The first mark after the first batch with a correction and no mark before it, found by
        # reading the rest of the file (``rows_after``) once: an earlier run may have refused the
        # correction and applied rows only further on, beyond this batch.
        self.mark_beyond: int | None = None
        self.looked_beyond = False
        self.own_from: int | None = None  # the first entry id this run wrote
        self.look_up_refs = True  # whether the next batch asks which of its refs are recorded
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

    def mark_of(self, row: Grant, prior: tuple[str, str, int | None] | None) -> int | None:
        """The entry id an earlier run recorded for ``row`` (same ref and content), if any."""
        if (
            prior is not None
            and prior[0] == row.user_id
            and prior[1] == f"points={row.points}"
            and self.is_mark(prior[2])
        ):
            return prior[2]
        return None

    def growth(self, user: str, bound: int) -> int:
        """How much ``user``'s balance grew between the mark ``bound`` and this run."""
        before = self._cache.get((user, bound))
        if before is None:
            before = self._cache[user, bound] = self.balances_before([user], bound).get(user, 0)
        return self.settled.get(user, 0) - before


def plan_batch(
    batch: list[Grant | Rejected],
    *,
    accounts: dict[str, Account],
    used_refs: dict[str, tuple[str, str, int | None]],
    lots: dict[str, list[StoredLot]] | None,
    report: BulkReport,
    on_rejected: Callable[[Rejected], None],
    now: datetime,
    expiry_days: int = 0,
    replay: Replay | None = None,
) -> Plan:
    """Every row's outcome in file order, as ``award grant`` one by one would have it: the
    planner's rules on the whole batch, refs and corrections judged here.

    ``accounts``: the batch's existing accounts (locked); ``used_refs``: ref -> (user id,
    detail, entry id) of the grants already recorded with the batch's refs; ``lots``: the
    available lots, oldest first, of the accounts the batch takes points from (None: a dry run,
    which plans no lots); ``replay``: where earlier runs of the file left off (None: judge
    corrections on the balance alone)."""
    planner = Planner(accounts, lots, now=now)
    first_mark: list[int | None] = []  # worked out when a correction first needs it

    def mark_ahead() -> int | None:
        # A correction before the run's first mark: the earlier run had applied nothing before
        # it, so its balance then is the one before the batch's earliest mark.
        if not first_mark:
            marks = [
                mark
                for row in batch
                if row.__class__ is Grant
                and (mark := replay.mark_of(row, used_refs.get(row.ref))) is not None
            ]
            first_mark.append(min(marks, default=replay.mark_beyond))
        return first_mark[0]

    award = planner.award
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
        judged = None
        if points < 0 and replay is not None:
            bound = replay.seen + 1 if replay.seen else mark_ahead()
            if bound is not None:
                grown = replay.growth(user, bound)
                if grown > 0:
                    judged = planner.account(user).balance - grown
        outcome = award(
            user,
            points,
            kind=_GRANT,
            ref=ref,
            detail=detail,
            reason=row.reason or DEFAULT_REASON,
            expiry_days=expiry_days,
            judged=judged,
        )
        if outcome.__class__ is Refusal:
            report.rejected += 1
            on_rejected(Rejected(row.line, outcome.message, row.original))
            continue
        used_refs[ref] = (user, detail, None)
        report.applied += 1
        report.points_awarded += points
    return planner.plan


# --- a dry run -------------------------------------------------------------------------------------


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
        self.db.execute("CREATE TABLE account (user_id TEXT PRIMARY KEY, balance, pending, debt, earned)")
        self.db.execute("CREATE TABLE grant_ref (ref TEXT PRIMARY KEY, user_id, detail)")

    def close(self) -> None:
        self.db.close()
        os.unlink(self.path)

    def overlay_accounts(self, accounts: dict[str, Account], users: list[str]) -> None:
        rows = self.db.execute(
            "SELECT user_id, balance, pending, debt, earned FROM account "
            "WHERE user_id IN (SELECT value FROM json_each(?))",
            (json.dumps(users),),
        )
        for user, *counters in rows:
            accounts[user] = Account(*counters)

    def overlay_refs(self, used: dict[str, tuple[str, str, int | None]], refs: list[str]) -> None:
        rows = self.db.execute(
            "SELECT ref, user_id, detail FROM grant_ref WHERE ref IN (SELECT value FROM json_each(?))",
            (json.dumps(refs),),
        )
        for ref, user, detail in rows:
            used[ref] = (user, detail, None)  # granted by this (dry) run

    def record(self, plan: Plan) -> None:
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT OR REPLACE INTO account VALUES (?, ?, ?, ?, ?)",
            [(u, *v) for u, v in plan.accounts.items()],
        )
        self.db.executemany(
            "INSERT INTO grant_ref VALUES (?, ?, ?)",
            [(entry.ref, entry.user_id, entry.detail) for entry in plan.entries],
        )
        self.db.execute("COMMIT")


# --- the run ---------------------------------------------------------------------------------------


def _apply(
    session: Session,
    backend: BatchWriter,
    batch: list[Grant | Rejected],
    *,
    report: BulkReport,
    on_rejected: Callable[[Rejected], None],
    operator: str,
    expiry_days: int,
    dry_run: _DryRun | None,
    replay: Replay,
    rows_after: Callable[[int], Iterator[Grant | Rejected]] | None = None,
) -> None:
    """One batch in one transaction; started again (state read anew) when a concurrent
    transaction took one of its refs or created one of its accounts first."""
    grants = [row for row in batch if row.__class__ is Grant]
    users = sorted({row.user_id for row in grants})
    refs = list({row.ref for row in grants})
    takers = sorted({row.user_id for row in grants if row.points < 0})
    if takers and not replay.seen and not replay.looked_beyond and rows_after is not None:
        replay.mark_beyond = _first_mark_after(session, rows_after(batch[-1].line), replay)
        replay.looked_beyond = True
    seen = replay.seen
    for attempt in range(RETRIES + 1):
        outcome = BulkReport()
        rejected: list[Rejected] = []
        now = utcnow()
        replay.seen = seen
        try:
            backend.begin()
            accounts = backend.accounts(users, lock=dry_run is None) if users else {}
            # Refs are looked up while the batches before found some recorded (the first batch
            # always: is this file run again?), on a dry run, and when an attempt started
            # again. Otherwise the batch is written without asking: a ref recorded after all
            # fails the write at the unique index, and the batch starts again, looking them up.
            look_up = replay.look_up_refs or attempt > 0 or dry_run is not None
            used = backend.used_refs(refs) if refs and look_up else {}
            recorded = bool(used)  # before planning: the plan adds the batch's own refs to ``used``
            if takers:
                replay.start_batch(
                    {user: accounts[user].balance for user in takers if user in accounts}, takers
                )
            if dry_run is not None:
                dry_run.overlay_accounts(accounts, users)
                dry_run.overlay_refs(used, refs)
            lots = backend.lots_of(takers) if takers and dry_run is None else None
            plan = plan_batch(
                batch,
                accounts=accounts,
                used_refs=used,
                lots=lots,
                report=outcome,
                on_rejected=rejected.append,
                now=now,
                expiry_days=expiry_days,
                replay=replay,
            )
            if dry_run is None:
                first_id = backend.write(plan, now=now, operator=operator)
                session.commit()
                if replay.own_from is None:
                    replay.own_from = first_id
                replay.look_up_refs = recorded
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


def _first_mark_after(session: Session, rows: Iterator[Grant | Rejected], replay: Replay) -> int | None:
    """The entry id of the first of ``rows`` an earlier run applied (None: none was), read on a
    session of its own before the batch's transaction, so no lock is held meanwhile. Entry ids
    grow in file order, so the first chunk of rows holding a mark holds the first mark. A line
    the reader cannot read ends the search: the run stops there anyway."""
    from credex.db.engine import open_session

    scan = open_session(session.bind.url.render_as_string(hide_password=False))
    try:
        looking = writer_for(scan)
        looking.begin()
        chunk: list[Grant] = []
        try:
            for row in rows:
                if row.__class__ is Grant:
                    chunk.append(row)
                if len(chunk) == BATCH_SIZE:
                    if (mark := _first_mark_in(looking, chunk, replay)) is not None:
                        return mark
                    chunk = []
        except UnreadableFile:
            pass
        return _first_mark_in(looking, chunk, replay) if chunk else None
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
        scan.close()


def _first_mark_in(looking: BatchWriter, chunk: list[Grant], replay: Replay) -> int | None:
    used = looking.used_refs([row.ref for row in chunk])
    marks = [mark for row in chunk if (mark := replay.mark_of(row, used.get(row.ref))) is not None]
    return min(marks, default=None)


def _worth_retrying(error: BaseException) -> bool:
    if isinstance(error, Retry):
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
    if isinstance(error, Retry):
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
    rows_after: Callable[[int], Iterator[Grant | Rejected]] | None = None,
) -> BulkReport:
    """Apply ``rows`` (from ``bulk_files.open_grants``) as grants, ``batch_size`` rows per
    transaction; with ``dry_run`` nothing is written and the report says what would happen.

    ``rows_after(line)`` reads the same file's rows after ``line`` again (None: the input cannot
    be read twice, as stdin): with it, a correction an earlier run of the file refused is
    refused again even when that run applied no row before the correction's batch ended. Without
    it, such a correction is judged on the balance now.

    ``on_rejected`` sees every refused row in file order, ``on_batch`` the report after each
    batch. An UnreadableFile from ``rows`` stops the run after applying the rows before it; the
    exception carries the report so far as ``report``."""
    report = BulkReport(dry_run=dry_run)
    notify = on_rejected or (lambda _row: None)
    backend = writer_for(session)
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
            rows_after=rows_after,
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
