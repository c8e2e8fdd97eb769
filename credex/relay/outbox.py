"""The outbox as the relay works it: claiming due messages, recording what the broker and the
warehouse said. The operators' commands are in ``credex.relay.operators``.

Every function runs inside the caller's transaction (the caller commits); how a relay holds a
batch, and so which of them it uses, is ``credex.relay.claims``'s business.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Boolean, String, any_, bindparam, case, func, insert, or_, select, text, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal
from sqlmodel import Session

from credex.db import tables
from credex.db.models import EventSource, MessageState, RedemptionStatus
from credex.relay.topology import REDEMPTION_CANCELLED, REDEMPTION_CREATED
from credex.retry import Backoff

outbox_table = tables.outbox_message
_redemption = tables.redemption
_event = tables.redemption_event
_RELAY = EventSource.relay.value

_PENDING = MessageState.pending.value
_SENT = MessageState.sent.value
_CONFIRMED = MessageState.confirmed.value
_DEAD = MessageState.dead.value
_UNCONFIRMED = (_PENDING, _SENT)
# Nothing more to record on these: confirmed, or withdrawn (its redemption was cancelled).
_SETTLED = (_CONFIRMED, MessageState.cancelled.value)
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


class _OneOf(ColumnElement[bool]):
    """``id IN (:ids…)``, on Postgres ``id = ANY(:ids)``: one array parameter there, so the
    statement is the same text for any number of ids and the driver prepares it once."""

    inherit_cache = True
    type = Boolean()
    _is_implicitly_boolean = True  # a condition as it is, not "… = 1" where booleans are integers
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]

    def __init__(self, column) -> None:
        self.column = column


@compiles(_OneOf)
def _one_of_in(element: _OneOf, compiler, **kw) -> str:
    return compiler.process(element.column.in_(bindparam("ids", expanding=True)), **kw)


@compiles(_OneOf, "postgresql")
def _one_of_any(element: _OneOf, compiler, **kw) -> str:
    from sqlalchemy.dialects.postgresql import ARRAY

    return compiler.process(element.column == any_(bindparam("ids", type_=ARRAY(String))), **kw)


_IDS_MATCH = _OneOf(_o.id)  # takes the parameter ``ids``: a list of message ids
# Written out, not bound: a database uses the partial index ix_outbox_message_due only when the
# query says what its WHERE says (a bound parameter proves nothing to a planner).
_UNCONFIRMED_LITERAL = text("outbox_message.state IN ('pending', 'sent')")
_CLAIMABLE = (
    _UNCONFIRMED_LITERAL,
    _o.next_attempt_at <= _NOW,
    or_(_o.claimed_until.is_(None), _o.claimed_until < _NOW),
)
# Postgres holds its claims as row locks, which go with a crashed relay: a message is published
# only once a claim on it was committed (``first_claimed_at``, by _MARK_FRESH), so that
# `redeem cancel` can tell a message no relay ever held from one the broker may have.
_FRESH_LITERAL = text("outbox_message.state = 'pending' AND outbox_message.first_claimed_at IS NULL")
_MARK_FRESH = (
    update(outbox_table)
    .where(
        _o.id.in_(
            select(_o.id)
            .where(_FRESH_LITERAL, _o.next_attempt_at <= _NOW)
            .order_by(_o.next_attempt_at, _o.id)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(first_claimed_at=_NOW)
)
_DUE = (
    select(_o.id, _o.routing_key, _o.body, _o.attempts, _o.state)
    .where(*_CLAIMABLE, _o.first_claimed_at.is_not(None))
    .order_by(_o.next_attempt_at, _o.id)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)
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
    .where(_IDS_MATCH, _o.claimed_by == bindparam("relay"))
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
    rows.sort(key=lambda r: (r.next_attempt_at, r.id))  # RETURNING keeps no order: publish the oldest first
    return [ClaimedMessage(r.id, r.routing_key, r.body, r.attempts, r.state) for r in rows]


def mark_fresh_messages(session: Session, *, limit: int, now: datetime) -> int:
    """Postgres: commit a first claim on up to ``limit`` due messages no relay ever claimed, before
    ``lock_due_messages`` may take them (the caller commits, durably). Returns how many."""
    return session.execute(_MARK_FRESH, {"now": now, "limit": limit}).rowcount


def lock_due_messages(session: Session, *, limit: int, now: datetime) -> list[ClaimedMessage]:
    """Row locks (Postgres): up to ``limit`` due messages, locked by the session's transaction
    until it ends, passing by those another transaction holds. Nothing is written: the claim is
    the lock, and a relay that dies releases it with its connection."""
    rows = session.execute(_DUE, {"now": now, "limit": limit}).all()
    return [ClaimedMessage(r.id, r.routing_key, r.body, r.attempts, r.state) for r in rows]


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
            }
        )
        tally.failed += 1
        tally.dead += dead
    if sent:
        mark_sent = (
            update(outbox_table)
            .where(_IDS_MATCH, still_claimed, _o.state.in_(_UNCONFIRMED))
            .values(
                last_error=case((_o.state == _SENT, REPUBLISHED), else_=None),
                state=_SENT,
                attempts=bindparam("n"),
                sent_at=bindparam("now", type_=_o.sent_at.type),
                next_attempt_at=bindparam("due", type_=_o.next_attempt_at.type),
                claimed_by=None,
                claimed_until=None,
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
            ),
            failed,
        )
    return tally


@dataclass(frozen=True)
class Confirmation:
    """The warehouse's shipment.requested, as the relay needs it."""

    message_id: str
    carrier: str | None
    express_no: str | None


_ST = RedemptionStatus
# The waybill is copied while the redemption may still ship (a cancel on its way too); it moves to
# shipping only from pending (or exception: the carrier took it after all). A late confirmation
# for a cancelled, delivered or returned redemption changes nothing.
_WAYBILL = (  # executemany takes no IN lists
    update(_redemption)
    .where(
        _redemption.c.id == bindparam("rid"),
        or_(
            *(
                _redemption.c.status == status.value
                for status in (_ST.pending, _ST.exception, _ST.cancelling, _ST.shipping)
            )
        ),
    )
    .values(carrier=bindparam("carrier"), express_no=bindparam("express_no"), updated_at=bindparam("now"))
)
_SHIP = (
    update(_redemption)
    .where(
        _redemption.c.id.in_(bindparam("rids", expanding=True)),
        _redemption.c.status.in_((_ST.pending.value, _ST.exception.value)),
    )
    .values(status=_ST.shipping.value)
    .returning(_redemption.c.id)
)
_CONFIRM = (
    update(outbox_table)
    .where(
        _o.id.in_(
            select(_o.id)
            .where(_IDS_MATCH, _o.state.not_in(_SETTLED))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(
        state=_CONFIRMED,
        confirmed_at=bindparam("now", type_=_o.confirmed_at.type),
        claimed_by=None,
        claimed_until=None,
    )
    .returning(_o.id, _o.redemption_id, _o.created_at)
)
_STILL_OPEN = select(_o.id).where(_IDS_MATCH, _o.state.not_in(_SETTLED))


def record_confirmations(
    session: Session,
    confirmations: Iterable[Confirmation],
    *,
    now: datetime,
    created: list[datetime] | None = None,
) -> tuple[int, list[str]]:
    """Mark the messages confirmed and copy carrier and express number onto their redemptions
    (the caller commits). A confirmation for a message already confirmed or withdrawn changes
    nothing (a dead one is confirmed: the warehouse did ship it). Returns (how many were confirmed now, the
    message ids put off): a message a relay holds locked right now (Postgres) is left for a moment
    later rather than waited for, which could be waiting on ourselves. ``created`` gets the time
    each message confirmed now was written (the relay's confirm-latency histogram)."""
    first: dict[str, Confirmation] = {}
    for confirmation in confirmations:
        first.setdefault(confirmation.message_id, confirmation)
    confirmed, put_off = 0, []
    ids = list(first)
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        rows = session.execute(_CONFIRM, {"ids": chunk, "now": now}).all()
        if created is not None:
            created.extend(row.created_at for row in rows)
        ships = [
            {
                "rid": row.redemption_id,
                "carrier": first[row.id].carrier,
                "express_no": first[row.id].express_no,
                "now": now,
            }
            for row in rows
            if row.redemption_id is not None
        ]
        if ships:
            session.execute(_WAYBILL, ships)
            shipped = session.execute(_SHIP, {"rids": [ship["rid"] for ship in ships]}).scalars().all()
            if shipped:
                session.execute(
                    insert(_event),
                    [
                        {
                            "redemption_id": rid,
                            "at": now,
                            "status": _ST.shipping.value,
                            "source": _RELAY,
                            "detail": None,
                        }
                        for rid in shipped
                    ],
                )
        confirmed += len(rows)
        if len(rows) < len(chunk):  # repeats, or held: those still open are put off
            done = {row.id for row in rows}
            rest = [m for m in chunk if m not in done]
            put_off += session.execute(_STILL_OPEN, {"ids": rest}).scalars().all()
    return confirmed, put_off


# --- the answers to a cancel, and final refusals ------------------------------------------------


@dataclass(frozen=True)
class CancelAnswer:
    """The warehouse's shipment.cancelled: ``message_id`` is the message it answers."""

    message_id: str
    outcome: str  # "cancelled" or "refused"
    reason: str | None


@dataclass(frozen=True)
class FailedAnswer:
    """The warehouse's shipment.failed: the carrier refused the shipment for good."""

    message_id: str
    reason: str


CANCEL_OUTCOMES = ("cancelled", "refused")
_OPEN = (_PENDING, _SENT)
_WITHDRAWN = MessageState.cancelled.value


def _lock_redemptions(session: Session, message_ids: list[str]) -> None:
    """Lock the answered messages' redemptions up front, in id order (Postgres): a refund then
    locks an account, as `redeem cancel` and `track sync` do after the one redemption they lock,
    so a batch of answers never waits on them in a cycle."""
    for start in range(0, len(message_ids), CHUNK):
        rids = select(_o.redemption_id).where(_o.id.in_(message_ids[start : start + CHUNK]))
        session.execute(
            select(_redemption.c.id)
            .where(_redemption.c.id.in_(rids))
            .order_by(_redemption.c.id)
            .with_for_update()
        ).all()


def _hold(session: Session, message_id: str):
    """The message's row, locked (Postgres: None when a relay holds it right now; the caller
    tells that from an unknown id with ``_exists``)."""
    return session.execute(
        select(_o.id, _o.redemption_id, _o.routing_key, _o.state)
        .where(_o.id == message_id)
        .with_for_update(skip_locked=True)
    ).first()


def _exists(session: Session, message_id: str) -> bool:
    return session.execute(select(_o.id).where(_o.id == message_id)).first() is not None


def _confirm_one(session: Session, message_id: str, now: datetime) -> bool:
    return (
        session.execute(
            update(outbox_table)
            .where(_o.id == message_id, _o.state.not_in(_SETTLED))
            .values(state=_CONFIRMED, confirmed_at=now, claimed_by=None, claimed_until=None)
        ).rowcount
        == 1
    )


def _held_once(session: Session, answers: Iterable, put_off: list[str]):
    """Each answer once (repeats in the batch skipped) with its outbox row, locked. An answer
    whose row a relay holds right now goes to ``put_off``; one for an unknown message is dropped."""
    seen: set[str] = set()
    for answer in answers:
        if answer.message_id in seen:
            continue
        seen.add(answer.message_id)
        message = _hold(session, answer.message_id)
        if message is None:
            if _exists(session, answer.message_id):
                put_off.append(answer.message_id)
            continue
        yield answer, message


def record_cancel_answers(
    session: Session, answers: Iterable[CancelAnswer], *, now: datetime, operator: str
) -> tuple[int, list[str]]:
    """Record shipment.cancelled answers (the caller commits). "cancelled": the answered message is
    confirmed, a ``cancelling`` redemption is refunded and ``cancelled``, and its other unconfirmed
    messages are settled (its redemption.created withdrawn, its redemption.cancelled confirmed: the
    warehouse's answer covers them). "refused": ``cancelling`` → ``shipping``, the reason in its
    event. A repeated or late answer changes nothing. Returns (answers that changed something,
    message ids put off because a relay holds one of the rows right now)."""
    from credex.points.cancels import refund_redemption
    from credex.points.redemptions import add_event

    answers = list(answers)
    _lock_redemptions(session, [a.message_id for a in answers])
    changed, put_off = 0, []
    for answer, message in _held_once(session, answers, put_off):
        rid = message.redemption_id
        if rid is None:
            continue
        if answer.outcome == "cancelled":
            others = select(_o.id).where(_o.redemption_id == rid, _o.state.in_(_OPEN), _o.id != message.id)
            held = session.execute(others.with_for_update(skip_locked=True)).scalars().all()
            if len(held) < len(session.execute(others).scalars().all()):
                put_off.append(answer.message_id)  # a relay is publishing one of them: a moment later
                continue
            confirmed = _confirm_one(session, message.id, now)
            refund = refund_redemption(
                session,
                rid,
                from_statuses=(_ST.cancelling.value,),
                to_status=_ST.cancelled,
                source=EventSource.warehouse,
                detail=answer.reason or "cancelled by the warehouse",
                operator=operator,
                now=now,
            )
            if refund is not None and held:
                session.execute(
                    update(outbox_table)
                    .where(_o.id.in_(held), _o.state.in_(_OPEN))
                    .values(
                        state=case((_o.routing_key == REDEMPTION_CANCELLED, _CONFIRMED), else_=_WITHDRAWN),
                        confirmed_at=case((_o.routing_key == REDEMPTION_CANCELLED, now), else_=None),
                        last_error=case(
                            (_o.routing_key == REDEMPTION_CANCELLED, None),
                            else_="withdrawn: the warehouse cancelled the redemption",
                        ),
                        claimed_by=None,
                        claimed_until=None,
                    )
                )
            changed += bool(confirmed or refund)
        else:
            confirmed = _confirm_one(session, message.id, now)
            moved = session.execute(
                update(_redemption)
                .where(_redemption.c.id == rid, _redemption.c.status == _ST.cancelling.value)
                .values(status=_ST.shipping.value, updated_at=now)
            ).rowcount
            if moved:
                detail = "cancel refused by the warehouse" + (f": {answer.reason}" if answer.reason else "")
                add_event(
                    session,
                    rid,
                    status=_ST.shipping.value,
                    source=EventSource.warehouse,
                    detail=detail,
                    now=now,
                )
            changed += bool(confirmed or moved)
    return changed, put_off


def record_failures(
    session: Session, answers: Iterable[FailedAnswer], *, now: datetime
) -> tuple[int, list[str]]:
    """Record shipment.failed answers (the caller commits): the redemption.created message is
    ``dead`` with the reason as its last error, and its redemption (pending or shipping) moves to
    ``exception`` until `relay retry` sends it again or `redeem cancel` refunds it. A repeated or
    late answer (the message confirmed, dead or withdrawn already) changes nothing."""
    from credex.points.redemptions import add_event

    changed, put_off = 0, []
    for answer, message in _held_once(session, answers, put_off):
        if message.routing_key != REDEMPTION_CREATED or message.state not in _OPEN:
            continue
        session.execute(
            update(outbox_table)
            .where(_o.id == message.id, _o.state.in_(_OPEN))
            .values(state=_DEAD, last_error=answer.reason[:1000], claimed_by=None, claimed_until=None)
        )
        changed += 1
        if message.redemption_id is None:
            continue
        moved = session.execute(
            update(_redemption)
            .where(
                _redemption.c.id == message.redemption_id,
                _redemption.c.status.in_((_ST.pending.value, _ST.shipping.value)),
            )
            .values(status=_ST.exception.value, updated_at=now)
        ).rowcount
        if moved:
            add_event(
                session,
                message.redemption_id,
                status=_ST.exception.value,
                source=EventSource.relay,
                detail=f"the carrier refused the shipment: {answer.reason}",
                now=now,
            )
    return changed, put_off
