"""Where is my gift: from a redemption (or an express number) to the carrier's tracking."""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session

from credex.errors import InvalidInput, NotShipped
from credex.logistics.model import CarrierClient, Tracking, is_carrier_code, is_express_no, shown

# Where a redemption without an express number stands, by the state of its outbox message.
MESSAGE_STORIES = {
    "pending": "its message is pending (not yet delivered to the warehouse)",
    "sent": "its message was sent to the warehouse, which has not confirmed a waybill yet",
    "confirmed": "its message is confirmed, but the warehouse recorded no express number",
    "dead": "its message is dead (delivery was given up: see `credex relay list --state dead`, "
    "then `credex relay retry`)",
}


@dataclass(frozen=True)
class Parcel:
    """What `track` asks the carrier about."""

    express_no: str
    carrier: str | None = None
    redemption_id: int | None = None


def check_express_no(value: str, what: str = "--express-no") -> str:
    """An express number as a user may type it: ASCII letters, digits and '-', at most 64.

    Only plain spaces around it are forgiven (a pasted number); any other character, a control
    character, NUL or a bidirectional override included, is refused (exit 2) rather than dropped.
    """
    text = (value or "").strip(" ")
    if not is_express_no(text):
        raise InvalidInput(
            f"{what} is not an express number: {shown(value)} (ASCII letters, digits and '-', at most 64)"
        )
    return text


def check_carrier_code(value: str, what: str = "--carrier") -> str:
    """A carrier code: ASCII letters, digits, '_', '.' and '-', at most 64 (e.g. sandbox, shunfeng)."""
    text = (value or "").strip(" ")
    if not is_carrier_code(text):
        raise InvalidInput(
            f"{what} is not a carrier code: {shown(value)} (e.g. sandbox, shunfeng, yuantong; at most 64)"
        )
    return text


def parcel_of_redemption(session: Session, redemption_id: str | int) -> Parcel:
    """The parcel of a redemption; ``NotShipped`` (exit 1) says where it stands when it has none yet."""
    from credex.points.redemptions import get_redemption

    redemption = get_redemption(session, redemption_id)
    number = redemption["redemption_id"]
    if not redemption.get("express_no"):
        state = redemption.get("message_state")
        story = MESSAGE_STORIES.get(state, f"its message is {state}") if state else "it has no outbox message"
        raise NotShipped(f"redemption {number} has no express number yet: {story}")
    return Parcel(
        express_no=redemption["express_no"], carrier=redemption.get("carrier"), redemption_id=number
    )


def track_parcel(client: CarrierClient, parcel: Parcel, *, phone: str | None = None) -> dict:
    """The document of `credex track` for one parcel."""
    tracking: Tracking = client.track(parcel.express_no, carrier=parcel.carrier, phone=phone)
    return tracking.to_json(redemption_id=parcel.redemption_id)
