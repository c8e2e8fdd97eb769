"""The points lifecycle: every award's points are a lot, spent oldest first; purchase points may
wait out a return window (pending); a refund takes back what its order earned, and what the
balance cannot cover becomes debt, paid out of later points before they reach the balance;
points past their expiry date are written off. The rules are ``planner.py``'s; the locks and
lots on the database ``lots.py``'s.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from credex.db.models import EntryKind, LotState, lot_state_is, utcnow
from credex.errors import Conflict, UnknownOrder
from credex.points import planner
from credex.points.lots import (
    account_table,
    consume_lots,
    find_entry,
    ledger_table,
    lock_account,
    lot_table,
    take_from_lot,
    use_table,
)
from credex.points.rules import check_ref, check_user_id, parse_amount, points_for

_AVAILABLE = LotState.available.value
_PENDING = LotState.pending.value


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
        pending_in_lot = lot.remaining if lot is not None and lot.state == _PENDING else 0
        from_pending, from_balance, to_debt = planner.clawback(
            account.balance, clawback, pending_in_lot=pending_in_lot
        )
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
                update(lot_table).where(lot_table.c.id == lot.id).values(**take_from_lot(from_pending))
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
    # The due lots first, then their accounts (settle's and expire's alike): asked for the
    # distinct accounts in one SELECT, a planner without statistics (SQLite's) walks the whole
    # ix_point_lot_available in account order instead of reading only the lapsed lots off
    # ix_point_lot_expirable (migration 0014).
    due = select(lot_table.c.user_id).where(*condition).cte("due").prefix_with("MATERIALIZED")
    users = session.execute(select(due.c.user_id).distinct()).scalars().all()
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
        lots = _due_lots(session, user_id, due)  # read after the lock: nobody else moves them now
        outcomes = planner.settle(account.balance, account.debt, [row.remaining for row in lots])
        moved = paid_total = settled = 0
        for row, (paid, left, balance, _debt) in zip(lots, outcomes, strict=True):
            session.execute(
                update(lot_table)
                .where(lot.id == row.id)
                .values(remaining=left, state=_AVAILABLE if left > 0 else planner.USED)
            )
            settled += 1
            if row.remaining == 0:  # refunded in full during the window: nothing to settle
                continue
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
        expired = 0
        lots = _due_lots(session, user_id, due)  # read after the lock: nobody else spends them now
        balances = planner.expire(account.balance, [row.remaining for row in lots])
        for row, balance in zip(lots, balances, strict=True):
            session.execute(
                update(lot_table).where(lot.id == row.id).values(remaining=0, state=LotState.expired.value)
            )
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
