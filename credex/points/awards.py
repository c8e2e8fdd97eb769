"""Awards: points for a purchase, for a review, and manual grants. Each is idempotent on
its reference: a repeat with the same content returns the original entry."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from credex.db.models import EntryKind, utcnow
from credex.errors import Conflict, InsufficientPoints, InvalidInput
from credex.points.lots import account_table, find_entry, locked_account, oldest_lots, write_plan
from credex.points.planner import Planner, Refusal
from credex.points.rules import (
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

    The planner's rules, as ``award bulk`` runs them on a batch: positive points become a lot
    (pending for ``pending_days``, expiring ``expiry_days`` after they become available) and pay
    the account's debt first; negative points are taken from the balance, oldest lots first.
    Refused (InsufficientPoints, InvalidInput) before anything is written, except the account
    ``ensure_account`` may have created: the caller rolls back."""

    ensure_account(session, user_id, now)
    account = locked_account(session, user_id)
    lots = {user_id: oldest_lots(session, user_id, -points)} if points < 0 else {}
    planner = Planner({user_id: account}, lots, now=now)
    outcome = planner.award(
        user_id,
        points,
        kind=kind.value,
        ref=ref,
        detail=detail,
        reason=reason,
        pending_days=pending_days,
        expiry_days=expiry_days,
    )
    if isinstance(outcome, Refusal):
        raise (InsufficientPoints if outcome.insufficient else InvalidInput)(outcome.message)
    (entry_id,) = write_plan(session, planner.plan, operator=operator, now=now)
    entry = planner.plan.entries[outcome]
    result = {
        "entry_id": entry_id,
        "user_id": user_id,
        "kind": kind.value,
        "ref": ref,
        "points": entry.points,
        "balance": entry.balance,
        "duplicate": False,
        "created_at": now,
    }
    return with_lifecycle(result, entry.pending, entry.debt)


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
