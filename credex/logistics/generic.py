"""The generic carrier contract (logistics.md): JSON over HTTP with a bearer key. The sandbox speaks it.

How an answer is read, and what is done with one that cannot be:

- A success whose body is not a JSON object at all (a gateway's HTML page, a body cut short, a
  list) is retried like a 503, within the same bound: it was damaged on the way or came from
  something in front of the carrier, so another attempt may well read fine. Past the bound it is
  ``CarrierUnreachable`` (try again later).
- A JSON object that breaks the contract (a field missing or of the wrong type, a tracking number
  that is not a short printable token, a status that is not text, a tracking whose echo of the
  number or carrier is not the one asked) is ``InvalidCarrierAnswer``, final: it is the carrier's
  own answer, and it replays that answer to the same idempotency key. Nothing of it is returned,
  so nothing of it can be stored.
- 4xx other than 429 is a ``CarrierRefusal`` (final) with the status and the carrier's error code.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from credex.errors import json_object, printable
from credex.logistics.model import (
    STATUSES,
    CancelOutcome,
    CancelResult,
    CarrierClient,
    CarrierError,
    CarrierKeyRefused,
    CarrierRefusal,
    CarrierUnreachable,
    Checkpoint,
    InvalidCarrierAnswer,
    ParcelNotFound,
    Tracking,
    UnknownShipment,
    Waybill,
    cancel_key,
    clean_text,
    echo_problem,
    in_utc,
    is_carrier_code,
    is_express_no,
    is_token,
    require_token,
    shown,
)
from credex.logistics.retrying import RetryingHttp

DEFAULT_CARRIER = "sandbox"
ALREADY_PICKED_UP = "already_picked_up"  # the contract's error code of a cancel that came too late


def parse_time(value: object) -> datetime:
    """An RFC 3339 time from the carrier, in UTC (a time without offset is taken as UTC)."""
    if not isinstance(value, str):
        raise ValueError(f"not a time: {printable(value)}")
    return in_utc(datetime.fromisoformat(value.strip()))


def normalise_status(value: str) -> str:
    """One of STATUSES; a status credex does not know is an exception for a person to look at."""
    text = value.strip().lower().replace("-", "_").replace(" ", "_")
    return text if text in STATUSES else "exception"


def _damaged(response: httpx.Response) -> str | None:
    """A success that is not a JSON object at all: worth another attempt (the retry hook)."""
    if 200 <= response.status_code < 300 and json_object(response.content) is None:
        return "an answer credex cannot read (not a JSON object)"
    return None


class _Broken(ValueError):
    """A field of a JSON answer that breaks the contract (turned into InvalidCarrierAnswer)."""


def _field(document: dict[str, Any], name: str) -> object:
    value = document.get(name)
    if value is None:
        raise _Broken(f"{name} is missing")
    return value


def _express_no(value: object, name: str = "tracking_number") -> str:
    if not is_express_no(value):
        raise _Broken(
            f"{name} is not an express number (letters, digits and '-', at most 64): {shown(value)}"
        )
    return value  # type: ignore[return-value]


def _carrier_code(value: object, name: str = "carrier") -> str:
    if not is_carrier_code(value):
        raise _Broken(f"{name} is not a carrier code: {shown(value)}")
    return value  # type: ignore[return-value]


def _shipment_id(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not is_token(value):
        raise _Broken(f"shipment_id is not a printable token of at most 128 characters: {shown(value)}")
    return value  # type: ignore[return-value]


def _status(value: object, name: str = "status") -> str:
    if not isinstance(value, str):
        raise _Broken(f"{name} is not text: {shown(value)}")
    return normalise_status(value)


def _time(value: object, name: str) -> datetime:
    try:
        return parse_time(value)
    except (ValueError, TypeError):
        raise _Broken(f"{name} is not an RFC 3339 time: {shown(value)}") from None


def _optional_time(document: dict[str, Any], name: str) -> datetime | None:
    value = document.get(name)
    return None if value in (None, "") else _time(value, name)


def _optional_text(value: object, name: str, hide: Callable[[str], str]) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Broken(f"{name} is not text: {shown(value)}")
    return clean_text(hide(value)) or None


class GenericCarrier(CarrierClient):
    provider = "generic"

    def __init__(
        self, http: RetryingHttp, *, default_carrier: str | None = None, api_key: str | None = None
    ) -> None:
        super().__init__(http, secrets=(api_key,))
        self.default_carrier = default_carrier or DEFAULT_CARRIER

    def _error_of(self, response: httpx.Response) -> tuple[str | None, str]:
        """The carrier's ``{"error": {"code", "message"}}``: its code (or None) and its words, each
        one safe line with the secrets hidden (a carrier may quote the key it refused)."""
        error = (json_object(response.content) or {}).get("error")
        if not isinstance(error, dict):
            return None, ""
        code = error.get("code")
        code = (self._said(code, 64) or None) if isinstance(code, str) else None
        message = error.get("message")
        words = self._said(message, 200) if isinstance(message, str) else ""
        return code, words or code or ""

    def create_shipment(
        self,
        *,
        idempotency_key: str,
        order_ref: str,
        recipient: dict[str, str],
        items: list[dict[str, Any]],
    ) -> Waybill:
        key = require_token(idempotency_key, "the idempotency key")
        body = {
            "order_ref": order_ref,
            "recipient": {
                "name": recipient.get("name", ""),
                "phone": recipient.get("phone", ""),
                "address": recipient.get("address", ""),
            },
            "items": [{"sku": item["sku"], "quantity": item["quantity"]} for item in items],
        }
        what = f"shipment {key}"
        response = self._send(
            "POST",
            "/v1/shipments",
            what=what,
            json=body,
            headers={"Idempotency-Key": key},
            retryable_answer=_damaged,
        )
        if response.status_code in (200, 201):
            answer = self._answer(response, what)
            try:
                return Waybill(
                    carrier=_carrier_code(_field(answer, "carrier")),
                    express_no=_express_no(_field(answer, "tracking_number")),
                    shipment_id=_shipment_id(_field(answer, "shipment_id")),
                    status=_status(answer.get("status", "info_received")),
                    created_at=_optional_time(answer, "created_at"),
                )
            except _Broken as broken:
                raise self._void_unreadable_waybill(response, answer, key, what, broken) from None
        if response.status_code == 409:
            code, _ = self._error_of(response)
            raise CarrierRefusal(
                f"the carrier refused {what}: the idempotency key {key} was already used "
                f"with other content (HTTP 409)",
                http_status=409,
                error_code=code or "conflict",
            )
        raise self._refusal(response, what)

    def cancel_shipment(self, shipment_id: str, *, idempotency_key: str) -> CancelResult:
        if isinstance(shipment_id, int) and not isinstance(shipment_id, bool):
            shipment_id = str(shipment_id)
        shipment = require_token(shipment_id, "the shipment id")
        key = require_token(idempotency_key, "the idempotency key")
        what = f"the cancel of shipment {shipment}"
        response = self._send(
            "POST",
            f"/v1/shipments/{quote(shipment, safe='')}/cancel",
            what=what,
            headers={"Idempotency-Key": key},
            retryable_answer=_damaged,
        )
        status = response.status_code
        if status in (200, 201):
            answer = self._answer(response, what)
            try:
                return self._cancelled(answer, shipment)
            except _Broken as broken:
                raise self._invalid(response, what, broken) from None
        code, words = self._error_of(response)
        if status == 409 and code == ALREADY_PICKED_UP:
            return CancelResult(CancelOutcome.ALREADY_PICKED_UP, shipment, detail=words)
        if status == 404:
            raise UnknownShipment(
                f"the carrier knows no shipment {shipment} to cancel (HTTP 404)",
                http_status=404,
                error_code=code or "not_found",
            )
        raise self._refusal(response, what)

    def _void_unreadable_waybill(
        self, response: httpx.Response, answer: dict[str, Any], key: str, what: str, broken: _Broken
    ) -> CarrierError:
        """A waybill answer that breaks the contract may still be a shipment the carrier made: left
        live, a parcel could go out for a redemption that failed and was refunded. When its id is
        readable, it is cancelled (``cancel_key`` of the same key) before the refusal is final; a cancel
        that cannot be made now makes the call worth asking again (the same key replays the same
        answer, and the cancel is tried again)."""
        try:
            shipment = _shipment_id(answer.get("shipment_id"))
        except _Broken:
            return self._invalid(response, what, broken)  # nothing credex could name to the carrier
        try:
            result = self.cancel_shipment(shipment, idempotency_key=cancel_key(key))
        except CarrierUnreachable as unreachable:
            error = self._invalid(response, what, broken)
            pending = f"its shipment {shipment} could not be cancelled yet: {unreachable.message}"
            return CarrierUnreachable(
                self._redact(f"{error.message}; {pending}"),
                http_status=error.http_status,
                reason=self._redact(f"{error.reason}; cancel of {shipment} pending"),
            )
        except CarrierError as refused:  # unknown to the carrier, or a cancel refused for good
            note = f"cancelling its shipment {shipment} failed: {refused.message}"
        else:
            done = "was cancelled at the carrier" if result.cancelled else "could not be cancelled: picked up"
            note = f"its shipment {shipment} {done}"
        return self._invalid(response, what, broken, note)

    @staticmethod
    def _cancelled(answer: dict[str, Any], shipment: str) -> CancelResult:
        status = answer.get("status")
        if status != "cancelled":
            raise _Broken(f"status is {shown(status)}, where a cancel answers 'cancelled'")
        if answer.get("shipment_id") is not None and _shipment_id(answer["shipment_id"]) != shipment:
            raise _Broken(f"shipment_id is {shown(answer['shipment_id'])}, not the one asked to cancel")
        number = answer.get("tracking_number")
        carrier = answer.get("carrier")
        return CancelResult(
            CancelOutcome.CANCELLED,
            shipment,
            carrier=None if carrier is None else _carrier_code(carrier),
            express_no=None if number is None else _express_no(number),
            cancelled_at=_optional_time(answer, "cancelled_at"),
        )

    def track(self, express_no: str, *, carrier: str | None = None, phone: str | None = None) -> Tracking:
        carrier = carrier or self.default_carrier
        what = f"the tracking of {express_no}"
        path = f"/v1/trackings/{quote(carrier, safe='')}/{quote(express_no, safe='')}"
        response = self._send("GET", path, what=what, retryable_answer=_damaged)
        if response.status_code == 404:
            code, _ = self._error_of(response)
            raise ParcelNotFound(
                f"carrier {carrier} knows no parcel {express_no}", http_status=404, error_code=code
            )
        if response.status_code != 200:
            raise self._refusal(response, what)
        answer = self._answer(response, what)
        try:
            for name, asked in (("tracking_number", express_no), ("carrier", carrier)):
                if problem := echo_problem(name, answer.get(name), asked):
                    raise _Broken(problem)
            return Tracking(
                carrier=carrier,
                express_no=express_no,
                status=_status(_field(answer, "status")),
                checkpoints=self._checkpoints(answer.get("checkpoints")),
                updated_at=_optional_time(answer, "updated_at"),
            )
        except _Broken as broken:
            raise self._invalid(response, what, broken) from None

    def _checkpoints(self, points: object) -> tuple[Checkpoint, ...]:
        if points is None:
            return ()
        if not isinstance(points, list):
            raise _Broken(f"checkpoints is not a list: {shown(points)}")
        checkpoints = []
        for point in points:
            if not isinstance(point, dict):
                raise _Broken(f"a checkpoint is not an object: {shown(point)}")
            checkpoints.append(
                Checkpoint(
                    time=_time(point.get("time"), "checkpoint time"),
                    status=_status(point.get("status"), "checkpoint status"),
                    message=_optional_text(point.get("message"), "checkpoint message", self._hide) or "",
                    location=_optional_text(point.get("location"), "checkpoint location", self._hide),
                )
            )
        return tuple(sorted(checkpoints, key=lambda point: point.time, reverse=True))

    def _answer(self, response: httpx.Response, what: str) -> dict[str, Any]:
        answer = json_object(response.content)
        if answer is None:  # the retry hook lets none through; kept for a hook-less caller
            raise CarrierUnreachable(
                f"the carrier at {self._http.where} answered {what} with something credex cannot read "
                "(not a JSON object)",
                http_status=response.status_code,
                reason="unreadable answer",
            )
        return answer

    def _invalid(self, response: httpx.Response, what: str, broken: _Broken, note: str = "") -> CarrierError:
        detail = self._redact(str(broken))[:200]
        note = self._redact(note)  # it may name the carrier's shipment id
        return InvalidCarrierAnswer(
            f"the carrier at {self._http.where} answered {what} with something credex cannot read: {detail}"
            + (f"; {note}" if note else ""),
            http_status=response.status_code,
            error_code="invalid_answer",
            reason=f"HTTP {response.status_code} invalid_answer: {detail}",
        )

    def _refusal(self, response: httpx.Response, what: str) -> CarrierError:
        status = response.status_code
        code, words = self._error_of(response)
        suffix = f": {words}" if words else ""
        if status in (401, 403):
            return CarrierKeyRefused(
                f"the carrier refused the API key for {what} (HTTP {status}): check CREDEX_LOGISTICS_API_KEY",
                http_status=status,
                error_code=code,
            )
        if 400 <= status < 500:
            return CarrierRefusal(
                f"the carrier refused {what} (HTTP {status}){suffix}", http_status=status, error_code=code
            )
        # Other 5xx (501, 505...) and surprises (3xx): the carrier cannot serve this now; a fix on
        # its side may change that, so it is not a final answer about the shipment.
        return CarrierUnreachable(
            f"the carrier at {self._http.where} failed {what} (HTTP {status}){suffix}",
            http_status=status,
            error_code=code,
        )
