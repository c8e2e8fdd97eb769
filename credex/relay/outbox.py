"""The outbox as the relay works it: claiming due messages and recording what the broker said of
each publish. What the warehouse's answers do is ``credex.relay.answers``'s; the operators'
commands are in ``credex.relay.operators``.

Every function runs inside the caller's transaction (the caller commits); how a relay holds a
batch, and so which of them it uses, is ``credex.relay.claims``'s business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import DateTime, bindparam, case, func, or_, select, text, type_coerce, update
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session

from credex.db import tables
from credex.db.models import MessageState
from credex.db.sql import one_of
from credex.retry import Backoff

outbox_table = tables.outbox_message

_PENDING = MessageState.pending.value
_SENT = MessageState.sent.value
_CONFIRMED = MessageState.confirmed.value
_DEAD = MessageState.dead.value
_UNCONFIRMED = (_PENDING, _SENT)
REPUBLISHED = "not confirmed by its due time: published again"
CHUNK = 1000  # ids per IN list: far below SQLite's limit on variables


@dataclass(frozen=True)
class ClaimedMessage:
    id: str
    routing_key: str
    body: str
    attempts: int  # publishes before this one
    state: str


@dataclass(frozen=True)
class RedeliveryPolicy:
    """How long to wait for the warehouse after a publish before publishing again (doubling per
    attempt, to a cap), and when to give up (``max_attempts`` 0: never)."""

    confirm_timeout: float = 60.0
    max_confirm_timeout: float = 3600.0
    max_attempts: int = 0

    def confirm_wait(self, attempt: int) -> timedelta:
        backoff = Backoff(self.confirm_timeout, max(self.confirm_timeout, self.max_confirm_timeout))
        return timedelta(seconds=backoff.delay(attempt))

    def failure_wait(self, attempt: int) -> timedelta:
        # The broker refused or went away: try again soon, sooner than a missing confirmation.
        backoff = Backoff(min(1.0, self.confirm_timeout), self.confirm_timeout)
        return timedelta(seconds=backoff.delay(attempt))

    def exhausted(self, attempts: int) -> bool:
        return self.max_attempts > 0 and attempts >= self.max_attempts


# The relay's statements, built once (SQLAlchemy caches their compiled form; building them is
# what would cost, many times a second in an idle relay). ``FOR UPDATE SKIP LOCKED`` is in every
# one that reads rows a relay may hold: on Postgres a row another transaction holds is passed by,
# never waited for (that could be waiting on ourselves); SQLite has no row locks and renders none.
_o = outbox_table.c
_NOW = bindparam("now", type_=_o.next_attempt_at.type)


IDS_MATCH = one_of(_o.id, "ids")  # a list of message ids
# Written out, not bound: a database uses the partial index ix_outbox_message_due only when the
# query says what its WHERE says (a bound parameter proves nothing to a planner).
_UNCONFIRMED_LITERAL = text("outbox_message.state IN ('pending', 'sent')")
_CLAIMABLE = (
    _UNCONFIRMED_LITERAL,
    _o.next_attempt_at <= _NOW,
    or_(_o.claimed_until.is_(None), _o.claimed_until < _NOW),
)
# Postgres holds its claims as row locks, which go with a crashed relay. So that `redeem cancel`
# can tell a message no relay ever held from one the broker may have, a relay commits one mark
# before it publishes a locked batch: the created_at of the batch's newest fresh message (no
# ``first_claimed_at``) in outbox_claim_mark, never moved back (_MARK_THROUGH, durably). A fresh
# message created after the mark was never published. Postgres only (``LockClaims``).
_DUE = (
    select(
        _o.id,
        _o.routing_key,
        _o.body,
        _o.attempts,
        _o.state,
        # As the driver reads it (Postgres: with its offset): only the batch's maximum is used,
        # so the column type's conversion of every row is skipped.
        type_coerce(_o.created_at, DateTime(timezone=True)).label("created_at"),
        _o.first_claimed_at.is_(None).label("fresh"),
    )
    .where(*_CLAIMABLE)
    .order_by(_o.next_attempt_at, _o.id)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)
_MARK_THROUGH = text(
    "INSERT INTO outbox_claim_mark (id, through) VALUES (1, :through) ON CONFLICT (id) DO UPDATE "
    "SET through = greatest(outbox_claim_mark.through, excluded.through)"
).bindparams(bindparam("through", type_=tables.outbox_claim_mark.c.through.type))
_CLAIM_LEASE = (
    update(outbox_table)
    .where(
        _o.id.in_(
            select(_o.id)
            .where(*_CLAIMABLE)
            .order_by(_o.next_attempt_at, _o.id)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(
        claimed_by=bindparam("relay"),
        claimed_until=bindparam("until", type_=_o.claimed_until.type),
        first_claimed_at=func.coalesce(_o.first_claimed_at, _NOW),
    )
    .returning(_o.id, _o.routing_key, _o.body, _o.attempts, _o.state, _o.next_attempt_at)
)
_BURY = (
    update(outbox_table)
    .where(
        _o.id.in_(
            select(_o.id)
            .where(*_CLAIMABLE, _o.attempts >= bindparam("max_attempts"))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(state=_DEAD, claimed_by=None, claimed_until=None, last_error=bindparam("error"))
)
_RELEASE_LEASE = (
    update(outbox_table)
    .where(IDS_MATCH, _o.claimed_by == bindparam("relay"))
    .values(claimed_by=None, claimed_until=None)
)
_STILL_UNCONFIRMED = or_(_o.state == _PENDING, _o.state == _SENT)  # executemany takes no IN lists


def bury_exhausted(session: Session, *, max_attempts: int, now: datetime) -> int:
    """Due messages that used up their attempts become dead (listed for an operator); one a relay
    holds right now is left for later."""
    error = f"no confirmation after {max_attempts} attempts"
    return session.execute(_BURY, {"now": now, "max_attempts": max_attempts, "error": error}).rowcount


def claim_due_messages(
    session: Session, *, relay_id: str, limit: int, lease: float, now: datetime
) -> list[ClaimedMessage]:
    """A lease: take up to ``limit`` due messages for ``relay_id`` until ``now + lease``; once
    committed, relays running at once never publish the same due message in one round. A relay
    that dies leaves its lease behind, and the messages are due again when it runs out."""
    until = now + timedelta(seconds=lease)
    rows = session.execute(
        _CLAIM_LEASE, {"now": now, "limit": limit, "relay": relay_id, "until": until}
    ).all()
    # RETURNING keeps no order: publish the oldest first (next_attempt_at, id). Unpacked by
    # position, as in lock_due_messages.
    rows.sort(key=lambda row: (row[5], row[0]))
    return [
        ClaimedMessage(message_id, routing_key, body, attempts, state)
        for message_id, routing_key, body, attempts, state, _due in rows
    ]


@dataclass(frozen=True)
class LockedBatch:
    messages: list[ClaimedMessage]
    newest_fresh: datetime | None  # the created_at of the newest message no relay claimed before


def lock_due_messages(session: Session, *, limit: int, now: datetime) -> LockedBatch:
    """Row locks (Postgres): up to ``limit`` due messages, locked by the session's transaction
    until it ends, passing by those another transaction holds. Nothing is written: the claim is
    the lock, and a relay that dies releases it with its connection. Before publishing them the
    caller commits ``mark_claimed_through(newest_fresh)`` on another connection."""
    rows = session.execute(_DUE, {"now": now, "limit": limit}).all()
    # Unpacked by position: a Row's attribute lookup is Python code, about 1 us a column.
    messages, fresh = [], []
    for message_id, routing_key, body, attempts, state, created_at, is_fresh in rows:
        messages.append(ClaimedMessage(message_id, routing_key, body, attempts, state))
        if is_fresh:
            fresh.append(created_at)
    return LockedBatch(messages, max(fresh) if fresh else None)


def mark_claimed_through(session: Session, through: datetime) -> None:
    """Postgres: every fresh message created up to ``through`` may be published from now on
    (outbox_claim_mark; the caller commits, durably, before publishing)."""
    session.execute(_MARK_THROUGH, {"through": through})


def release_lease(session: Session, *, relay_id: str, message_ids: Sequence[str]) -> None:
    """Give up ``relay_id``'s lease on ``message_ids`` before it runs out (the caller commits)."""
    for start in range(0, len(message_ids), CHUNK):
        session.execute(_RELEASE_LEASE, {"ids": list(message_ids[start : start + CHUNK]), "relay": relay_id})


@dataclass
class PublishTally:
    sent: int = 0
    failed: int = 0
    dead: int = 0


def record_publish_outcomes(
    session: Session,
    *,
    claimed: Sequence[ClaimedMessage],
    outcomes: dict[str, str | None],
    policy: RedeliveryPolicy,
    now: datetime,
    still_claimed: ColumnElement[bool],
) -> PublishTally:
    """What the broker said about each claimed message (the caller commits): confirmed ones are
    ``sent`` and due again when the warehouse had time to confirm; the others keep their state,
    carry the reason in ``last_error`` and are due again soon (or dead past ``max_attempts``).
    A message is never marked sent unless the broker confirmed it. ``still_claimed`` says that a
    row is still this relay's claim (its lease, not one that ran out and was taken over; or
    simply true when the transaction holds the rows locked)."""
    tally = PublishTally()
    sent: dict[int, list[str]] = {}  # attempt -> message ids: one statement each, not one per message
    failed = []
    for message in claimed:
        attempt = message.attempts + 1
        error = outcomes.get(message.id, "not published")
        if error is None:
            sent.setdefault(attempt, []).append(message.id)
            tally.sent += 1
            continue
        dead = policy.exhausted(attempt)
        failed.append(
            {
                "mid": message.id,
                "n": attempt,
                "error": error[:1000],
                "new_state": _DEAD if dead else message.state,
                "due": now + policy.failure_wait(attempt),
                "now": now,
            }
        )
        tally.failed += 1
        tally.dead += dead
    if sent:
        mark_sent = (
            update(outbox_table)
            .where(IDS_MATCH, still_claimed, _o.state.in_(_UNCONFIRMED))
            .values(
                last_error=case((_o.state == _SENT, REPUBLISHED), else_=None),
                state=_SENT,
                attempts=bindparam("n"),
                sent_at=bindparam("now", type_=_o.sent_at.type),
                next_attempt_at=bindparam("due", type_=_o.next_attempt_at.type),
                claimed_by=None,
                claimed_until=None,
                first_claimed_at=func.coalesce(_o.first_claimed_at, _NOW),
            )
        )
        for attempt, ids in sent.items():
            due = now + policy.confirm_wait(attempt)
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                session.execute(mark_sent, {"ids": chunk, "n": attempt, "now": now, "due": due})
    if failed:
        session.execute(
            update(outbox_table)
            .where(_o.id == bindparam("mid"), still_claimed, _STILL_UNCONFIRMED)
            .values(
                state=bindparam("new_state"),
                attempts=bindparam("n"),
                next_attempt_at=bindparam("due"),
                last_error=bindparam("error"),
                claimed_by=None,
                claimed_until=None,
                first_claimed_at=func.coalesce(_o.first_claimed_at, _NOW),
            ),
            failed,
        )
    return tally
