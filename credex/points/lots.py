"""Balances and lots on the database: the accounts' locks, the spendable lots as the planner
reads them, spending on a redemption's hot path, and storing an award's plan.

Every change to an account's lots happens in a transaction that has locked the account row
first (``UPDATE account`` or ``SELECT … FOR NO KEY UPDATE``; on SQLite the write session's BEGIN
IMMEDIATE), so lots never need locks of their own. Nothing here commits: the caller does.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, case, func, insert, select, update
from sqlmodel import Session

from credex.db import tables
from credex.db.driver import DriverCursor, DriverStatement, first_value
from credex.db.models import LotState, lot_state_is
from credex.errors import UnreadableValue, printable
from credex.points.planner import Account, Plan, StoredLot, queue_of, take_oldest

account_table = tables.account
ledger_table = tables.ledger_entry
lot_table = tables.point_lot
use_table = tables.lot_use

_AVAILABLE = LotState.available.value
_USED = LotState.used.value


def find_entry(session: Session, kind: str, ref: str):
    """The ledger entry of ``kind`` with ``ref`` (unique together), or None."""
    return session.execute(
        select(ledger_table).where(ledger_table.c.kind == kind, ledger_table.c.ref == ref)
    ).first()


def lock_account(session: Session, user_id: str):
    """The account's counters, its row locked until the transaction ends (None: no account).

    On Postgres the lock is FOR NO KEY UPDATE, the one an UPDATE of the counters takes: it
    excludes every other writer of the account but not the FOR KEY SHARE that a row referring to
    the account may have taken in the same transaction. FOR UPDATE would exclude that too, and two
    transactions that each hold it (a redemption row written twice, as `track sync` does: the
    answer, then the status) would each wait for the other: a deadlock."""
    a = account_table.c
    row = session.execute(
        select(a.balance, a.pending, a.debt, a.earned)
        .where(a.user_id == user_id)
        .with_for_update(key_share=True)
    ).first()
    if row is not None:
        whole_counters(user_id, row)
    return row


def whole_counters(user_id: str, counters) -> None:
    """Refuse an account whose counters are not all whole numbers: SQLite keeps text in a number
    column when an UPDATE by hand says so, and no balance can be read, shown or changed from it."""
    bad = next((value for value in counters if type(value) is not int), None)
    if bad is not None:
        raise UnreadableValue(
            f"the account {printable(user_id)} holds a counter that is not a whole number "
            f"({printable(bad)}): it was changed by hand; repair the row"
        )


def locked_account(session: Session, user_id: str) -> Account | None:
    """``lock_account`` as the planner's state."""
    row = lock_account(session, user_id)
    return None if row is None else Account(row.balance, row.pending, row.debt, row.earned)


def oldest_lots(session: Session, user_id: str, points: int) -> list[StoredLot]:
    """The account's oldest available lots, up to the first whose running total covers ``points``
    (read after the account is locked)."""
    lot = lot_table.c
    running = func.sum(lot.remaining).over(order_by=(lot.available_at, lot.id)).label("running")
    candidates = (
        select(lot.id, lot.remaining, lot.available_at, running)
        .where(lot.user_id == user_id, lot_state_is(_AVAILABLE))
        .subquery()
    )
    rows = session.execute(
        select(candidates.c.id, candidates.c.available_at, candidates.c.remaining)
        .where(candidates.c.running - candidates.c.remaining < points)
        .order_by(candidates.c.available_at, candidates.c.id)
    ).all()
    return [StoredLot(row.id, row.available_at, row.remaining) for row in rows]


def take_from_lot(take):
    """The values of an UPDATE of point_lot that takes ``take`` points out of a lot."""
    lot = lot_table.c
    return {"remaining": lot.remaining - take, "state": case((lot.remaining == take, _USED), else_=lot.state)}


def _take_oldest_lot():
    lot = lot_table.c
    oldest = (
        select(lot.id)
        .where(lot.user_id == bindparam("owner"), lot_state_is(_AVAILABLE))
        .order_by(lot.available_at, lot.id)
        .limit(1)
        .scalar_subquery()
    )
    take = bindparam("take")
    return (
        update(lot_table)
        .where(lot.id == oldest, lot.remaining >= take)
        .values(**take_from_lot(take))
        .returning(lot.id)
    )


# Built once: redemptions run these two on every call, and building a statement costs more
# than running it on SQLite.
_TAKE_OLDEST_LOT = DriverStatement(_take_oldest_lot())
_RECORD_USE = DriverStatement(insert(use_table), columns=("lot_id", "entry_id", "points"))


def consume_lots(
    session: Session, user_id: str, points: int, entry_id: int, *, cursor: DriverCursor | None = None
) -> None:
    """Take ``points`` out of the account's available lots, oldest first, and record each use.
    The caller has already taken them from the balance (which locked the account row)."""
    # Most spending fits in the oldest lot: one statement finds and takes it (the planner's rule
    # on a single lot, without reading it first).
    cursor = cursor or DriverCursor(session)
    lot_id = first_value(_TAKE_OLDEST_LOT.execute(cursor, {"owner": user_id, "take": points}))
    if lot_id is not None:
        _RECORD_USE.execute(cursor, {"lot_id": lot_id, "entry_id": entry_id, "points": points})
        return
    queue = queue_of(oldest_lots(session, user_id, points))
    takes = [{"lot": lot.id, "take": take} for lot, take in take_oldest(queue, points, user_id)]
    session.execute(
        update(lot_table)
        .where(lot_table.c.id == bindparam("lot"))
        .values(**take_from_lot(bindparam("take"))),
        takes,
    )
    session.execute(
        insert(use_table),
        [{"lot_id": t["lot"], "entry_id": entry_id, "points": t["take"]} for t in takes],
    )


def write_plan(session: Session, plan: Plan, *, operator: str, now: datetime) -> list[int]:
    """Store a plan of a few awards (``award grant``, purchases, reviews) in the caller's
    transaction, the accounts locked; the ids of its entries. ``award bulk`` stores its plans
    with ``bulk_writers``."""
    a = account_table.c
    created = set(plan.created)
    for user_id in plan.created:
        account = plan.accounts[user_id]
        session.execute(
            insert(account_table).values(
                user_id=user_id, redeemed=0, created_at=now, updated_at=now, **account._asdict()
            )
        )
    for user_id, account in plan.accounts.items():
        if user_id not in created:
            session.execute(
                update(account_table).where(a.user_id == user_id).values(updated_at=now, **account._asdict())
            )
    entry_ids = [
        session.execute(
            insert(ledger_table)
            .values(operator=operator, created_at=now, **entry._asdict())
            .returning(ledger_table.c.id)
        ).scalar_one()
        for entry in plan.entries
    ]
    lot_ids = [
        session.execute(
            insert(lot_table)
            .values(
                user_id=lot.user_id,
                entry_id=entry_ids[lot.entry],
                points=lot.points,
                remaining=lot.remaining,
                state=lot.state,
                available_at=lot.available_at,
                expires_at=lot.expires_at,
                created_at=now,
            )
            .returning(lot_table.c.id)
        ).scalar_one()
        for lot in plan.lots
    ]
    for lot_id, remaining in plan.stored_lots.items():
        emptied = {"state": _USED} if remaining == 0 else {}
        session.execute(
            update(lot_table).where(lot_table.c.id == lot_id).values(remaining=remaining, **emptied)
        )
    if plan.uses:
        session.execute(
            insert(use_table),
            [
                {
                    "lot_id": lot_ids[use.lot] if use.new else use.lot,
                    "entry_id": entry_ids[use.entry],
                    "points": use.points,
                }
                for use in plan.uses
            ],
        )
    return entry_ids
