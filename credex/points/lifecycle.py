"""The points lifecycle: every award's points are a lot, spent oldest first; purchase points may
wait out a return window (pending); a refund takes back what its order earned, and what the
balance cannot cover becomes debt, paid out of later points before they reach the balance;
points past their expiry date are written off.

Every change to an account's lots happens in a transaction that has locked the account row
first (``UPDATE account`` or ``SELECT … FOR UPDATE``; on SQLite the write session's BEGIN
IMMEDIATE), so lots never need locks of their own and the cron jobs can run beside redemptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import bindparam, case, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from credex.db import tables
from credex.db.driver import DriverCursor, DriverStatement, first_value
from credex.db.models import EntryKind, LotState, lot_state_is, utcnow
from credex.errors import Conflict, InvalidInput, UnknownOrder
from credex.points.rules import INT64_MAX, check_ref, check_user_id, parse_amount, points_for

account_table = tables.account
ledger_table = tables.ledger_entry
lot_table = tables.point_lot
use_table = tables.lot_use


def find_entry(session: Session, kind: str, ref: str):
    """The ledger entry of ``kind`` with ``ref`` (unique together), or None."""
    return session.execute(
        select(ledger_table).where(ledger_table.c.kind == kind, ledger_table.c.ref == ref)
    ).first()


_AVAILABLE = LotState.available.value
_PENDING = LotState.pending.value
_USED = LotState.used.value


# --- lots ---------------------------------------------------------------------------------------


def lock_account(session: Session, user_id: str):
    """The account's counters, its row locked until the transaction ends (None: no account)."""
    a = account_table.c
    return session.execute(
        select(a.balance, a.pending, a.debt, a.earned).where(a.user_id == user_id).with_for_update()
    ).first()


@dataclass(frozen=True)
class Credit:
    """What an award did to the account: the ledger entry's three effects and the new balance."""

    points: int  # to the balance
    pending: int  # to the pending points
    debt: int  # to the debt (negative: paid)
    balance: int


def credit_account(session: Session, user_id: str, points: int, *, pending: bool, now: datetime) -> Credit:
    """Add an award's ``points`` (> 0): pending ones wait, available ones pay the debt first."""
    row = lock_account(session, user_id)
    paid = 0 if pending else min(row.debt, points)
    to_balance = 0 if pending else points - paid
    to_pending = points if pending else 0
    if row.balance + to_balance > INT64_MAX or row.pending + to_pending > INT64_MAX:
        raise InvalidInput(f"{user_id}'s balance would exceed {INT64_MAX} points")
    if row.earned + points > INT64_MAX:
        raise InvalidInput(f"{user_id}'s earned points would exceed {INT64_MAX}")
    a = account_table.c
    session.execute(
        update(account_table)
        .where(a.user_id == user_id)
        .values(
            balance=a.balance + to_balance,
            pending=a.pending + to_pending,
            debt=a.debt - paid,
            earned=a.earned + points,
            updated_at=now,
        )
    )
    return Credit(points=to_balance, pending=to_pending, debt=-paid, balance=row.balance + to_balance)


def add_lot(
    session: Session,
    *,
    user_id: str,
    entry_id: int,
    points: int,
    paid: int,
    pending_days: int,
    expiry_days: int,
    now: datetime,
) -> int:
    """The lot of one award; ``paid`` of it went to debt. Pending when ``pending_days`` > 0;
    it expires ``expiry_days`` after it becomes available (never when 0)."""
    available_at = now + timedelta(days=pending_days) if pending_days > 0 else now
    expires_at = available_at + timedelta(days=expiry_days) if expiry_days > 0 else None
    remaining = points - paid
    state = _PENDING if pending_days > 0 else (_AVAILABLE if remaining > 0 else _USED)
    lot_id = session.execute(
        insert(lot_table)
        .values(
            user_id=user_id,
            entry_id=entry_id,
            points=points,
            remaining=remaining,
            state=state,
            available_at=available_at,
            expires_at=expires_at,
            created_at=now,
        )
        .returning(lot_table.c.id)
    ).scalar_one()
    if paid:
        session.execute(insert(use_table).values(lot_id=lot_id, entry_id=entry_id, points=paid))
    return lot_id


def _take_from_lot(take):
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
        .values(**_take_from_lot(take))
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
    lot = lot_table.c
    # Most spending fits in the oldest lot: one statement finds and takes it.
    cursor = cursor or DriverCursor(session)
    lot_id = first_value(_TAKE_OLDEST_LOT.execute(cursor, {"owner": user_id, "take": points}))
    if lot_id is not None:
        _RECORD_USE.execute(cursor, {"lot_id": lot_id, "entry_id": entry_id, "points": points})
        return
    # Several lots: the oldest ones, up to the first whose running total covers the points.
    running = func.sum(lot.remaining).over(order_by=(lot.available_at, lot.id)).label("running")
    candidates = (
        select(lot.id, lot.remaining, lot.available_at, running)
        .where(lot.user_id == user_id, lot_state_is(_AVAILABLE))
        .subquery()
    )
    rows = session.execute(
        select(candidates.c.id, candidates.c.remaining)
        .where(candidates.c.running - candidates.c.remaining < points)
        .order_by(candidates.c.available_at, candidates.c.id)
    ).all()
    takes, left = [], points
    for row in rows:
        take = min(row.remaining, left)
        takes.append({"lot": row.id, "take": take})
        left -= take
    if left:  # the balance said the points were there: a broken invariant, never a user error
        raise RuntimeError(f"{user_id}'s lots hold {points - left} points, {points} were taken")
    session.execute(
        update(lot_table).where(lot.id == bindparam("lot")).values(**_take_from_lot(bindparam("take"))),
        takes,
    )
    session.execute(
        insert(use_table),
        [{"lot_id": t["lot"], "entry_id": entry_id, "points": t["take"]} for t in takes],
    )


# --- refunds ------------------------------------------------------------------------------------


def gross_points(row) -> int:
    """What an entry earned (an award) or took back (a refund, negative), whatever the window
    or the debt did with it: its effects on the balance and pending points, plus the debt paid."""
    return row.points + row.pending - row.debt


def refund_json(row, *, order_id: str, duplicate: bool) -> dict:
    return {
        "entry_id": row.id,
        "user_id": row.user_id,
        "kind": row.kind,
        "ref": row.ref,
        "order": order_id,
        "clawback": -gross_points(row),
        "points": row.points,
        "pending": row.pending,
        "debt": row.debt,
        "balance": row.balance,
        "duplicate": duplicate,
        "created_at": row.created_at,
    }


def _refund_repeat_or_conflict(session: Session, existing, *, user_id: str, order_id: str, detail: str):
    order = session.execute(
        select(ledger_table.c.ref).where(ledger_table.c.id == existing.source_id)
    ).scalar_one_or_none()
    session.rollback()
    if (existing.user_id, order, existing.detail) == (user_id, order_id, detail):
        return refund_json(existing, order_id=order, duplicate=True)
    raise Conflict(
        f"refund {existing.ref} was already recorded for {existing.user_id}, order {order} "
        f"({existing.detail}) with other content"
    )


def refund_order(
    session: Session,
    user_id: str,
    *,
    order_id: str,
    refund_id: str,
    amount: str | Decimal | None = None,
    rate: Decimal,
    operator: str,
) -> dict:
    """Take back what a refunded order earned: all of it, or floor(amount x rate) for a partial
    refund, never more than the order earned across its refunds. The order's pending points go
    first, then the balance (oldest points first); the rest becomes debt. Idempotent on
    ``refund_id``."""
    user_id = check_user_id(user_id)
    order_id = check_ref(order_id, "order id")
    refund_id = check_ref(refund_id, "refund id")
    refunded = parse_amount(amount, "--amount") if amount is not None else None
    detail = f"amount={refunded.normalize():f}" if refunded is not None else "amount=all"

    existing = find_entry(session, EntryKind.refund.value, refund_id)
    if existing is not None:
        return _refund_repeat_or_conflict(
            session, existing, user_id=user_id, order_id=order_id, detail=detail
        )
    purchase = find_entry(session, EntryKind.purchase.value, order_id)
    if purchase is None or purchase.user_id != user_id:
        session.rollback()
        raise UnknownOrder(f"{user_id} has no purchase award for order {order_id}")

    now = utcnow()
    ledger = ledger_table.c
    try:
        account = lock_account(session, user_id)
        earned = gross_points(purchase)
        # Postgres sums BIGINT as NUMERIC: back to an int.
        taken_before = -int(
            session.execute(
                select(func.coalesce(func.sum(ledger.points + ledger.pending - ledger.debt), 0)).where(
                    ledger.kind == EntryKind.refund.value, ledger.source_id == purchase.id
                )
            ).scalar_one()
        )
        wanted = earned if refunded is None else points_for(refunded, rate)
        clawback = max(0, min(wanted, earned - taken_before))
        lot = session.execute(
            select(lot_table.c.id, lot_table.c.remaining, lot_table.c.state).where(
                lot_table.c.entry_id == purchase.id
            )
        ).first()
        from_pending = min(clawback, lot.remaining) if lot is not None and lot.state == _PENDING else 0
        from_balance = min(account.balance, clawback - from_pending)
        to_debt = clawback - from_pending - from_balance
        a = account_table.c
        session.execute(
            update(account_table)
            .where(a.user_id == user_id)
            .values(
                balance=a.balance - from_balance,
                pending=a.pending - from_pending,
                debt=a.debt + to_debt,
                earned=a.earned - clawback,
                updated_at=now,
            )
        )
        balance = account.balance - from_balance
        reason = f"refund {refund_id} of order {order_id}" + (
            f", amount {refunded}" if refunded is not None else ""
        )
        entry_id = session.execute(
            insert(ledger_table)
            .values(
                user_id=user_id,
                kind=EntryKind.refund.value,
                ref=refund_id,
                points=-from_balance,
                pending=-from_pending,
                debt=to_debt,
                balance=balance,
                detail=detail,
                source_id=purchase.id,
                operator=operator,
                reason=reason,
                created_at=now,
            )
            .returning(ledger.id)
        ).scalar_one()
        if from_pending:
            session.execute(
                update(lot_table).where(lot_table.c.id == lot.id).values(**_take_from_lot(from_pending))
            )
            session.execute(insert(use_table).values(lot_id=lot.id, entry_id=entry_id, points=from_pending))
        if from_balance:
            consume_lots(session, user_id, from_balance, entry_id)
        session.commit()
    except IntegrityError:
        # The same refund id committed by someone else in the meantime: a repeat after all.
        session.rollback()
        existing = find_entry(session, EntryKind.refund.value, refund_id)
        if existing is None:
            raise
        return _refund_repeat_or_conflict(
            session, existing, user_id=user_id, order_id=order_id, detail=detail
        )
    return {
        "entry_id": entry_id,
        "user_id": user_id,
        "kind": EntryKind.refund.value,
        "ref": refund_id,
        "order": order_id,
        "clawback": clawback,
        "points": -from_balance,
        "pending": -from_pending,
        "debt": to_debt,
        "balance": balance,
        "duplicate": False,
        "created_at": now,
    }


# --- the cron jobs ------------------------------------------------------------------------------


def _due_accounts(session: Session, condition) -> list[str]:
    users = session.execute(select(lot_table.c.user_id).where(*condition).distinct()).scalars().all()
    session.rollback()  # each account gets a short transaction of its own
    return sorted(users)


def _due_lots(session: Session, user_id: str, condition):
    lot, ledger = lot_table.c, ledger_table.c
    return session.execute(
        select(lot.id, lot.remaining, lot.entry_id, lot.available_at, ledger.kind, ledger.ref)
        .select_from(lot_table.outerjoin(ledger_table, ledger.id == lot.entry_id))
        .where(lot.user_id == user_id, *condition)
        .order_by(lot.available_at, lot.id)
    ).all()


def _write_entry(session: Session, **values) -> int:
    return session.execute(insert(ledger_table).values(**values).returning(ledger_table.c.id)).scalar_one()


def settle_pending(session: Session, *, operator: str, now: datetime | None = None) -> dict:
    """Make pending points whose return window is over available, paying any debt first:
    one ``settle`` entry per lot. Idempotent; safe beside redemptions and other runs."""
    now = now or utcnow()
    lot = lot_table.c
    due = (lot_state_is(_PENDING), lot.available_at <= now)
    report = {"as_of": now, "accounts": 0, "lots": 0, "points": 0, "debt_paid": 0}
    for user_id in _due_accounts(session, due):
        account = lock_account(session, user_id)
        balance, debt = account.balance, account.debt
        moved = paid_total = settled = 0
        for row in _due_lots(session, user_id, due):  # read after the lock: nobody else moves them now
            paid = min(debt, row.remaining)
            left = row.remaining - paid
            session.execute(
                update(lot_table)
                .where(lot.id == row.id)
                .values(remaining=left, state=_AVAILABLE if left > 0 else _USED)
            )
            settled += 1
            if row.remaining == 0:  # refunded in full during the window: nothing to settle
                continue
            balance += left
            debt -= paid
            entry_id = _write_entry(
                session,
                user_id=user_id,
                kind=EntryKind.settle.value,
                ref=f"lot-{row.id}",
                points=left,
                pending=-row.remaining,
                debt=-paid,
                balance=balance,
                detail=None,
                source_id=row.entry_id,
                operator=operator,
                reason=f"order {row.ref}: return window over",
                created_at=now,
            )
            if paid:
                session.execute(insert(use_table).values(lot_id=row.id, entry_id=entry_id, points=paid))
            moved += row.remaining
            paid_total += paid
        if settled:
            a = account_table.c
            session.execute(
                update(account_table)
                .where(a.user_id == user_id)
                .values(
                    balance=a.balance + (moved - paid_total),
                    pending=a.pending - moved,
                    debt=a.debt - paid_total,
                    updated_at=now,
                )
            )
            report["accounts"] += 1
            report["lots"] += settled
            report["points"] += moved
            report["debt_paid"] += paid_total
        session.commit()
    return report


def _expiry_ref(session: Session, lot_id: int) -> str:
    """``lot-ID``; a lot that lapses again (a refunded redemption put points back into it after it
    expired) gets ``lot-ID.N``, N its put-backs so far."""
    put_backs = session.execute(
        select(func.count()).where(use_table.c.lot_id == lot_id, use_table.c.points < 0)
    ).scalar_one()
    return f"lot-{lot_id}" if not put_backs else f"lot-{lot_id}.{put_backs}"


def expire_lapsed(session: Session, *, operator: str, now: datetime | None = None) -> dict:
    """Write off what is left of every award past its expiry date: one ``expiry`` entry per
    lot. Idempotent; safe beside redemptions and other runs."""
    now = now or utcnow()
    lot = lot_table.c
    due = (lot_state_is(_AVAILABLE), lot.expires_at <= now)
    report = {"as_of": now, "accounts": 0, "lots": 0, "points": 0}
    for user_id in _due_accounts(session, due):
        account = lock_account(session, user_id)
        balance = account.balance
        expired = 0
        lots = _due_lots(session, user_id, due)  # read after the lock: nobody else spends them now
        for row in lots:
            session.execute(
                update(lot_table).where(lot.id == row.id).values(remaining=0, state=LotState.expired.value)
            )
            balance -= row.remaining
            source = f"{row.kind} {row.ref}" if row.kind else "carried-over points"
            entry_id = _write_entry(
                session,
                user_id=user_id,
                kind=EntryKind.expiry.value,
                ref=_expiry_ref(session, row.id),
                points=-row.remaining,
                balance=balance,
                detail=None,
                source_id=row.entry_id,
                operator=operator,
                reason=f"{source}: expired, available since {row.available_at.date().isoformat()}",
                created_at=now,
            )
            session.execute(insert(use_table).values(lot_id=row.id, entry_id=entry_id, points=row.remaining))
            expired += row.remaining
        if lots:
            a = account_table.c
            session.execute(
                update(account_table)
                .where(a.user_id == user_id)
                .values(balance=a.balance - expired, updated_at=now)
            )
            report["accounts"] += 1
            report["lots"] += len(lots)
            report["points"] += expired
        session.commit()
    return report


# --- reading ------------------------------------------------------------------------------------


def expiring(session: Session, user_id: str) -> list[dict]:
    """The balance's points that will expire, summed per day, next dates first."""
    lot = lot_table.c
    rows = session.execute(
        select(lot.remaining, lot.expires_at)
        .where(lot.user_id == user_id, lot_state_is(_AVAILABLE), lot.expires_at.is_not(None))
        .order_by(lot.expires_at)
    )
    days: dict = {}
    for row in rows:
        day = row.expires_at.date()
        days[day] = days.get(day, 0) + row.remaining
    return [{"points": points, "on": day} for day, points in days.items()]
