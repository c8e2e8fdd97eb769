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

A batch's outcome is worked out in ``bulk_batch``, stored by ``bulk_writers``; on Postgres the
batches after the first can be written by several processes at once (``bulk_processes``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sqlmodel import Session

from credex.db.models import utcnow
from credex.points.bulk_batch import (
    RETRIES,
    BulkReport,
    Replay,
    as_credex_error,
    plan_batch,
    start_again,
)
from credex.points.bulk_files import Grant, Rejected, UnreadableFile
from credex.points.bulk_processes import Done, Writers
from credex.points.bulk_writers import BULK_PRAGMAS, BatchWriter, PostgresWriter, writer_for
from credex.points.planner import Account, Plan

__all__ = ["BULK_PRAGMAS", "BulkReport", "grant_bulk", "summary"]  # BULK_PRAGMAS: bench/bulk.py

BATCH_SIZE = 5000


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
            if start_again(session, error, attempt):
                continue
            raise as_credex_error(_url(session), error) from error
    else:  # pragma: no cover - the loop always breaks or raises
        raise AssertionError("unreachable")
    for row in rejected:  # reported once the batch's outcome is final
        on_rejected(row)
    report.add(outcome)


def _url(session: Session) -> str:
    return session.bind.url.render_as_string(hide_password=False)


def _first_mark_after(session: Session, rows: Iterator[Grant | Rejected], replay: Replay) -> int | None:
    """The entry id of the first of ``rows`` an earlier run applied (None: none was), read on a
    session of its own before the batch's transaction, so no lock is held meanwhile. Entry ids
    grow in file order, so the first chunk of rows holding a mark holds the first mark. A line
    the reader cannot read ends the search: the run stops there anyway."""
    from credex.db.engine import open_session

    scan = open_session(_url(session))
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


def grant_bulk(
    session: Session,
    rows: Iterable[Grant | Rejected],
    *,
    operator: str,
    expiry_days: int = 0,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    jobs: int = 1,
    on_rejected: Callable[[Rejected], None] | None = None,
    on_batch: Callable[[BulkReport], None] | None = None,
    rows_after: Callable[[int], Iterator[Grant | Rejected]] | None = None,
) -> BulkReport:
    """Apply ``rows`` (from ``bulk_files.open_grants``) as grants, ``batch_size`` rows per
    transaction; with ``dry_run`` nothing is written and the report says what would happen.

    ``jobs`` > 1 on Postgres: the batches after the first are written by that many processes at
    once, committed in file order (``bulk_processes``); the outcome is the same. On SQLite, which
    writes one transaction at a time, and on a dry run, one process does it all.

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
    parallel = jobs > 1 and not dry_run and isinstance(backend, PostgresWriter)
    writers: Writers | None = None
    batch: list[Grant | Rejected] = []
    index = 0

    def counted(batch: list[Grant | Rejected]) -> None:
        report.rows += len(batch)
        if on_batch is not None:
            on_batch(report)

    def merge(batch: list[Grant | Rejected], done: Done) -> None:
        report.add(done.outcome)
        if done.refused:
            originals = {row.line: row.original for row in batch}
            for line, reason in done.refused:
                notify(Rejected(line, reason, originals.get(line)))
        replay.seen = max(replay.seen, done.seen)
        if replay.own_from is None:
            replay.own_from = done.first_id
        replay.look_up_refs = done.recorded
        counted(batch)

    def flush(*, more: bool) -> None:
        nonlocal writers, index, batch
        if parallel and writers is None and more:  # they start while this batch is applied here
            writers = Writers(_url(session), jobs, operator=operator, expiry_days=expiry_days, merge=merge)
        elif writers is not None and not any(row.__class__ is Grant and row.points < 0 for row in batch):
            writers.deal(index, batch, replay)
            index += 1
            batch = []
            return
        if writers is not None:
            writers.drain()  # a correction is judged on every batch before it
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
        if writers is not None:
            writers.settled(index)
        counted(batch)
        index += 1
        batch = []

    try:
        try:
            for row in rows:
                batch.append(row)
                if len(batch) >= batch_size:
                    flush(more=True)
        except UnreadableFile as error:
            if batch:  # the rows before the unreadable line count, as they would one by one
                flush(more=False)
            if writers is not None:
                writers.drain()
            error.report = report
            raise
        if batch:
            flush(more=False)
        if writers is not None:
            writers.drain()
    finally:
        if writers is not None:
            writers.close()
        if scratch is not None:
            scratch.close()
    return report


def summary(report: BulkReport, **extra: Any) -> dict:
    """The summary as printed: the four counts first."""
    return {**report.as_dict(), **extra}
