"""What every carrier answers, whichever provider asked: waybills, trackings, checkpoints, cancels,
and the errors a caller must tell apart (try again later, or final).

Nothing here imports httpx: the warehouse and the CLI import this module cheaply."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from credex.errors import (
    CarrierRejected,
    CredexError,
    InvalidInput,
    Unavailable,
    UnknownParcel,
    hide_secrets,
    redact,
    secret_pattern,
)

# The normalised statuses (logistics.md), modelled on the tracking aggregators' tag sets.
STATUSES = (
    "pending",
    "info_received",
    "in_transit",
    "out_for_delivery",
    "available_for_pickup",
    "failed_attempt",
    "delivered",
    "returned",
    "exception",
    "expired",
)
# A parcel in one of these has stopped for good: delivered, or back with the sender (refunded).
FINAL_STATUSES = frozenset({"delivered", "returned"})


def is_final(status: str | None) -> bool:
    """Whether a normalised status is the end of the parcel's road (``delivered`` or ``returned``)."""
    return status in FINAL_STATUSES


# An express number and a carrier code: short printable ASCII tokens, as the shipment table stores
# them (64 characters) and as they go into a URL path. One pattern for what a user types and for
# what a carrier answers.
EXPRESS_NO = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
CARRIER_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A carrier's shipment id and an idempotency key: printable ASCII without spaces (they travel in a
# URL path, quoted, and in a header).
TOKEN = re.compile(r"[!-~]{1,128}")

# Control characters (C0, DEL, C1) and the bidirectional controls that can reorder a line.
_UNSAFE_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u061c\u202a-\u202e\u2066-\u2069]+")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # valid in JSON ("\\ud800"), not in UTF-8 text
TEXT_LIMIT = 500


def is_express_no(value: object) -> bool:
    return isinstance(value, str) and EXPRESS_NO.fullmatch(value) is not None


def is_carrier_code(value: object) -> bool:
    return isinstance(value, str) and CARRIER_CODE.fullmatch(value) is not None


def is_token(value: object) -> bool:
    return isinstance(value, str) and TOKEN.fullmatch(value) is not None


def clean_text(value: object, limit: int = TEXT_LIMIT) -> str:
    """A carrier's free text (a checkpoint's words, an error message) made safe to print on one line:
    control and bidirectional characters become one space, a lone surrogate (which no UTF-8 output
    or database can take) the replacement character, and it is cut at ``limit``."""
    text = _LONE_SURROGATE.sub("\ufffd", _UNSAFE_TEXT.sub(" ", str(value))).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown(value: object, limit: int = 40) -> str:
    """A value quoted for an error message: ``repr`` (control and bidi characters escaped), cut short."""
    if not isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "…"
    if len(value) > limit:
        return repr(value[:limit]) + f"… ({len(value)} characters)"
    return repr(value)


def echo_problem(name: str, echoed: object, asked: str) -> str | None:
    """Why a tracking's echo of the number or the carrier asked about (``name``, the answer's field)
    does not show that it is about the parcel asked; None when it does.

    An answer about another parcel (a carrier's cache or a proxy mixing two answers up) could say
    ``returned`` and refund a gift still on its way. So the echo is required, not only compared when
    present: the contract lists it, and the sandbox and kuaidi100 always send it. It is compared as
    credex reads a number a user types (``tracking.check_express_no``): plain spaces around it
    forgiven, case kept, as credex keeps and compares numbers everywhere (a waybill is unique by
    carrier and number as the carrier issued them)."""
    if echoed is None or echoed == "":
        return f"{name} is missing: the answer does not say which parcel it is about"
    if not isinstance(echoed, str) or echoed.strip(" ") != asked.strip(" "):
        return f"{name} is {shown(echoed)}, not {shown(asked)}: the answer is about another parcel"
    return None


def in_utc(moment: datetime, *, naive=UTC) -> datetime:
    """``moment`` in UTC (one without an offset taken in ``naive``). A time UTC cannot hold
    (year 1 east of Greenwich, 9999 west of it) is a ValueError like any unreadable time."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=naive)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"a time out of range in UTC: {moment.isoformat()}") from None


def iso(moment: datetime) -> str:
    """ISO 8601 in UTC with its offset, as every time credex prints."""
    return in_utc(moment).isoformat()


# --- what a caller catches ---------------------------------------------------------------------


class CarrierError(CredexError):
    """Every error of a carrier call, whichever provider raised it: ``except CarrierError``.

    Its exit code and JSON code come from the class it is combined with (``Unavailable``,
    ``CarrierRejected``, ``UnknownParcel``), so the CLI reports it as before.

    ``final``: False means try again later (the carrier was not reached, or its answer was damaged
    on the way); True means the carrier has answered for good and the same request will get the
    same answer. ``http_status`` and ``error_code`` (the carrier's own ``error.code``, kuaidi100's
    ``returnCode``, or credex's ``invalid_answer``) are for code; ``reason`` is them in a few words
    ("HTTP 409 conflict"), short enough for a ``last_error`` column.
    """

    final: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.error_code = error_code
        described = " ".join(
            part for part in (f"HTTP {http_status}" if http_status else "", error_code or "") if part
        )
        self.reason = reason or described or "carrier error"


class CarrierUnreachable(CarrierError, Unavailable):
    """Try again later (exit 69): no answer within the bound on total time (timeouts, dropped
    connections, 5xx, 429 past the bound), or an answer that is not a JSON document at all."""

    final = False


class CarrierRefusal(CarrierError, CarrierRejected):
    """Final (exit 1): the carrier answered and asking again will not change its answer (400, 401,
    403, 404, 409, 422 and the rest of 4xx but 429; kuaidi100's failure codes; an answer that breaks
    the contract). The warehouse answers ``shipment.failed`` with ``reason``."""

    final = True


class CarrierKeyRefused(CarrierRefusal):
    """401 or 403: the carrier refused the API key. Final for this request, and for every other one
    until the key is fixed."""


class InvalidCarrierAnswer(CarrierRefusal):
    """A JSON answer that breaks the contract: a field missing or of the wrong type, a tracking number
    that is not a short printable token, a status that is not text, a tracking about another parcel
    than the one asked (``echo_problem``). Final: the carrier replays the same answer to the same
    idempotency key, so asking again cannot make it readable. Nothing of it is returned, so nothing
    of it can be stored."""

    code = "invalid_carrier_answer"


class ParcelNotFound(CarrierRefusal, UnknownParcel):
    """The carrier knows no parcel with this express number (404; kuaidi100 ``returnCode`` 500)."""

    code = "unknown_parcel"


class UnknownShipment(CarrierRefusal):
    """The carrier knows no shipment with this id (404 on a cancel)."""

    code = "unknown_shipment"


# --- what a carrier answers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Waybill:
    """The carrier's answer to a shipment request: who carries the parcel, under which number.

    ``shipment_id`` is the carrier's handle for ``cancel_shipment``: keep it with the waybill.
    """

    carrier: str
    express_no: str
    shipment_id: str | None = None
    status: str = "info_received"
    created_at: datetime | None = None


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"  # no parcel will leave: the waybill is void
    ALREADY_PICKED_UP = "already_picked_up"  # too late: the parcel is with the carrier


@dataclass(frozen=True)
class CancelResult:
    """The carrier's answer to a cancel. Both outcomes are answers, not errors: a parcel already
    picked up is the warehouse's "refused", not a failure to reach the carrier."""

    outcome: CancelOutcome
    shipment_id: str
    carrier: str | None = None
    express_no: str | None = None
    cancelled_at: datetime | None = None
    detail: str = ""  # the carrier's words, when it said no (one line, at most 500 characters)

    @property
    def cancelled(self) -> bool:
        return self.outcome is CancelOutcome.CANCELLED

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": str(self.outcome),
            "shipment_id": self.shipment_id,
            "carrier": self.carrier,
            "express_no": self.express_no,
            "cancelled_at": None if self.cancelled_at is None else iso(self.cancelled_at),
            "detail": self.detail,
        }


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

    Every failure is a ``CredexError`` and, when it comes from the carrier, a ``CarrierError``:
    ``CarrierUnreachable`` (exit 69, try again later) or a ``CarrierRefusal`` (exit 1, final), such
    as ``ParcelNotFound`` for a number the carrier does not know. Bad arguments (an idempotency key
    or shipment id that is not a printable token) are ``InvalidInput`` before anything is sent.
    """

    provider: str = ""
    issues_waybills: bool = True  # False for a tracking-only provider: it can neither create nor cancel
    default_carrier: str | None = None  # the carrier code ``track`` asks about when given none

    def __init__(self, http: Any, *, secrets: tuple[str | None, ...] = ()) -> None:
        """``secrets``: the values of the settings the client sends (an API key, a customer id), hidden
        wherever the carrier's own text (its error words, codes, checkpoints, values of an answer
        credex cannot read) goes into a message, a reason, a log line or a stored answer."""
        self._http = http
        self._secrets = secret_pattern(*secrets)

    def _hide(self, text: str) -> str:
        """A carrier's text with the configured secrets hidden by value (``errors.redact``)."""
        return hide_secrets(text, self._secrets)

    def _redact(self, text: str) -> str:
        """``errors.redact`` of a carrier's text: by pattern, and the configured secrets by value."""
        return redact(text, self._secrets)

    def _said(self, value: object, limit: int = TEXT_LIMIT) -> str:
        """A carrier's words for a message or a reason: redacted, then one safe line cut at ``limit``
        (in that order: a cut through a secret would leave its beginning)."""
        return clean_text(self._redact(str(value)), limit)

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

    def cancel_shipment(self, shipment_id: str, *, idempotency_key: str) -> CancelResult:
        """Ask the carrier to void a waybill before pick-up. Idempotent: asked again, the same answer.

        Returns ``CancelResult`` with outcome ``cancelled`` or ``already_picked_up``; raises
        ``UnknownShipment`` (final) when the carrier knows no such shipment.
        """
        raise NotImplementedError

    def track(self, express_no: str, *, carrier: str | None = None, phone: str | None = None) -> Tracking:
        """Where the parcel is now, checkpoints newest first."""
        raise NotImplementedError

    def _send(self, method: str, path: str, *, what: str, **request: Any) -> Any:
        """The retrying HTTP call; a carrier not reached within the bound is ``CarrierUnreachable``."""
        try:
            return self._http.send(method, path, what=what, **request)
        except Unavailable as error:
            if isinstance(error, CarrierError):
                raise
            raise CarrierUnreachable(error.message, reason="unreachable") from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CarrierClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        # Only the provider and the address: never a key, a header or a signature.
        return f"<{type(self).__name__} {self.provider} at {self._http.where}>"


def cancel_key(key: str) -> str:
    """The idempotency key of the cancel of a shipment asked for with ``key``: its own, so that a
    carrier keying requests across its endpoints never takes the cancel for a reused create key."""
    return f"cancel-{key}"[:128]


def require_token(value: object, what: str) -> str:
    """An idempotency key or a shipment id as it may travel in a header or a path, else InvalidInput."""
    if not is_token(value):
        raise InvalidInput(
            f"{what} must be printable ASCII without spaces, 1 to 128 characters, got {shown(value)}"
        )
    return value  # type: ignore[return-value]
