"""One bulk batch worked out: every row's outcome in file order with the planner that ``award
grant`` uses on one row, the refs and corrections judged as one run of the file would judge
them (``Replay``: where an earlier run of the same file left off), and what a batch's failure
means (start again, or an error to report). Shared by the run in one process (``bulk``) and its
writer processes on Postgres (``bulk_processes``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from credex.db.models import EntryKind
from credex.errors import CredexError, Unavailable
from credex.points.bulk_files import Grant, Rejected
from credex.points.bulk_writers import Retry
from credex.points.planner import Account, Plan, Planner, Refusal, StoredLot
from credex.retry import Backoff

DEFAULT_REASON = "bulk grant"
RETRIES = 5  # a batch that met a concurrent award of the same ref or account starts again
# The pause before a batch starts again: 10 ms, doubling each time (160 ms before the last try),
# spread a little so that two runs that met do not meet again at once.
AGAIN = Backoff(base=0.01, cap=0.16)

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

    def add(self, outcome: BulkReport) -> None:
        """Count a batch's outcome in."""
        self.applied += outcome.applied
        self.duplicates += outcome.duplicates
        self.rejected += outcome.rejected
        self.points_awarded += outcome.points_awarded


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


def start_again(session: Any, error: BaseException, attempt: int) -> bool:
    """After attempt ``attempt`` (from 0) of a batch failed with ``error``: roll its transaction
    back; True, after a pause longer each time, when the batch is worth starting again (a ref or
    an account another transaction took first, a deadlock), up to RETRIES times."""
    session.rollback()
    if attempt < RETRIES and _worth_retrying(error):
        time.sleep(AGAIN.delay(attempt + 1))
        return True
    return False


def _worth_retrying(error: BaseException) -> bool:
    if isinstance(error, Retry):
        return True
    try:
        import psycopg.errors
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(error, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure)


def as_credex_error(url: str, error: BaseException) -> BaseException:
    """A lost database as Unavailable (exit 69); anything else as it is."""
    from credex.db.failures import is_connection_error, unavailable

    if isinstance(error, CredexError):
        return error
    if isinstance(error, Retry):
        return Unavailable(f"the database kept changing under one batch ({error}): try again")
    if is_connection_error(error):
        return unavailable(url, error)
    return error
