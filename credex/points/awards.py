"""Awards: points for a purchase, for a review, and manual grants. Each is idempotent on
its reference: a repeat with the same content returns the original entry."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from credex.db.models import EntryKind, utcnow
from credex.errors import Conflict, InsufficientPoints, InvalidInput
from credex.points.lifecycle import (
    account_table,
    add_lot,
    consume_lots,
    credit_account,
    find_entry,
    ledger_table,
)
from credex.points.rules import (
    INT64_MAX,
    check_reason,
    check_ref,
    check_user_id,
    parse_amount,
    parse_int,
    points_for,
)


def entry_json(row, *, duplicate: bool = False) -> dict:
    """An award as printed. ``points`` is the effect on the balance; ``pending`` (points waiting
    for the return window) and ``debt`` (negative: debt paid) appear when the award had them."""
    result = {
        "entry_id": row.id,
        "user_id": row.user_id,
        "kind": row.kind,
        "ref": row.ref,
        "points": row.points,
        "balance": row.balance,
        "duplicate": duplicate,
        "created_at": row.created_at,
    }
    return with_lifecycle(result, getattr(row, "pending", 0) or 0, getattr(row, "debt", 0) or 0)


def with_lifecycle(result: dict, pending: int, debt: int) -> dict:
    if pending:
        result["pending"] = pending
    if debt:
        result["debt"] = debt
    return result


__all__ = ["check_ref", "check_user_id"]  # the input rules, imported from here by older callers


def ensure_account(session: Session, user_id: str, now: datetime) -> None:
    """Create the account if it does not exist (an account is created by its first award)."""
    if session.bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = (
        dialect_insert(account_table)
        .values(user_id=user_id, balance=0, earned=0, redeemed=0, created_at=now, updated_at=now)
        .on_conflict_do_nothing(index_elements=["user_id"])
    )
    session.execute(stmt)


def _repeat_or_conflict(existing, *, user_id: str, detail: str | None, what: str) -> dict:
    if existing.user_id == user_id and existing.detail == detail:
        return entry_json(existing, duplicate=True)
    raise Conflict(
        f"{what} {existing.ref} was already used for {existing.user_id} "
        f"({existing.detail or existing.points}) with other content"
    )


def change_balance(session: Session, user_id: str, points: int, now: datetime, **counters: int) -> int | None:
    """Add ``points`` (negative: take) in one conditional statement; the new balance, or None
    when the balance would go below zero (or beyond 64 bits). Never read-then-write."""
    stmt = update(account_table).where(account_table.c.user_id == user_id)
    if points < 0:
        stmt = stmt.where(account_table.c.balance >= -points)
    else:
        stmt = stmt.where(account_table.c.balance <= INT64_MAX - points)
    values = {"balance": account_table.c.balance + points, "updated_at": now}
    for column, delta in counters.items():
        values[column] = account_table.c[column] + delta
    row = session.execute(stmt.values(**values).returning(account_table.c.balance)).first()
    return None if row is None else row.balance


def apply_award(
    session: Session,
    *,
    user_id: str,
    kind: EntryKind,
    ref: str,
    points: int,
    detail: str | None,
    operator: str,
    reason: str | None,
    now: datetime,
    pending_days: int = 0,
    expiry_days: int = 0,
) -> dict:
    """Apply one award inside the caller's transaction (nothing is committed); the award JSON.

    Positive points become a lot (pending for ``pending_days``, expiring ``expiry_days`` after
    they become available) and pay the account's debt first; negative points are taken from the
    balance, oldest lots first. Refused (InsufficientPoints, InvalidInput) before anything is
    written, except the account ``ensure_account`` may have created: the caller rolls back."""

    ensure_account(session, user_id, now)
    pending = debt = 0
    if points > 0:
        credit = credit_account(session, user_id, points, pending=pending_days > 0, now=now)
        balance, pending, debt, to_balance = credit.balance, credit.pending, credit.debt, credit.points
    else:
        balance = change_balance(session, user_id, points, now, earned=points)
        if balance is None:
            current = session.execute(
                select(account_table.c.balance).where(account_table.c.user_id == user_id)
            ).scalar_one()
            raise InsufficientPoints(f"{user_id} has {current} points; taking {-points} would go below zero")
        to_balance = points
    entry_id = session.execute(
        insert(ledger_table)
        .values(
            user_id=user_id,
            kind=kind.value,
            ref=ref,
            points=to_balance,
            pending=pending,
            debt=debt,
            balance=balance,
            detail=detail,
            operator=operator,
            reason=reason,
            created_at=now,
        )
        .returning(ledger_table.c.id)
    ).scalar_one()
    if points > 0:
        add_lot(
            session,
            user_id=user_id,
            entry_id=entry_id,
            points=points,
            paid=-debt,
            pending_days=pending_days,
            expiry_days=expiry_days,
            now=now,
        )
    else:
        consume_lots(session, user_id, -points, entry_id)
    result = {
        "entry_id": entry_id,
        "user_id": user_id,
        "kind": kind.value,
        "ref": ref,
        "points": to_balance,
        "balance": balance,
        "duplicate": False,
        "created_at": now,
    }
    return with_lifecycle(result, pending, debt)


def record_award(
    session: Session,
    *,
    user_id: str,
    kind: EntryKind,
    ref: str,
    points: int,
    detail: str | None,
    operator: str,
    reason: str | None,
    what: str,
    pending_days: int = 0,
    expiry_days: int = 0,
) -> dict:
    """Apply one award in its own transaction, or return the original on a repeat."""
    existing = find_entry(session, kind.value, ref)
    if existing is not None:
        session.rollback()
        return _repeat_or_conflict(existing, user_id=user_id, detail=detail, what=what)
    try:
        result = apply_award(
            session,
            user_id=user_id,
            kind=kind,
            ref=ref,
            points=points,
            detail=detail,
            operator=operator,
            reason=reason,
            now=utcnow(),
            pending_days=pending_days,
            expiry_days=expiry_days,
        )
        session.commit()
    except IntegrityError:
        # The same reference committed by someone else in the meantime: a repeat after all.
        session.rollback()
        existing = find_entry(session, kind.value, ref)
        session.rollback()  # the read ends here too: a service leaves no transaction open
        if existing is None:
            raise
        return _repeat_or_conflict(existing, user_id=user_id, detail=detail, what=what)
    except (InsufficientPoints, InvalidInput):
        session.rollback()
        raise
    return result


def award_purchase(
    session: Session,
    user_id: str,
    *,
    order_id: str,
    amount: str | Decimal,
    rate: Decimal,
    operator: str,
    pending_days: int = 0,
    expiry_days: int = 0,
) -> dict:
    user_id = check_user_id(user_id)
    order_id = check_ref(order_id, "order id")
    amount = parse_amount(amount, "--amount")
    points = points_for(amount, rate)
    if points <= 0:
        # A purchase records the points it earns; one that earns none has nothing to record.
        raise InvalidInput(
            f"--amount {amount} earns no points at a purchase rate of {rate} (floor({amount} x {rate}) = 0): "
            "nothing recorded"
        )
    return record_award(
        session,
        user_id=user_id,
        kind=EntryKind.purchase,
        ref=order_id,
        points=points,
        detail=f"amount={amount.normalize():f}",
        operator=operator,
        reason=f"order {order_id}, amount {amount}",
        what="order",
        pending_days=pending_days,
        expiry_days=expiry_days,
    )


def award_review(
    session: Session,
    user_id: str,
    *,
    review_id: str,
    photos: bool,
    points: int,
    operator: str,
    expiry_days: int = 0,
) -> dict:
    user_id = check_user_id(user_id)
    review_id = check_ref(review_id, "review id")
    return record_award(
        session,
        user_id=user_id,
        kind=EntryKind.review,
        ref=review_id,
        points=points,
        detail="photos=yes" if photos else "photos=no",
        operator=operator,
        reason=f"review {review_id}" + (" with photos" if photos else ""),
        what="review",
        expiry_days=expiry_days,
    )


def award_grant(
    session: Session,
    user_id: str,
    points: str | int,
    *,
    reason: str,
    ref: str | None,
    operator: str,
    expiry_days: int = 0,
) -> dict:
    user_id = check_user_id(user_id)
    amount = parse_int(points, "points")
    if amount == 0:
        raise InvalidInput("points must not be zero")
    reason = check_reason(reason)
    ref = check_ref(ref, "ref") if ref is not None else f"grant-{uuid.uuid4()}"
    return record_award(
        session,
        user_id=user_id,
        kind=EntryKind.grant,
        ref=ref,
        points=amount,
        detail=f"points={amount}",
        operator=operator,
        reason=reason,
        what="grant ref",
        expiry_days=expiry_days,
    )
