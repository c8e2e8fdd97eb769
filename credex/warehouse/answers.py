"""What a message comes to at the warehouse (``Handled``) and the answer it publishes for it
(``Answer``: shipment.requested, .cancelled or .failed, its body built from the shipment row),
and the one create a shipment request answers (``not_its_create``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from credex.logistics.model import CarrierError
from credex.warehouse import shipments
from credex.warehouse.messages import RedemptionMessage

log = logging.getLogger("credex.warehouse")

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


# What a request keeps of the redemption.created that opened it: (its column, the message's field).
_KEPT = (("sku", "sku"), ("quantity", "quantity"), ("address", "address"), ("recipient", "user_id"))


def not_its_create(message: RedemptionMessage, row) -> str | None:
    """Why ``message`` is not the redemption.created that opened the row, or None when it is (a
    redelivery) or the row holds none to compare with: a tombstone, opened by a cancel that came
    first, keeps no message id and no body. A redemption has one redemption.created, its outbox
    message (messaging.md), so another id, or the same id with another body, is a forged message
    or a stale one (the points database restored from a backup behind the warehouse's): answered
    from the row it would take that row's parcel. Rows older than migration 0005 keep the id of
    the message that opened them, as new ones do."""
    if row.message_id and row.message_id.lower() != message.message_id.lower():
        return (
            f"shipment request {row.id} of redemption {row.redemption_id} was opened by another "
            f"redemption.created ({row.message_id}), not {message.message_id}: a forged or stale "
            "message, or the warehouse's database is out of step with the points database; nothing "
            "was shipped for this one and that request is left as it is, for a person to look at"
        )
    differ = [
        field
        for column, field in _KEPT
        if getattr(row, column) is not None and getattr(row, column) != getattr(message, field)
    ]
    if differ:
        return (
            f"shipment request {row.id} of redemption {row.redemption_id} was opened by a "
            f"redemption.created with this message id ({message.message_id}) but another "
            f"{', '.join(differ)}: a forged or altered message; nothing was shipped for this one "
            "and that request is left as it is, for a person to look at"
        )
    return None


def refuse_create(message: RedemptionMessage, row, reason: str, *, now: datetime) -> Handled:
    """shipment.failed for a create that is not its row's (``not_its_create``): the relay marks it
    dead and its redemption ``exception`` with the reason, where an operator sees it, instead of
    publishing it again for ever; the row is not touched and the carrier not asked."""
    log.error(
        "redemption %s: refused redemption.created %s: %s",
        row.redemption_id,
        message.message_id,
        reason,
        extra={"redemption_id": row.redemption_id, "message_id": message.message_id},
    )
    return failed(message.message_id, row, reason, now=now)
