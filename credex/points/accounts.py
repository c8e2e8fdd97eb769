"""Reading accounts and their ledger."""

from __future__ import annotations

from sqlalchemy import select
from sqlmodel import Session

from credex.db import tables
from credex.errors import UnknownUser
from credex.points.awards import with_lifecycle
from credex.points.lifecycle import expiring
from credex.points.lots import whole_counters
from credex.points.rules import check_user_id

_account = tables.account
_ledger = tables.ledger_entry


def get_account(session: Session, user_id: str) -> dict:
    """The balance (spendable), the pending points (waiting for their return window), the debt
    (refunds the balance could not cover) and when the balance's points expire."""
    user_id = check_user_id(user_id)
    row = session.execute(select(_account).where(_account.c.user_id == user_id)).first()
    if row is None:
        raise UnknownUser(f"no account for user {user_id} (an account is created by its first award)")
    whole_counters(user_id, (row.balance, row.earned, row.redeemed, row.pending, row.debt))
    return {
        "user_id": row.user_id,
        "balance": row.balance,
        "earned": row.earned,
        "redeemed": row.redeemed,
        "updated_at": row.updated_at,
        "pending": row.pending,
        "debt": row.debt,
        "expiring": expiring(session, user_id),
    }


def history(session: Session, user_id: str, *, limit: int = 50) -> list[dict]:
    """Ledger entries, newest first. ``points`` is each entry's effect on the balance; entries
    that moved pending points or debt also carry ``pending`` and ``debt`` (negative: paid)."""
    user_id = check_user_id(user_id)
    exists = session.execute(select(_account.c.user_id).where(_account.c.user_id == user_id)).first()
    if exists is None:
        raise UnknownUser(f"no account for user {user_id} (an account is created by its first award)")
    rows = session.execute(
        select(_ledger).where(_ledger.c.user_id == user_id).order_by(_ledger.c.id.desc()).limit(limit)
    )
    return [
        with_lifecycle(
            {
                "entry_id": row.id,
                "kind": row.kind,
                "ref": row.ref,
                "points": row.points,
                "balance": row.balance,
                "operator": row.operator,
                "reason": row.reason,
                "created_at": row.created_at,
            },
            row.pending,
            row.debt,
        )
        for row in rows
    ]
