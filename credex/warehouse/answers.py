"""What a message comes to at the warehouse (``Handled``) and the answer it publishes for it
(``Answer``: shipment.requested, .cancelled or .failed, its body built from the shipment row)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from credex.logistics.model import CarrierError
from credex.warehouse import shipments

# What a message comes to, as the warehouse's report and metrics name it (`invalid`: malformed,
# dropped by the consumer before it reaches the desk).
OUTCOMES = ("requested", "cancelled", "refused", "failed", "carrier_unreachable", "deferred", "invalid")


@dataclass(frozen=True)
class Answer:
    kind: str  # "requested", "cancelled" or "failed": the routing key is shipments.ANSWER_KEYS[kind]
    body: bytes
    correlation_id: str


@dataclass(frozen=True)
class Handled:
    """What one message came to. ``outcome`` (the metrics' names): requested, cancelled, refused,
    failed, carrier_unreachable, deferred (another consumer is asking the carrier right now)."""

    outcome: str
    answer: Answer | None = None
    created: bool = False  # this message wrote the shipment request
    waybill: bool = False  # this message got a waybill from the carrier


def reason_of(error: BaseException) -> str:
    if isinstance(error, CarrierError):
        return f"{error.reason}: {error.message}"[:1000]
    return getattr(error, "message", str(error))[:1000]


def requested(message_id: str, row, *, now: datetime) -> Handled:
    """shipment.requested: the waybill the row keeps."""
    body = shipments.confirmation_body(row, message_id=message_id, now=now)
    return Handled("requested", Answer("requested", body, message_id))


def cancel_answer(message_id: str, row, outcome: str, reason: str, *, now: datetime) -> Handled:
    """shipment.cancelled, "cancelled" or "refused"."""
    body = shipments.answer_cancelled_body(
        row.redemption_id, message_id=message_id, outcome=outcome, reason=reason, now=now
    )
    return Handled(outcome, Answer("cancelled", body, message_id))


def failed(message_id: str, row, reason: str, *, now: datetime) -> Handled:
    """shipment.failed: the carrier refused the shipment for good."""
    body = shipments.answer_failed_body(row.redemption_id, message_id=message_id, reason=reason, now=now)
    return Handled("failed", Answer("failed", body, message_id))
