"""The warehouse's shipment requests. The UNIQUE redemption id turns a message delivered twice
into a look-up of the first request, so no redemption is ever shipped twice."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from credex.db.models import ShipmentRequest, ShipmentType
from credex.errors import InvalidInput
from credex.points.rules import INT32_MAX, INT64_MAX

shipment_table = ShipmentRequest.__table__
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


def _find(session: Session, redemption_id: int):
    return session.execute(select(shipment_table).where(_s.redemption_id == redemption_id)).first()


def open_shipment_request(
    session: Session, message: RedemptionMessage, *, now: datetime
) -> tuple[object, bool]:
    """The shipment request for the message's redemption, created unless it exists, committed.
    Returns (row, created)."""
    existing = _find(session, message.redemption_id)
    if existing is not None:
        session.rollback()
        return existing, False
    try:
        session.execute(
            insert(shipment_table).values(
                type=ShipmentType.redemption.value,
                redemption_id=message.redemption_id,
                message_id=message.message_id,
                sku=message.sku,
                quantity=message.quantity,
                address=message.address,
                created_at=now,
                updated_at=now,
            )
        )
        session.commit()
        created = True
    except IntegrityError:  # another consumer created it in the meantime
        session.rollback()
        created = False
    row = _find(session, message.redemption_id)
    session.rollback()
    return row, created


def save_waybill(session: Session, shipment_id: int, *, carrier: str, express_no: str, now: datetime):
    """Keep the carrier's waybill on the request (the first one saved wins), committed; the row."""
    session.execute(
        update(shipment_table)
        .where(_s.id == shipment_id, _s.express_no.is_(None))
        .values(carrier=carrier, express_no=express_no, updated_at=now)
    )
    session.commit()
    row = session.execute(select(shipment_table).where(_s.id == shipment_id)).first()
    session.rollback()
    return row


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
