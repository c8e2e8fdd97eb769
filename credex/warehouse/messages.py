"""The messages the warehouse takes from its queue (messaging.md): redemption.created and
redemption.cancelled, read into what the warehouse needs, or InvalidInput saying what is wrong."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from credex.errors import InvalidInput, printable, read_json
from credex.logistics.model import is_token
from credex.points.rules import INT32_MAX, INT64_MAX
from credex.relay.topology import REDEMPTION_CANCELLED, REDEMPTION_CREATED


@dataclass(frozen=True)
class RedemptionMessage:
    """The parts of a redemption.created body (messaging.md) the warehouse needs."""

    message_id: str
    redemption_id: int
    user_id: str
    sku: str
    quantity: int
    address: str


@dataclass(frozen=True)
class CancelMessage:
    """A redemption.cancelled body (messaging.md)."""

    message_id: str
    redemption_id: int
    reason: str


# What no column stores (Postgres refuses NUL in text; a lone surrogate is not UTF-8): a message
# carrying one was not written by credex, and writing it would fail the whole batch.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _fields(body: bytes):
    try:
        data = read_json(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("the body is not JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("the body is not a JSON object")

    def text(name: str, limit: int, *, empty: bool = False) -> str:
        value = data.get(name)
        if not isinstance(value, str) or (not empty and not value.strip()) or len(value) > limit:
            raise InvalidInput(f"{name} is missing or not a short text")
        if _UNSTORABLE.search(value):
            raise InvalidInput(f"{name} holds a NUL byte or a lone surrogate, which no column stores")
        return value

    def number(name: str, maximum: int) -> int:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
            raise InvalidInput(f"{name} is missing or not a positive integer")
        return value

    def message_id() -> str:
        # The outbox message's id, a UUID (messaging.md); it is the carrier's idempotency key and
        # travels in a header.
        value = text("message_id", 36)
        if not is_token(value):
            raise InvalidInput("message_id is not printable ASCII without spaces")
        try:
            canonical = str(uuid.UUID(value))
        except ValueError:
            canonical = None
        if canonical != value.lower():
            raise InvalidInput(f"message_id is not a UUID: {printable(value)}")
        return value

    return text, number, message_id


def parse_redemption_message(body: bytes) -> RedemptionMessage:
    """The message, or InvalidInput saying what is wrong with it."""
    text, number, message_id = _fields(body)
    return RedemptionMessage(
        message_id=message_id(),
        redemption_id=number("redemption_id", INT64_MAX),
        user_id=text("user_id", 128),
        sku=text("sku", 64),
        quantity=number("quantity", INT32_MAX),
        address=text("address", 10_000),
    )


def parse_cancel_message(body: bytes) -> CancelMessage:
    """The message, or InvalidInput saying what is wrong with it."""
    text, number, message_id = _fields(body)
    return CancelMessage(
        message_id=message_id(),
        redemption_id=number("redemption_id", INT64_MAX),
        reason=text("reason", 10_000, empty=True),
    )


def parse_message(kind: str, body: bytes) -> RedemptionMessage | CancelMessage:
    """A message of the warehouse queue by its type (the AMQP ``type``, else its routing key)."""
    if kind == REDEMPTION_CREATED:
        return parse_redemption_message(body)
    if kind == REDEMPTION_CANCELLED:
        return parse_cancel_message(body)
    raise InvalidInput(f"a message of unknown type {printable(kind)}")
