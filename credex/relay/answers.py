"""What the warehouse's answers do to the outbox and the redemptions, recorded by the relay:
shipment.requested (``record_confirmations``: the message confirmed, the waybill copied, the
redemption ``shipping``), shipment.cancelled (``record_cancel_answers``: refunded, or back to
``shipping``) and shipment.failed (``record_failures``: dead, the redemption ``exception``).

Every function runs inside the caller's transaction (the caller commits). A row a relay holds
locked right now (Postgres) is put off, never waited for: the caller tries it again a moment later.
An answer whose body names another redemption than its message's, or that answers a message the
outbox does not know, records nothing (``Dropped``).

(Over 400 lines on purpose: the three kinds of answer share their checks, ``_held_once`` and
``Dropped``, and the outbox's statements; apart, each module would reach into the other.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import bindparam, case, insert, literal, null, or_, select, tuple_, update
from sqlmodel import Session

from credex.db import tables
from credex.db.models import EventSource, MessageState, RedemptionStatus
from credex.db.sql import is_postgres, one_of, unnested
from credex.relay.outbox import CHUNK, IDS_MATCH, outbox_table
from credex.relay.topology import REDEMPTION_CANCELLED, REDEMPTION_CREATED

_o = outbox_table.c
_redemption = tables.redemption
_event = tables.redemption_event
_RELAY = EventSource.relay.value
_PENDING = MessageState.pending.value
_SENT = MessageState.sent.value
_CONFIRMED = MessageState.confirmed.value
_DEAD = MessageState.dead.value
# Nothing more to record on these: confirmed, or withdrawn (its redemption was cancelled).
_SETTLED = (_CONFIRMED, MessageState.cancelled.value)


@dataclass(frozen=True)
class Confirmation:
    """The warehouse's shipment.requested, as the relay needs it."""

    message_id: str
    carrier: str | None
    express_no: str | None
    redemption_id: int | None = None  # the body's; None: it names none (the first warehouses')


@dataclass
class Dropped:
    """Answers that record nothing, for the relay to report: those for a message the outbox does
    not know (``unknown``: no repeat, nothing was ever confirmed for them), and those whose body
    names another redemption than their message's (``mismatched``: message id -> the message's own
    redemption), a mix-up of the warehouse's: the message stays unconfirmed, and the relay's next
    publish of it brings the right answer."""

    unknown: set[str] = field(default_factory=set)
    mismatched: dict[str, int | None] = field(default_factory=dict)


def _names_another(answer, redemption_id: int | None) -> bool:
    return answer.redemption_id is not None and answer.redemption_id != redemption_id


_ST = RedemptionStatus
# The waybill is copied while the redemption may still ship (a cancel on its way too); it moves to
# shipping only from pending (or exception: the carrier took it after all). A late confirmation
# for a cancelled, delivered or returned redemption changes nothing.
_TO_SHIPPING = (_ST.pending.value, _ST.exception.value)
_STILL_SHIPPING = (_ST.cancelling.value, _ST.shipping.value)


def _copy_postgres(statuses: tuple[str, ...], **values: object):
    """Postgres: ``_ship``'s copy as UPDATE … FROM one array per column (one text for any number
    of redemptions)."""
    w = unnested(
        "w",
        id=_redemption.c.id.type,
        carrier=_redemption.c.carrier.type,
        express_no=_redemption.c.express_no.type,
    )
    return (
        update(_redemption)
        .where(_redemption.c.id == w.c.id, _redemption.c.status.in_(statuses))
        .values(
            carrier=w.c.carrier,
            express_no=w.c.express_no,
            updated_at=bindparam("now", type_=_redemption.c.updated_at.type),
            **values,
        )
        .returning(_redemption.c.id)
    )


_SHIP_POSTGRES = _copy_postgres(_TO_SHIPPING, status=_ST.shipping.value)
_STILL_SHIPPING_POSTGRES = _copy_postgres(_STILL_SHIPPING)


def _ship(session: Session, waybills: dict[int, Confirmation], now: datetime) -> list[int]:
    """Carrier and express number onto many redemptions (redemption id -> its confirmation): one
    statement for those that move to ``shipping`` now, and one more only for the rest that may
    still ship (a repeated confirmation, a cancel on its way), so each row is written once.
    Each row gets its own waybill: on Postgres from one array per column, elsewhere through a
    CASE on its id. Returns the ids now ``shipping``."""

    if is_postgres(session):

        def rows(rids: list[int]) -> dict:
            return {
                "w_id": rids,
                "w_carrier": [waybills[rid].carrier for rid in rids],
                "w_express_no": [waybills[rid].express_no for rid in rids],
                "now": now,
            }

        shipped = session.execute(_SHIP_POSTGRES, rows(list(waybills))).scalars().all()
        rest = sorted(set(waybills) - set(shipped))
        if rest:
            session.execute(_STILL_SHIPPING_POSTGRES, rows(rest))
        return shipped

    def copy(rids: list[int], statuses: tuple[str, ...], **values: object):
        def each(value) -> object:
            return case({rid: value(waybills[rid]) for rid in rids}, value=_redemption.c.id)

        return session.execute(
            update(_redemption)
            .where(_redemption.c.id.in_(rids), _redemption.c.status.in_(statuses))
            .values(
                carrier=each(lambda c: c.carrier),
                express_no=each(lambda c: c.express_no),
                updated_at=now,
                **values,
            )
            .returning(_redemption.c.id)
        )

    shipped = copy(list(waybills), _TO_SHIPPING, status=_ST.shipping.value).scalars().all()
    rest = sorted(set(waybills) - set(shipped))
    if rest:
        copy(rest, _STILL_SHIPPING)
    return shipped


# The confirming statement checks, in its match, that each answer's body names its message's
# redemption (``unnamed``: the ids of the answers that name none; ``named``: (id, redemption id)
# of the others, on Postgres one array per column), so a mismatched answer confirms nothing.
_NAMED = unnested("n", id=_o.id.type, redemption_id=_o.redemption_id.type)


def _confirming(named):
    agrees = or_(one_of(_o.id, "unnamed"), tuple_(_o.id, _o.redemption_id).in_(named))
    return (
        update(outbox_table)
        .where(
            _o.id.in_(
                select(_o.id)
                .where(IDS_MATCH, _o.state.not_in(_SETTLED), agrees)
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


_CONFIRM_POSTGRES = _confirming(select(_NAMED.c.id, _NAMED.c.redemption_id))
_CONFIRM = _confirming(bindparam("named", expanding=True))
_LEFT = select(_o.id, _o.redemption_id, _o.state).where(IDS_MATCH)


def _confirm(session: Session, answers: list[Confirmation], now: datetime):
    """Confirm the messages of ``answers`` that agree with them (one statement); returns the rows
    confirmed now (id, redemption_id, created_at)."""
    named = [a for a in answers if a.redemption_id is not None]
    params = {
        "ids": [a.message_id for a in answers],
        "unnamed": [a.message_id for a in answers if a.redemption_id is None],
        "now": now,
    }
    if is_postgres(session):
        ids, rids = [a.message_id for a in named], [a.redemption_id for a in named]
        return session.execute(_CONFIRM_POSTGRES, params | {"n_id": ids, "n_redemption_id": rids}).all()
    return session.execute(
        _CONFIRM, params | {"named": [(a.message_id, a.redemption_id) for a in named]}
    ).all()


_E = unnested("e", redemption_id=_event.c.redemption_id.type)
# Postgres: the redemptions' "shipping" events as INSERT … SELECT from one array.
_SHIPPING_EVENTS_POSTGRES = insert(_event).from_select(
    ["redemption_id", "at", "status", "source", "detail"],
    select(
        _E.c.redemption_id,
        bindparam("now", type_=_event.c.at.type),
        literal(_ST.shipping.value, _event.c.status.type),
        literal(_RELAY, _event.c.source.type),
        null(),
    ),
)


def _shipping_events(session: Session, shipped: list[int], now: datetime) -> None:
    """The ``shipping`` event of each redemption in ``shipped`` (one statement)."""
    if is_postgres(session):
        session.execute(_SHIPPING_EVENTS_POSTGRES, {"e_redemption_id": shipped, "now": now})
        return
    session.execute(
        insert(_event),
        [
            {"redemption_id": rid, "at": now, "status": _ST.shipping.value, "source": _RELAY, "detail": None}
            for rid in shipped
        ],
    )


def record_confirmations(
    session: Session,
    confirmations: Iterable[Confirmation],
    *,
    now: datetime,
    created: list[datetime] | None = None,
    dropped: Dropped | None = None,
) -> tuple[int, list[str]]:
    """Mark the messages confirmed and copy carrier and express number onto their redemptions
    (the caller commits). A confirmation for a message already confirmed or withdrawn changes
    nothing (a dead one is confirmed: the warehouse did ship it), nor does one ``dropped``. Returns
    (how many were confirmed now, the message ids put off): a message a relay holds locked right
    now (Postgres) is left for a moment later rather than waited for, which could be waiting on
    ourselves. ``created`` gets the time each message confirmed now was written (the relay's
    confirm-latency histogram)."""
    first: dict[str, Confirmation] = {}
    for confirmation in confirmations:
        first.setdefault(confirmation.message_id, confirmation)
    confirmed, put_off = 0, []
    dropped = Dropped() if dropped is None else dropped
    ids = list(first)
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        rows = _confirm(session, [first[m] for m in chunk], now)
        if created is not None:
            created.extend(row.created_at for row in rows)
        ships = {row.redemption_id: first[row.id] for row in rows if row.redemption_id is not None}
        if ships:
            shipped = _ship(session, ships, now)
            if shipped:
                _shipping_events(session, shipped, now)
        confirmed += len(rows)
        if len(rows) < len(chunk):  # repeats, dropped, or held: those still open are put off
            done = {row.id for row in rows}
            rest = [m for m in chunk if m not in done]
            left = {row.id: row for row in session.execute(_LEFT, {"ids": rest})}
            for m in rest:
                row = left.get(m)
                if row is None:
                    dropped.unknown.add(m)
                elif _names_another(first[m], row.redemption_id):
                    dropped.mismatched[m] = row.redemption_id
                elif row.state not in _SETTLED:
                    put_off.append(m)
    return confirmed, put_off


# --- the answers to a cancel, and final refusals ------------------------------------------------


@dataclass(frozen=True)
class CancelAnswer:
    """The warehouse's shipment.cancelled: ``message_id`` is the message it answers."""

    message_id: str
    outcome: str  # "cancelled" or "refused"
    reason: str | None
    redemption_id: int | None = None  # the body's


@dataclass(frozen=True)
class FailedAnswer:
    """The warehouse's shipment.failed: the carrier refused the shipment for good, or the warehouse
    refused a redemption.created that is not its shipment request's (a forged or stale one)."""

    message_id: str
    reason: str
    redemption_id: int | None = None  # the body's


CANCEL_OUTCOMES = ("cancelled", "refused")
_OPEN = (_PENDING, _SENT)
_WITHDRAWN = MessageState.cancelled.value
# The warehouse's "cancelled" means no shipment leaves. Its answer to a cancel finds the redemption
# ``cancelling``; its answer to a create finds it ``pending`` (a stray redemption.cancelled the
# warehouse took for it), which left it there for good, neither shipped nor refunded. A late
# "cancelled" after a refusal (``shipping`` again) changes nothing: the first answer stands.
_CANCELLED_BY_WAREHOUSE = (_ST.cancelling.value, _ST.pending.value)


_LOCK_REDEMPTIONS = (
    select(_redemption.c.id)
    .where(_redemption.c.id.in_(select(_o.redemption_id).where(IDS_MATCH)))
    .order_by(_redemption.c.id)
    .with_for_update()
)


def _lock_redemptions(session: Session, message_ids: list[str]) -> None:
    """Lock the answered messages' redemptions up front, in id order (Postgres): a refund then
    locks an account, as `redeem cancel` and `track sync` do after the one redemption they lock,
    so a batch of answers never waits on them in a cycle."""
    for start in range(0, len(message_ids), CHUNK):
        session.execute(_LOCK_REDEMPTIONS, {"ids": message_ids[start : start + CHUNK]}).all()


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


def _held_once(session: Session, answers: Iterable, put_off: list[str], dropped: Dropped | None):
    """Each answer once (repeats in the batch skipped) with its outbox row, locked. An answer
    whose row a relay holds right now goes to ``put_off``; one for an unknown message, or naming
    another redemption than its message's, to ``dropped``."""
    dropped = Dropped() if dropped is None else dropped
    seen: set[str] = set()
    for answer in answers:
        if answer.message_id in seen:
            continue
        seen.add(answer.message_id)
        message = _hold(session, answer.message_id)
        if message is None:
            if _exists(session, answer.message_id):
                put_off.append(answer.message_id)
            else:
                dropped.unknown.add(answer.message_id)
        elif _names_another(answer, message.redemption_id):
            dropped.mismatched[answer.message_id] = message.redemption_id
        else:
            yield answer, message


def record_cancel_answers(
    session: Session,
    answers: Iterable[CancelAnswer],
    *,
    now: datetime,
    operator: str,
    dropped: Dropped | None = None,
) -> tuple[int, list[str]]:
    """Record shipment.cancelled answers (the caller commits). "cancelled": the answered message is
    confirmed, its ``cancelling`` or ``pending`` redemption is refunded and ``cancelled``, and
    its other unconfirmed messages are settled (its redemption.created withdrawn, its
    redemption.cancelled confirmed: the warehouse's answer covers them). "refused":
    ``cancelling`` → ``shipping``, the reason in its event. A repeated or late answer changes
    nothing, and so does one ``dropped``. Returns (answers that changed something, message ids put
    off because a relay holds one of the rows right now)."""
    from credex.points.cancels import refund_redemption
    from credex.points.redemptions import move_redemption

    answers = list(answers)
    _lock_redemptions(session, [a.message_id for a in answers])
    changed, put_off = 0, []
    for answer, message in _held_once(session, answers, put_off, dropped):
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
                from_statuses=_CANCELLED_BY_WAREHOUSE,
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
            moved = move_redemption(
                session,
                rid,
                from_statuses=(_ST.cancelling.value,),
                to=_ST.shipping,
                source=EventSource.warehouse,
                detail="cancel refused by the warehouse" + (f": {answer.reason}" if answer.reason else ""),
                now=now,
            )
            changed += bool(confirmed or moved)
    return changed, put_off


def record_failures(
    session: Session, answers: Iterable[FailedAnswer], *, now: datetime, dropped: Dropped | None = None
) -> tuple[int, list[str]]:
    """Record shipment.failed answers (the caller commits): the redemption.created message is
    ``dead`` with the reason as its last error, and its redemption (pending or shipping) moves to
    ``exception`` until `relay retry` sends it again or `redeem cancel` refunds it. A repeated or
    late answer (the message confirmed, dead or withdrawn already) changes nothing, nor does one
    ``dropped``."""
    from credex.points.redemptions import move_redemption

    changed, put_off = 0, []
    for answer, message in _held_once(session, answers, put_off, dropped):
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
        move_redemption(
            session,
            message.redemption_id,
            from_statuses=(_ST.pending.value, _ST.shipping.value),
            to=_ST.exception,
            source=EventSource.relay,
            detail=f"shipment failed: {answer.reason}",  # the carrier refused it, or the warehouse
            now=now,
        )
    return changed, put_off
