"""The generic carrier contract (logistics.md): JSON over HTTP with a bearer key. The sandbox speaks it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from credex.errors import CarrierRejected, CredexError, Unavailable, UnknownParcel, redact
from credex.logistics.model import STATUSES, CarrierClient, Checkpoint, Tracking, Waybill
from credex.logistics.retrying import RetryingHttp

DEFAULT_CARRIER = "sandbox"


def parse_time(value: object) -> datetime:
    """An RFC 3339 time from the carrier, in UTC (a time without offset is taken as UTC)."""
    if not isinstance(value, str):
        raise ValueError(f"not a time: {value!r}")
    moment = datetime.fromisoformat(value.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def normalise_status(value: object) -> str:
    """One of STATUSES; a status credex does not know is an exception for a person to look at."""
    text = str(value or "").strip().lower().replace("-", "_").replace(" ", "_")
    return text if text in STATUSES else "exception"


def _error_detail(response: httpx.Response) -> str:
    """The carrier's own words from ``{"error": {"code", "message"}}``, kept short and redacted."""
    try:
        error = response.json().get("error") or {}
        detail = str(error.get("message") or error.get("code") or "").strip()
    except (ValueError, AttributeError):
        detail = ""
    return redact(detail)[:200]


class GenericCarrier(CarrierClient):
    provider = "generic"

    def __init__(self, http: RetryingHttp, *, default_carrier: str | None = None) -> None:
        super().__init__(http)
        self.default_carrier = default_carrier or DEFAULT_CARRIER

    def create_shipment(
        self,
        *,
        idempotency_key: str,
        order_ref: str,
        recipient: dict[str, str],
        items: list[dict[str, Any]],
    ) -> Waybill:
        body = {
            "order_ref": order_ref,
            "recipient": {
                "name": recipient.get("name", ""),
                "phone": recipient.get("phone", ""),
                "address": recipient.get("address", ""),
            },
            "items": [{"sku": item["sku"], "quantity": item["quantity"]} for item in items],
        }
        what = f"shipment {idempotency_key}"
        response = self._http.send(
            "POST", "/v1/shipments", what=what, json=body, headers={"Idempotency-Key": idempotency_key}
        )
        if response.status_code in (200, 201):
            answer = self._json(response, what)
            try:
                return Waybill(
                    carrier=str(answer["carrier"]),
                    express_no=str(answer["tracking_number"]),
                    shipment_id=None if answer.get("shipment_id") is None else str(answer["shipment_id"]),
                    status=normalise_status(answer.get("status", "info_received")),
                    created_at=parse_time(answer["created_at"]) if answer.get("created_at") else None,
                )
            except (KeyError, TypeError, ValueError) as error:
                raise self._unreadable(what, error) from None
        if response.status_code == 409:
            raise CarrierRejected(
                f"the carrier refused {what}: the idempotency key {idempotency_key} was already used "
                f"with other content (HTTP 409)"
            )
        raise self._refusal(response, what)

    def track(self, express_no: str, *, carrier: str | None = None, phone: str | None = None) -> Tracking:
        carrier = carrier or self.default_carrier
        what = f"the tracking of {express_no}"
        path = f"/v1/trackings/{quote(carrier, safe='')}/{quote(express_no, safe='')}"
        response = self._http.send("GET", path, what=what)
        if response.status_code == 404:
            raise UnknownParcel(f"carrier {carrier} knows no parcel {express_no}")
        if response.status_code != 200:
            raise self._refusal(response, what)
        answer = self._json(response, what)
        try:
            checkpoints = tuple(
                Checkpoint(
                    time=parse_time(point["time"]),
                    status=normalise_status(point.get("status")),
                    message=str(point.get("message") or ""),
                    location=None if point.get("location") in (None, "") else str(point["location"]),
                )
                for point in answer.get("checkpoints") or []
            )
            checkpoints = tuple(sorted(checkpoints, key=lambda point: point.time, reverse=True))
            return Tracking(
                carrier=str(answer.get("carrier") or carrier),
                express_no=str(answer.get("tracking_number") or express_no),
                status=normalise_status(answer.get("status")),
                checkpoints=checkpoints,
                updated_at=parse_time(answer["updated_at"]) if answer.get("updated_at") else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise self._unreadable(what, error) from None

    def _json(self, response: httpx.Response, what: str) -> dict[str, Any]:
        try:
            answer = response.json()
        except ValueError:
            raise self._unreadable(what, "not JSON") from None
        if not isinstance(answer, dict):
            raise self._unreadable(what, "not a JSON object")
        return answer

    def _unreadable(self, what: str, detail: object) -> Unavailable:
        return Unavailable(
            f"the carrier at {self._http.where} answered {what} with something credex cannot read "
            f"({redact(str(detail))[:120]})"
        )

    def _refusal(self, response: httpx.Response, what: str) -> CredexError:
        status = response.status_code
        detail = _error_detail(response)
        suffix = f": {detail}" if detail else ""
        if status in (401, 403):
            return CarrierRejected(
                f"the carrier refused the API key for {what} (HTTP {status}): check CREDEX_LOGISTICS_API_KEY"
            )
        if 400 <= status < 500:
            return CarrierRejected(f"the carrier refused {what} (HTTP {status}){suffix}")
        # Other 5xx (501, 505...) and surprises (3xx): the carrier cannot serve this, retrying won't help.
        return Unavailable(f"the carrier at {self._http.where} failed {what} (HTTP {status}){suffix}")
