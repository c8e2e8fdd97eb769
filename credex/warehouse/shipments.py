"""The warehouse's shipment requests. The UNIQUE redemption id turns a message delivered twice
into a look-up of the first request, so no redemption is ever shipped twice."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlmodel import Session

from credex.db import tables
from credex.db.models import ShipmentType
from credex.errors import InvalidInput
from credex.points.rules import INT32_MAX, INT64_MAX

shipment_table = tables.shipment_request
_s = shipment_table.c


@dataclass(frozen=True)
class RedemptionMessage:
    """The parts of a redemption.created body (messaging.md) the warehouse needs."""

    message_id: str
    redemption_id: int
    user_id: str
    sku: str
    quantity: int
    address: str


def parse_redemption_message(body: bytes) -> RedemptionMessage:
    """The message, or InvalidInput saying what is wrong with it."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("the body is not JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("the body is not a JSON object")

    def text(name: str, limit: int) -> str:
        value = data.get(name)
        if not isinstance(value, str) or not value.strip() or len(value) > limit:
            raise InvalidInput(f"{name} is missing or not a short text")
        return value

    def number(name: str, maximum: int) -> int:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
            raise InvalidInput(f"{name} is missing or not a positive integer")
        return value

    return RedemptionMessage(
        message_id=text("message_id", 36),
        redemption_id=number("redemption_id", INT64_MAX),
        user_id=text("user_id", 128),
        sku=text("sku", 64),
        quantity=number("quantity", INT32_MAX),
        address=text("address", 10_000),
    )


def shipment_json(row) -> dict:
    return {
        "shipment_id": row.id,
        "type": row.type,
        "redemption_id": row.redemption_id,
        "sku": row.sku,
        "quantity": row.quantity,
        "carrier": row.carrier,
        "express_no": row.express_no,
        "created_at": row.created_at,
    }


_INSERT_IGNORING_REPEATS: dict[str, object] = {}  # dialect name -> INSERT … ON CONFLICT DO NOTHING
_REQUESTS_OF = select(shipment_table).where(_s.redemption_id.in_(bindparam("rids", expanding=True)))
_SAVE_WAYBILL = (
    update(shipment_table)
    .where(_s.id == bindparam("sid"), _s.express_no.is_(None))
    .values(
        carrier=bindparam("new_carrier"), express_no=bindparam("new_express_no"), updated_at=bindparam("now")
    )
)
_REQUESTS_BY_ID = select(shipment_table).where(_s.id.in_(bindparam("sids", expanding=True)))


def _insert_ignoring_repeats(session: Session):
    """INSERT … ON CONFLICT (redemption_id) DO NOTHING RETURNING id in the session's dialect, built
    once per dialect: one executemany for a batch, its compiled form cached."""
    name = session.bind.dialect.name
    statement = _INSERT_IGNORING_REPEATS.get(name)
    if statement is None:
        if name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        statement = _INSERT_IGNORING_REPEATS[name] = (
            dialect_insert(shipment_table)
            .on_conflict_do_nothing(index_elements=["redemption_id"])
            .returning(_s.id)
        )
    return statement


def open_shipment_requests(
    session: Session, messages: Sequence[RedemptionMessage], *, now: datetime
) -> tuple[dict[int, object], int]:
    """The shipment request of each message's redemption, created where it does not exist yet,
    in one transaction that the caller commits. Returns (redemption id -> row, how many created).
    A redemption seen before, here or by another consumer at the same moment, gets its first
    request back: the UNIQUE redemption id decides."""
    first: dict[int, RedemptionMessage] = {}
    for message in messages:
        first.setdefault(message.redemption_id, message)
    created = session.execute(
        _insert_ignoring_repeats(session),
        [
            {
                "type": ShipmentType.redemption.value,
                "redemption_id": m.redemption_id,
                "message_id": m.message_id,
                "sku": m.sku,
                "quantity": m.quantity,
                "address": m.address,
                "created_at": now,
                "updated_at": now,
            }
            for m in first.values()
        ],
    ).all()
    rows = session.execute(_REQUESTS_OF, {"rids": list(first)}).all()
    return {row.redemption_id: row for row in rows}, len(created)


def save_waybills(
    session: Session, waybills: Sequence[tuple[int, str, str]], *, now: datetime
) -> dict[int, object]:
    """Keep each carrier's waybill, (shipment id, carrier, express number), on its request; the
    first one saved wins. The caller commits. Returns shipment id -> the row as saved."""
    session.execute(
        _SAVE_WAYBILL,
        [
            {"sid": sid, "new_carrier": carrier, "new_express_no": express_no, "now": now}
            for sid, carrier, express_no in waybills
        ],
    )
    ids = [sid for sid, _, _ in waybills]
    return {row.id: row for row in session.execute(_REQUESTS_BY_ID, {"sids": ids})}


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


def new_message_id() -> str:
    return str(uuid.uuid4())


def list_shipments(session: Session, *, limit: int = 50) -> list[dict]:
    rows = session.execute(select(shipment_table).order_by(_s.id.desc()).limit(limit))
    return [shipment_json(row) for row in rows]
