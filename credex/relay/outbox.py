"""The outbox as the relay and operators see it."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlmodel import Session

from credex.db.models import MessageState, OutboxMessage, utcnow

outbox_table = OutboxMessage.__table__
MESSAGE_STATES = [state.value for state in MessageState]


def message_json(row) -> dict:
    return {
        "message_id": row.id,
        "redemption_id": row.redemption_id,
        "state": row.state,
        "attempts": row.attempts,
        "next_attempt_at": row.next_attempt_at,
        "last_error": row.last_error,
    }


def outbox_status(session: Session) -> dict:
    """Messages per state, and how long the oldest unconfirmed one has waited."""
    counts = dict.fromkeys(MESSAGE_STATES, 0)
    for state, count in session.execute(
        select(outbox_table.c.state, func.count()).group_by(outbox_table.c.state)
    ):
        counts[state] = count
    oldest = session.execute(
        select(func.min(outbox_table.c.created_at)).where(
            outbox_table.c.state.in_([MessageState.pending.value, MessageState.sent.value])
        )
    ).scalar()
    if oldest is not None:
        counts["oldest_unconfirmed_age_seconds"] = round((utcnow() - oldest).total_seconds(), 3)
    else:
        counts["oldest_unconfirmed_age_seconds"] = None
    return counts


def list_messages(session: Session, *, state: str | None = None, limit: int = 50) -> list[dict]:
    query = select(outbox_table).order_by(outbox_table.c.created_at.desc(), outbox_table.c.id).limit(limit)
    if state is not None:
        query = query.where(outbox_table.c.state == state)
    return [message_json(row) for row in session.execute(query)]


def message_state(session: Session, message_id: str) -> str | None:
    return session.execute(select(outbox_table.c.state).where(outbox_table.c.id == message_id)).scalar()
