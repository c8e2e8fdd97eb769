"""What every carrier answers, whichever provider asked: waybills, trackings, checkpoints.

Nothing here imports httpx: the warehouse and the CLI import this module cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# The normalised statuses (logistics.md), modelled on the tracking aggregators' tag sets.
STATUSES = (
    "pending",
    "info_received",
    "in_transit",
    "out_for_delivery",
    "available_for_pickup",
    "failed_attempt",
    "delivered",
    "exception",
    "expired",
)


def iso(moment: datetime) -> str:
    """ISO 8601 in UTC with its offset, as every time credex prints."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class Waybill:
    """The carrier's answer to a shipment request: who carries the parcel, under which number."""

    carrier: str
    express_no: str
    shipment_id: str | None = None
    status: str = "info_received"
    created_at: datetime | None = None


@dataclass(frozen=True)
class Checkpoint:
    time: datetime
    status: str
    message: str
    location: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "time": iso(self.time),
            "status": self.status,
            "message": self.message,
            "location": self.location,
        }


@dataclass(frozen=True)
class Tracking:
    """Where a parcel is: its normalised status and its checkpoints, newest first."""

    carrier: str
    express_no: str
    status: str
    checkpoints: tuple[Checkpoint, ...] = field(default_factory=tuple)
    updated_at: datetime | None = None

    def to_json(self, *, redemption_id: int | None = None) -> dict[str, Any]:
        """The document of `credex track --json` (cli.md)."""
        return {
            "redemption_id": redemption_id,
            "express_no": self.express_no,
            "carrier": self.carrier,
            "status": self.status,
            "checkpoints": [checkpoint.to_json() for checkpoint in self.checkpoints],
        }


class CarrierClient:
    """One carrier API behind one interface. Use it as a context manager: it owns a connection pool.

    Every failure is a ``CredexError``: ``Unavailable`` (exit 69) when the carrier could not be
    reached within the bound on total time, ``CarrierRejected`` for a final refusal,
    ``UnknownParcel`` for a number the carrier does not know.
    """

    provider: str = ""
    issues_waybills: bool = True  # False for a tracking-only provider: no warehouse can use it

    def __init__(self, http: Any) -> None:
        self._http = http

    def create_shipment(
        self,
        *,
        idempotency_key: str,
        order_ref: str,
        recipient: dict[str, str],
        items: list[dict[str, Any]],
    ) -> Waybill:
        """Ask for a waybill. The same key with the same content returns the same waybill."""
        raise NotImplementedError

    def track(self, express_no: str, *, carrier: str | None = None, phone: str | None = None) -> Tracking:
        """Where the parcel is now, checkpoints newest first."""
        raise NotImplementedError

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CarrierClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        # Only the provider and the address: never a key, a header or a signature.
        return f"<{type(self).__name__} {self.provider} at {self._http.where}>"
