"""Helpers for warehouse tests: the messages the relay would publish, the answers the warehouse
publishes, and its shipment requests as stored."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from credex.db.engine import get_engine


def created_body(redemption_id: int, **overrides) -> dict:
    body = {
        "message_id": str(uuid.uuid4()),
        "redemption_id": redemption_id,
        "user_id": "u1",
        "sku": "MUG",
        "quantity": 1,
        "points": 10,
        "address": "8 Long Road",
        "created_at": "2026-11-25T10:00:00+00:00",
    }
    return body | overrides


def cancel_body(redemption_id: int, reason: str = "the shopper changed their mind") -> dict:
    return {
        "message_id": str(uuid.uuid4()),
        "redemption_id": redemption_id,
        "reason": reason,
        "created_at": "2026-11-25T10:05:00+00:00",
    }


def send(rabbit, body: dict, kind: str | None = None) -> dict:
    """Publish as the relay does: routing key and ``type`` = the message's kind."""
    kind = kind or ("redemption.created" if "sku" in body else "redemption.cancelled")
    rabbit.publish(kind, body, message_id=body["message_id"], type=kind, content_type="application/json")
    return body


def answers(rabbit) -> list[tuple[str, dict, str]]:
    """The warehouse's answers waiting on the relay's queue: (type, body, correlation id)."""
    return [(p.type, body, p.correlation_id) for p, body in rabbit.take(rabbit.names.confirmations_queue)]


def rows(db_url: str) -> dict[int, dict]:
    """Shipment requests by redemption id, as stored."""
    with get_engine(db_url).connect() as connection:
        found = connection.execute(
            text(
                "SELECT redemption_id, status, express_no, carrier, carrier_shipment_id, idempotency_key, "
                "reason, sku, asked_at FROM shipment_request"
            )
        ).mappings()
        return {row["redemption_id"]: dict(row) for row in found}


def execute(db_url: str, sql: str, **params) -> None:
    """Change rows by hand (a time is stored as credex stores it)."""
    from datetime import datetime

    from sqlalchemy import bindparam

    from credex.db.models import UTCDateTime

    statement = text(sql).bindparams(
        *(
            bindparam(name, type_=UTCDateTime())
            for name, value in params.items()
            if isinstance(value, datetime)
        )
    )
    with get_engine(db_url).begin() as connection:
        connection.execute(statement, params)
