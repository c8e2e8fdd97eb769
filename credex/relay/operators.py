"""The outbox as operators see it: messages per state, the list, making messages due again, and
purging old confirmed ones (``credex relay status|list|retry|purge``). Kept apart from the relay's
statements so that these commands start without building them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import case, delete, func, select, update
from sqlmodel import Session

from credex.db import tables
from credex.db.models import MessageState, utcnow
from credex.errors import UnknownMessage

outbox_table = tables.outbox_message
MESSAGE_STATES = [state.value for state in MessageState]

_PENDING = MessageState.pending.value
_SENT = MessageState.sent.value
_CONFIRMED = MessageState.confirmed.value
_DEAD = MessageState.dead.value
_WITHDRAWN = MessageState.cancelled.value
CHUNK = 1000  # ids per IN list: far below SQLite's limit on variables


def message_json(row) -> dict:
    return {
        "message_id": row.id,
        "redemption_id": row.redemption_id,
        "routing_key": row.routing_key,
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
        select(func.min(outbox_table.c.created_at)).where(outbox_table.c.state.in_((_PENDING, _SENT)))
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


def retry_messages(
    session: Session, message_ids: Sequence[str] = (), *, dead: bool = False, now: datetime | None = None
) -> dict:
    """Make messages due now: the given ones, or every dead one. A dead message comes back as
    pending with a fresh count of attempts; a confirmed one is left alone. An unknown id
    refuses the whole command before anything changes."""
    now = now or utcnow()
    o = outbox_table.c
    if dead:
        chosen = select(o.id, o.state).where(o.state == _DEAD)
    else:
        chosen = select(o.id, o.state).where(o.id.in_(list(message_ids)))
    states = {row.id: row.state for row in session.execute(chosen)}
    unknown = [m for m in message_ids if m not in states]
    if unknown:
        session.rollback()
        raise UnknownMessage(f"no outbox message {', '.join(unknown)}")
    retried = sorted(m for m, s in states.items() if s not in (_CONFIRMED, _WITHDRAWN))
    revived = [m for m in retried if states[m] == _DEAD]
    for start in range(0, len(revived), CHUNK):
        _back_to_pending(session, revived[start : start + CHUNK], now)
    for start in range(0, len(retried), CHUNK):
        session.execute(
            update(outbox_table)
            .where(o.id.in_(retried[start : start + CHUNK]), o.state.not_in((_CONFIRMED, _WITHDRAWN)))
            .values(
                attempts=case((o.state == _DEAD, 0), else_=o.attempts),
                state=case((o.state == _DEAD, _PENDING), else_=o.state),
                next_attempt_at=now,
            )
        )
    session.commit()
    # A withdrawn message (its redemption cancelled) is never sent again: neither retried nor confirmed.
    return {"retried": retried, "already_confirmed": sorted(m for m, s in states.items() if s == _CONFIRMED)}


def _back_to_pending(session: Session, message_ids: list[str], now: datetime) -> None:
    """The redemptions whose redemption.created came back from dead leave ``exception``: the
    warehouse gets the message again (the carrier's refusal fixed, it asks again)."""
    from credex.db.models import EventSource, RedemptionStatus
    from credex.points.redemptions import add_event

    r = tables.redemption.c
    o = outbox_table.c
    moved = (
        session.execute(
            update(tables.redemption)
            .where(
                r.status == RedemptionStatus.exception.value,
                r.id.in_(
                    select(o.redemption_id).where(
                        o.id.in_(message_ids), o.routing_key == "redemption.created"
                    )
                ),
            )
            .values(status=RedemptionStatus.pending.value, updated_at=now)
            .returning(r.id)
        )
        .scalars()
        .all()
    )
    for redemption_id in moved:
        add_event(
            session,
            redemption_id,
            status=RedemptionStatus.pending.value,
            source=EventSource.relay,
            detail="relay retry: its message is due again",
            now=now,
        )


def purge_confirmed(session: Session, *, older_than: timedelta, dry_run: bool = False) -> dict:
    """Delete messages confirmed more than ``older_than`` ago (their redemptions keep the id)."""
    before = utcnow() - older_than
    o = outbox_table.c
    condition = (o.state == _CONFIRMED, o.confirmed_at < before)
    if dry_run:
        count = session.execute(select(func.count()).select_from(outbox_table).where(*condition)).scalar_one()
        session.rollback()
    else:
        count = session.execute(delete(outbox_table).where(*condition)).rowcount
        session.commit()
    return {"purged": count, "confirmed_before": before, "dry_run": dry_run}
