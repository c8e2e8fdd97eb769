"""The warehouse's shipment requests: the statements that read and change them, and the answers
the warehouse publishes (the messages that move them are ``messages``'s). The UNIQUE redemption id
turns a message delivered twice into a look-up of the first request, so no redemption is ever
shipped twice; the row's status changes only by conditional updates (credex/warehouse/lifecycle.py).
On Postgres the statements for many requests at once take one array per column (``credex.db.sql``).

(A little over 400 lines on purpose: the row's statements and the answers are the shipment
request's one vocabulary, read together; the state machine is lifecycle.py's.)"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import bindparam, case, func, literal, select, update
from sqlmodel import Session

from credex.db import tables
from credex.db.models import ShipmentStatus, ShipmentType
from credex.db.sql import is_postgres, one_of, unnested
from credex.logistics.model import Waybill
from credex.relay.topology import (
    SHIPMENT_CANCELLED,
    SHIPMENT_FAILED,
    SHIPMENT_REQUESTED,
)
from credex.warehouse.messages import CancelMessage, RedemptionMessage

shipment_table = tables.shipment_request
_s = shipment_table.c


def shipment_json(row) -> dict:
    return {
        "shipment_id": row.id,
        "type": row.type,
        "redemption_id": row.redemption_id,
        "sku": row.sku,
        "quantity": row.quantity,
        "carrier": row.carrier,
        "express_no": row.express_no,
        "status": row.status,
        "reason": row.reason,
        "created_at": row.created_at,
    }


# (dialect name, whole rows returned) -> INSERT … ON CONFLICT DO NOTHING
_INSERT_IGNORING_REPEATS: dict[tuple[str, bool], object] = {}
_REQUEST_OF = select(shipment_table).where(_s.redemption_id == bindparam("rid"))
_REQUEST_BY_ID = select(shipment_table).where(_s.id == bindparam("sid"))
_REQUESTS_OF = select(shipment_table).where(one_of(_s.redemption_id, "rids"))


def _insert_ignoring_repeats(session: Session, *, whole_rows: bool = False):
    """INSERT … ON CONFLICT (redemption_id) DO NOTHING RETURNING id (or, ``whole_rows``, every
    column) in the session's dialect, built once per dialect, its compiled form cached."""
    name = session.bind.dialect.name
    statement = _INSERT_IGNORING_REPEATS.get((name, whole_rows))
    if statement is None:
        if name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        statement = _INSERT_IGNORING_REPEATS[name, whole_rows] = (
            dialect_insert(shipment_table)
            .on_conflict_do_nothing(index_elements=["redemption_id"])
            .returning(*(shipment_table.c if whole_rows else [_s.id]))
        )
    return statement


def open_request(session: Session, message: RedemptionMessage, *, now: datetime) -> tuple[object, bool]:
    """The shipment request of the message's redemption, created ``requested`` where there is none
    yet (its carrier key: the message's id). The caller commits. Returns (row, created). A
    redemption seen before, here or by another consumer at the same moment, gets its first request
    back: the UNIQUE redemption id decides."""
    created = session.execute(
        _insert_ignoring_repeats(session),
        {
            "type": ShipmentType.redemption.value,
            "redemption_id": message.redemption_id,
            "message_id": message.message_id,
            "sku": message.sku,
            "quantity": message.quantity,
            "address": message.address,
            "status": ShipmentStatus.requested.value,
            "idempotency_key": message.message_id,
            "recipient": message.user_id,
            "created_at": now,
            "updated_at": now,
        },
    ).first()
    return request_of(session, message.redemption_id), created is not None


@functools.cache
def _open_many_postgres():
    """Postgres: ``open_requests`` as INSERT … SELECT from one array per column, ON CONFLICT DO
    NOTHING, RETURNING the rows created: one text for any number of messages (built on first
    use: ON CONFLICT is the Postgres dialect's, which a SQLite process never imports)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    m = unnested(
        "m",
        redemption_id=_s.redemption_id.type,
        message_id=_s.message_id.type,
        sku=_s.sku.type,
        quantity=_s.quantity.type,
        address=_s.address.type,
        recipient=_s.recipient.type,
    )
    now = bindparam("now", type_=_s.created_at.type)
    rows = select(
        literal(ShipmentType.redemption.value, _s.type.type),
        m.c.redemption_id,
        m.c.message_id,
        m.c.sku,
        m.c.quantity,
        m.c.address,
        bindparam("status", type_=_s.status.type),
        m.c.message_id,
        m.c.recipient,
        bindparam("asked_at", type_=_s.asked_at.type),
        now,
        now,
    )
    columns = ["type", "redemption_id", "message_id", "sku", "quantity", "address", "status"]
    columns += ["idempotency_key", "recipient", "asked_at", "created_at", "updated_at"]
    return (
        pg_insert(shipment_table)
        .from_select(columns, rows)
        .on_conflict_do_nothing(index_elements=["redemption_id"])
        .returning(*shipment_table.c)
    )


def open_requests(
    session: Session, messages: Sequence[RedemptionMessage], *, now: datetime, asking: bool = False
) -> dict[int, object]:
    """``open_request`` for many messages of different redemptions in one statement. ``asking``:
    the requests created now are written ``requesting`` at once, as ``claim`` would move them (the
    caller asks the carrier for them next), so a new request is written once, not twice. Returns
    the requests created now, as they are, by redemption id."""
    status = ShipmentStatus.requesting if asking else ShipmentStatus.requested
    if is_postgres(session):
        created = session.execute(
            _open_many_postgres(),
            {
                "m_redemption_id": [m.redemption_id for m in messages],
                "m_message_id": [m.message_id for m in messages],
                "m_sku": [m.sku for m in messages],
                "m_quantity": [m.quantity for m in messages],
                "m_address": [m.address for m in messages],
                "m_recipient": [m.user_id for m in messages],
                "status": status.value,
                "asked_at": now if asking else None,
                "now": now,
            },
        ).all()
        return {row.redemption_id: row for row in created}
    created = session.execute(
        _insert_ignoring_repeats(session, whole_rows=True),
        [
            {
                "type": ShipmentType.redemption.value,
                "redemption_id": m.redemption_id,
                "message_id": m.message_id,
                "sku": m.sku,
                "quantity": m.quantity,
                "address": m.address,
                "status": status.value,
                "idempotency_key": m.message_id,
                "recipient": m.user_id,
                "reason": None,
                "asked_at": now if asking else None,
                "created_at": now,
                "updated_at": now,
            }
            for m in messages
        ],
    ).all()
    return {row.redemption_id: row for row in created}


def requests_of(session: Session, redemption_ids: Sequence[int]) -> dict[int, object]:
    """The requests of these redemptions, by redemption id."""
    rows = session.execute(_REQUESTS_OF, {"rids": list(redemption_ids)})
    return {row.redemption_id: row for row in rows}


_CLAIM = (
    update(shipment_table)
    .where(
        one_of(_s.redemption_id, "rids"),
        _s.status.in_([ShipmentStatus.requested.value, ShipmentStatus.failed.value]),
    )
    .values(
        status=ShipmentStatus.requesting.value,
        updated_at=bindparam("now", type_=_s.updated_at.type),
        asked_at=func.coalesce(_s.asked_at, bindparam("first_asked", type_=_s.asked_at.type)),
    )
    .returning(*shipment_table.c)
)


def claim(session: Session, redemption_ids: Sequence[int], *, now: datetime) -> dict[int, object]:
    """``requested``/``failed`` → ``requesting`` for the requests of many redemptions at once (a
    conditional update, as ``move``); the caller commits. Returns the rows this call moved, as
    they are now, by redemption id."""
    if not redemption_ids:
        return {}
    moved = session.execute(_CLAIM, {"rids": list(redemption_ids), "now": now, "first_asked": now})
    return {row.redemption_id: row for row in moved}


_W = unnested(
    "w",
    id=_s.id.type,
    carrier=_s.carrier.type,
    express_no=_s.express_no.type,
    shipment_id=_s.carrier_shipment_id.type,
)
# Postgres: ``save_waybills`` as UPDATE … FROM one array per column.
_SAVE_WAYBILLS_POSTGRES = (
    update(shipment_table)
    .where(_s.id == _W.c.id, _s.status.in_([ShipmentStatus.requested.value, ShipmentStatus.requesting.value]))
    .values(
        status=ShipmentStatus.waybill.value,
        updated_at=bindparam("now", type_=_s.updated_at.type),
        carrier=_W.c.carrier,
        express_no=_W.c.express_no,
        carrier_shipment_id=_W.c.shipment_id,
        reason=None,
    )
    .returning(*shipment_table.c)
)


def save_waybills(
    session: Session, waybills: Sequence[tuple[int, Waybill]], *, now: datetime
) -> dict[int, object]:
    """``move`` to ``waybill`` for many open requests (``requested``/``requesting``) in one
    statement, each keeping its own waybill: (shipment id, waybill) pairs. The caller commits. Returns
    the rows moved, as they are now, by shipment id; a row no longer open is left as it is. An
    express number another request of that carrier holds fails the whole statement
    (IntegrityError): the caller saves them one by one then."""
    if not waybills:
        return {}

    if is_postgres(session):
        moved = session.execute(
            _SAVE_WAYBILLS_POSTGRES,
            {
                "w_id": [shipment_id for shipment_id, _ in waybills],
                "w_carrier": [waybill.carrier for _, waybill in waybills],
                "w_express_no": [waybill.express_no for _, waybill in waybills],
                "w_shipment_id": [waybill.shipment_id for _, waybill in waybills],
                "now": now,
            },
        )
        return {row.id: row for row in moved}

    def each(value) -> object:
        return case({shipment_id: value(waybill) for shipment_id, waybill in waybills}, value=_s.id)

    moved = session.execute(
        update(shipment_table)
        .where(
            _s.id.in_([shipment_id for shipment_id, _ in waybills]),
            _s.status.in_([ShipmentStatus.requested.value, ShipmentStatus.requesting.value]),
        )
        .values(
            status=ShipmentStatus.waybill.value,
            updated_at=now,
            carrier=each(lambda waybill: waybill.carrier),
            express_no=each(lambda waybill: waybill.express_no),
            carrier_shipment_id=each(lambda waybill: waybill.shipment_id),
            reason=None,
        )
        .returning(*shipment_table.c)
    )
    return {row.id: row for row in moved}


def write_tombstone(session: Session, message: CancelMessage, *, now: datetime) -> tuple[object, bool]:
    """A ``cancelled`` row for a redemption the warehouse has not seen yet, so that its create, if
    it ever comes, is answered "cancelled". The caller commits. Returns (row, written): an
    existing row is returned as it is."""
    written = session.execute(
        _insert_ignoring_repeats(session),
        {
            "type": ShipmentType.redemption.value,
            "redemption_id": message.redemption_id,
            "status": ShipmentStatus.cancelled.value,
            "reason": message.reason,
            "created_at": now,
            "updated_at": now,
        },
    ).first()
    return request_of(session, message.redemption_id), written is not None


def request_of(session: Session, redemption_id: int):
    return session.execute(_REQUEST_OF, {"rid": redemption_id}).first()


def request_by_id(session: Session, shipment_id: int):
    return session.execute(_REQUEST_BY_ID, {"sid": shipment_id}).first()


def move(
    session: Session,
    shipment_id: int,
    *,
    from_: tuple[ShipmentStatus, ...],
    to: ShipmentStatus,
    now: datetime,
    seen_at: datetime | None = None,
    **values: object,
) -> bool:
    """The one way a status changes: ``from_`` → ``to`` only while the row is still in one of
    ``from_`` (and, with ``seen_at``, not touched since it was read). The caller commits. Whether
    this call moved it: False means another consumer got there first; read the row again."""
    statement = update(shipment_table).where(
        _s.id == shipment_id, _s.status.in_([status.value for status in from_])
    )
    if seen_at is not None:
        statement = statement.where(_s.updated_at == seen_at)
    changes = {"status": to.value, "updated_at": now, **values}
    if "asked_at" in changes:  # the first call to the carrier is the one kept
        changes["asked_at"] = func.coalesce(
            _s.asked_at, bindparam("first_asked", changes["asked_at"], type_=_s.asked_at.type)
        )
    return session.execute(statement.values(**changes)).rowcount == 1


def note_reason(
    session: Session, shipment_id: int, status: ShipmentStatus, reason: str, *, now: datetime
) -> None:
    """Keep why the carrier said no (a cancel refused) on a row that stays as it is."""
    session.execute(
        update(shipment_table)
        .where(_s.id == shipment_id, _s.status == status.value)
        .values(reason=reason, updated_at=now)
    )


def confirmation_body(row, *, message_id: str, now: datetime) -> bytes:
    """The shipment.requested body (messaging.md); ``message_id`` is the redemption message it
    confirms, also carried as the AMQP correlation id."""
    return json.dumps(
        {
            "message_id": message_id,
            "redemption_id": row.redemption_id,
            "shipment_id": row.id,
            "carrier": row.carrier,
            "express_no": row.express_no,
            "created_at": now.isoformat(),
        },
        ensure_ascii=False,
    ).encode()


def answer_cancelled_body(
    redemption_id: int, *, message_id: str, outcome: str, reason: str, now: datetime
) -> bytes:
    """The shipment.cancelled body (messaging.md): ``message_id`` is the message it answers."""
    return json.dumps(
        {
            "message_id": message_id,
            "redemption_id": redemption_id,
            "outcome": outcome,
            "reason": reason,
            "created_at": now.isoformat(),
        },
        ensure_ascii=False,
    ).encode()


def answer_failed_body(redemption_id: int, *, message_id: str, reason: str, now: datetime) -> bytes:
    """The shipment.failed body (messaging.md): ``message_id`` is the redemption message."""
    return json.dumps(
        {
            "message_id": message_id,
            "redemption_id": redemption_id,
            "reason": reason,
            "created_at": now.isoformat(),
        },
        ensure_ascii=False,
    ).encode()


ANSWER_KEYS = {"requested": SHIPMENT_REQUESTED, "cancelled": SHIPMENT_CANCELLED, "failed": SHIPMENT_FAILED}


def new_message_id() -> str:
    return str(uuid.uuid4())


def list_shipments(session: Session, *, limit: int = 50) -> list[dict]:
    rows = session.execute(select(shipment_table).order_by(_s.id.desc()).limit(limit))
    return [shipment_json(row) for row in rows]
