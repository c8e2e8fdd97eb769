"""Reading accounts and their ledger."""

from __future__ import annotations

from sqlalchemy import select
from sqlmodel import Session

from credex.db.models import Account, LedgerEntry
from credex.errors import UnknownUser

_account = Account.__table__
_ledger = LedgerEntry.__table__


def get_account(session: Session, user_id: str) -> dict:
    row = session.execute(select(_account).where(_account.c.user_id == user_id)).first()
    if row is None:
        raise UnknownUser(f"no account for user {user_id} (an account is created by its first award)")
    return {
        "user_id": row.user_id,
        "balance": row.balance,
        "earned": row.earned,
        "redeemed": row.redeemed,
        "updated_at": row.updated_at,
    }


def history(session: Session, user_id: str, *, limit: int = 50) -> list[dict]:
    get_account(session, user_id)
    rows = session.execute(
        select(_ledger).where(_ledger.c.user_id == user_id).order_by(_ledger.c.id.desc()).limit(limit)
    )
    return [
        {
            "entry_id": row.id,
            "kind": row.kind,
            "ref": row.ref,
            "points": row.points,
            "balance": row.balance,
            "operator": row.operator,
            "reason": row.reason,
            "created_at": row.created_at,
        }
        for row in rows
    ]
