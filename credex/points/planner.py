"""The points rules, once: state in, effects out, no database.

An award, a grant from a bulk file, a refund, a redemption's refund, settling and expiry all
move points by the same few rules (docs: the points lifecycle in the README):

- a credit pays the account's debt first; the rest reaches the balance (or waits as pending
  points) and becomes a lot of its own;
- a debit takes the oldest points first (lots ordered by ``available_at``, then id); what the
  balance cannot cover is refused, or becomes debt where the rule allows it;
- expiry writes off what is left of a lot; settling a pending lot pays the debt first too;
- a refunded redemption puts its points back into the lots they came from, after the debt.

``Planner`` applies awards to a set of accounts and their spendable lots and collects what
they write in a ``Plan``: ``award grant`` runs it on one row, ``award bulk`` on a batch of
thousands; the writers (``awards.py``, ``bulk_writers.py``) only store the plan.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

INT64_MAX = 2**63 - 1  # the columns are BIGINT

# point_lot.state values (credex.db.models.LotState), spelled here to keep this module pure.
PENDING = "pending"
AVAILABLE = "available"
USED = "used"

NEW_LOT_IDS = 1 << 62  # a new lot sorts after every stored one with the same available_at


# --- the state a plan starts from --------------------------------------------------------------


class Account(NamedTuple):
    """An account's counters (zero for an account its first award creates)."""

    balance: int = 0
    pending: int = 0
    debt: int = 0
    earned: int = 0


class StoredLot(NamedTuple):
    """A spendable (available) lot as stored."""

    id: int
    available_at: datetime
    remaining: int


# --- the effects a plan returns ----------------------------------------------------------------


class Entry(NamedTuple):
    """A ledger entry: its effects on the balance, the pending points and the debt (negative:
    paid), and the balance after it."""

    user_id: str
    kind: str
    ref: str
    points: int
    pending: int
    debt: int
    balance: int
    detail: str | None
    reason: str | None


class NewLot(NamedTuple):
    """The lot of a credit; ``entry`` is its entry's number in the plan, ``remaining`` what is
    left of it once the whole plan has run."""

    entry: int
    user_id: str
    points: int
    remaining: int
    state: str
    available_at: datetime
    expires_at: datetime | None


class LotUse(NamedTuple):
    """Points a plan's entry (by number) took out of a lot: a new lot's number when ``new``,
    else a stored lot's id."""

    lot: int
    entry: int
    points: int
    new: bool


class Refusal(NamedTuple):
    """An award the rules refuse; nothing of it is in the plan."""

    message: str
    insufficient: bool  # True: not enough points; False: a counter would overflow


@dataclass
class Plan:
    """What a run of awards writes, in order. Entries and new lots are numbered from 0."""

    entries: list[Entry] = field(default_factory=list)
    lots: list[NewLot] = field(default_factory=list)
    uses: list[LotUse] = field(default_factory=list)
    stored_lots: dict[int, int] = field(default_factory=dict)  # stored lot id -> remaining after
    accounts: dict[str, Account] = field(default_factory=dict)  # every changed account, after
    created: list[str] = field(default_factory=list)  # accounts the plan creates, in order


# A bulk run plans hundreds of thousands of these: built straight from a tuple, without the
# keyword handling of the NamedTuple constructors (a third of the planner's time).
_new = tuple.__new__


# --- the rules ---------------------------------------------------------------------------------


def debt_paid(debt: int, points: int) -> int:
    """How much of a credit of ``points`` pays the debt: all of it, up to the debt."""
    return debt if debt < points else points


class _Queued:
    """A spendable lot while a plan runs: ``number`` is set for the plan's own new lots."""

    __slots__ = ("available_at", "id", "number", "remaining")

    def __init__(self, available_at: datetime, id: int, number: int | None, remaining: int) -> None:
        self.available_at, self.id, self.number, self.remaining = available_at, id, number, remaining

    def __lt__(self, other: _Queued) -> bool:
        return (self.available_at, self.id) < (other.available_at, other.id)


def queue_of(lots: Iterable[StoredLot]) -> list[_Queued]:
    """Spendable lots in spending order: oldest ``available_at`` first, then the lower id."""
    return sorted(_Queued(lot.available_at, lot.id, None, lot.remaining) for lot in lots)


def take_oldest(queue: list[_Queued], points: int, user_id: str) -> Iterator[tuple[_Queued, int]]:
    """Take ``points`` out of ``queue`` oldest first: each lot touched and what it gave. The
    queue is left with what remains (emptied lots removed)."""
    left = points
    while left:
        if not queue:  # the balance said the points were there: a broken invariant, never a user error
            raise RuntimeError(f"{user_id}'s lots hold {points - left} points, {points} were taken")
        lot = queue[0]
        take = lot.remaining if lot.remaining < left else left
        lot.remaining -= take
        left -= take
        if not lot.remaining:
            queue.pop(0)
        yield lot, take


class Clawback(NamedTuple):
    """Where a refund's clawback comes from: the order's pending points, the balance, debt."""

    from_pending: int
    from_balance: int
    to_debt: int


def clawback(balance: int, points: int, *, pending_in_lot: int) -> Clawback:
    """A refund takes back ``points``: first the order's points still pending, then the balance
    (oldest lots first), and what neither covers becomes debt."""
    from_pending = min(points, pending_in_lot)
    from_balance = min(balance, points - from_pending)
    return Clawback(from_pending, from_balance, points - from_pending - from_balance)


def put_back(taken: Sequence[tuple[int, int]], *, skip: int) -> list[tuple[int, int]]:
    """A refunded redemption's points back into the lots it took them from (``taken``: lot id and
    points, oldest lot first), except ``skip`` points that paid the debt instead: the oldest,
    which expire first. (lot id, points back) for each lot that gets any."""
    back: list[tuple[int, int]] = []
    for lot_id, took in taken:
        skipped = min(skip, took)
        skip -= skipped
        if took - skipped:
            back.append((lot_id, took - skipped))
    return back


class Settled(NamedTuple):
    """A pending lot made available: ``paid`` of it to the debt, the rest to the balance."""

    paid: int
    left: int
    balance: int
    debt: int


def settle(balance: int, debt: int, remaining: Sequence[int]) -> list[Settled]:
    """Pending lots (what remains of each, oldest first) whose return window is over."""
    out = []
    for points in remaining:
        paid = debt_paid(debt, points)
        balance += points - paid
        debt -= paid
        out.append(Settled(paid, points - paid, balance, debt))
    return out


def expire(balance: int, remaining: Sequence[int]) -> list[int]:
    """Lots past their expiry date (what remains of each): the balance after each write-off."""
    out = []
    for points in remaining:
        balance -= points
        out.append(balance)
    return out


# --- awards, one or many ----------------------------------------------------------------------


class Planner:
    """Awards applied in order to ``accounts`` (the stored counters of the accounts they touch;
    absent: created by their first award). ``lots``: the spendable lots of every account a
    debit may touch; None plans balances only (a dry run), without lots."""

    def __init__(
        self,
        accounts: dict[str, Account],
        lots: dict[str, Iterable[StoredLot]] | None,
        *,
        now: datetime,
    ) -> None:
        self.stored = accounts
        self.queues = None if lots is None else {user: queue_of(rows) for user, rows in lots.items()}
        self.now = now
        self.plan = Plan()
        self._dates: dict[tuple[int, int], tuple[datetime, datetime | None]] = {}

    def account(self, user_id: str) -> Account:
        """The account as the plan has it so far."""
        return self.plan.accounts.get(user_id) or self.stored.get(user_id) or Account()

    def award(
        self,
        user_id: str,
        points: int,
        *,
        kind: str,
        ref: str,
        detail: str | None,
        reason: str | None,
        pending_days: int = 0,
        expiry_days: int = 0,
        judged: int | None = None,
    ) -> int | Refusal:
        """One award: ``points`` > 0 a credit (a lot, pending for ``pending_days``, expiring
        ``expiry_days`` after it becomes available), < 0 a debit of the oldest points, refused
        when the balance (or ``judged``, a balance to judge it on instead) cannot cover it.
        Returns its entry's number, or the Refusal (nothing planned)."""
        plan = self.plan
        changed = plan.accounts.get(user_id)
        account = changed or self.stored.get(user_id)
        balance, pending, debt, earned = account if account is not None else (0, 0, 0, 0)
        entry = len(plan.entries)
        if points > 0:
            waits = pending_days > 0
            paid = 0 if waits else debt_paid(debt, points)
            to_balance = 0 if waits else points - paid
            to_pending = points if waits else 0
            if balance + to_balance > INT64_MAX or pending + to_pending > INT64_MAX:
                return Refusal(f"{user_id}'s balance would exceed {INT64_MAX} points", False)
            if earned + points > INT64_MAX:
                return Refusal(f"{user_id}'s earned points would exceed {INT64_MAX}", False)
            balance += to_balance
            plan.entries.append(
                _new(Entry, (user_id, kind, ref, to_balance, to_pending, -paid, balance, detail, reason))
            )
            self._add_lot(user_id, entry, points, paid, pending_days, expiry_days)
            plan.accounts[user_id] = _new(
                Account, (balance, pending + to_pending, debt - paid, earned + points)
            )
        else:
            if (balance if judged is None else judged) < -points:
                shown = balance if judged is None else judged
                return Refusal(f"{user_id} has {shown} points; taking {-points} would go below zero", True)
            balance += points
            plan.entries.append(_new(Entry, (user_id, kind, ref, points, 0, 0, balance, detail, reason)))
            if self.queues is not None:
                self._take(user_id, -points, entry)
            plan.accounts[user_id] = _new(Account, (balance, pending, debt, earned + points))
        if account is None:  # the account is created by its first award
            plan.created.append(user_id)
        return entry

    def _add_lot(self, user_id: str, entry: int, points: int, paid: int, pending_days: int, expiry_days: int):
        plan = self.plan
        number = len(plan.lots)
        dates = self._dates.get((pending_days, expiry_days))
        if dates is None:  # the same for every lot of a bulk run: worked out once
            now = self.now
            available_at = now + timedelta(days=pending_days) if pending_days > 0 else now
            expires_at = available_at + timedelta(days=expiry_days) if expiry_days > 0 else None
            dates = self._dates[pending_days, expiry_days] = (available_at, expires_at)
        available_at, expires_at = dates
        remaining = points - paid
        state = PENDING if pending_days > 0 else (AVAILABLE if remaining else USED)
        plan.lots.append(_new(NewLot, (entry, user_id, points, remaining, state, available_at, expires_at)))
        if paid:
            plan.uses.append(_new(LotUse, (number, entry, paid, True)))
        if state is not AVAILABLE or self.queues is None:
            return
        queue = self.queues.get(user_id)
        if queue is not None:
            lot = _Queued(available_at, NEW_LOT_IDS + number, number, remaining)
            if not queue or not lot < queue[-1]:
                queue.append(lot)
            else:  # a lot dated before a stored one (a clock behind theirs): keep the spending order
                bisect.insort(queue, lot)

    def _take(self, user_id: str, points: int, entry: int) -> None:
        plan = self.plan
        for lot, take in take_oldest(self.queues.setdefault(user_id, []), points, user_id):
            if lot.number is None:
                plan.uses.append(LotUse(lot.id, entry, take, False))
                plan.stored_lots[lot.id] = lot.remaining
            else:
                plan.uses.append(LotUse(lot.number, entry, take, True))
                made = plan.lots[lot.number]
                plan.lots[lot.number] = made._replace(
                    remaining=lot.remaining, state=AVAILABLE if lot.remaining else USED
                )
