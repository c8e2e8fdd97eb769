"""The generic carrier client over httpx.MockTransport: the contract, status mapping, retry rules,
the bound on total time, error mapping, and the API key kept out of every message.

(Over 400 lines on purpose: the contract in logistics.md is one table of requests and answers,
and its tests follow it in order; they share one fake transport.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import traceback
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import unquote

import httpx
import pytest

from credex.errors import (
    CarrierNotConfigured,
    CarrierRejected,
    CredexError,
    InvalidInput,
    Unavailable,
    UnknownParcel,
)
from credex.logistics import (
    STATUSES,
    CancelOutcome,
    CarrierError,
    CarrierKeyRefused,
    CarrierRefusal,
    CarrierUnreachable,
    InvalidCarrierAnswer,
    ParcelNotFound,
    UnknownShipment,
    is_final,
)
from credex.logistics.retrying import RetryPolicy, retry_after_seconds
from tests.logistics_fakes import (
    API_KEY,
    Carrier,
    ContractCarrier,
    FakeClock,
    make_client,
    timeout_after_read,
)

SHIPMENT = {
    "shipment_id": "shp-9",
    "carrier": "sandbox",
    "tracking_number": "SIM0000000042",
    "status": "info_received",
    "created_at": "2026-11-24T10:00:00Z",
}


def tracking(status: str = "in_transit", checkpoints: list[dict] | None = None) -> dict:
    return {
        "tracking_number": "SIM0000000042",
        "carrier": "sandbox",
        "status": status,
        "updated_at": "2026-11-24T12:00:00Z",
        "checkpoints": checkpoints
        if checkpoints is not None
        else [{"time": "2026-11-24T12:00:00Z", "status": status, "message": "moving", "location": "Hub"}],
    }


def echoing(status: str = "in_transit"):
    """A tracking answer about whichever parcel the request asks for, echoing it as the contract does."""

    def answer(request: httpx.Request) -> httpx.Response:
        carrier, number = [unquote(part) for part in request.url.raw_path.decode().split("/")[3:5]]
        return ok({**tracking(status), "carrier": carrier, "tracking_number": number})

    return answer


def ok(document: object, status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=document, headers=headers)


def error(status: int, code: str = "nope", message: str = "refused", **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}}, headers=headers)


def create(client, key: str = "redemption-42"):
    return client.create_shipment(
        idempotency_key=key,
        order_ref=key,
        recipient={"name": "u-1001", "phone": "", "address": "8 Long Road"},
        items=[{"sku": "SHAMPOO-500", "quantity": 1}],
    )


# --- the contract -------------------------------------------------------------------------------


def test_a_shipment_is_created_with_the_idempotency_key_the_bearer_key_and_the_contract_body():
    carrier = Carrier(ok(SHIPMENT, 201))
    with make_client(carrier) as client:
        waybill = create(client)
    assert (waybill.carrier, waybill.express_no, waybill.shipment_id) == ("sandbox", "SIM0000000042", "shp-9")
    assert waybill.created_at == datetime(2026, 11, 24, 10, tzinfo=UTC)
    [request] = carrier.requests
    assert request.method == "POST" and request.url == "http://carrier.test/v1/shipments"
    assert request.headers["Idempotency-Key"] == "redemption-42"
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert json.loads(request.content) == {
        "order_ref": "redemption-42",
        "recipient": {"name": "u-1001", "phone": "", "address": "8 Long Road"},
        "items": [{"sku": "SHAMPOO-500", "quantity": 1}],
    }


def test_asking_twice_with_one_key_makes_one_shipment_and_gives_its_waybill_both_times():
    carrier = ContractCarrier()
    with make_client(carrier) as client:
        first = create(client, "0b6c6a43-msg")
        again = create(client, "0b6c6a43-msg")
    [parcel] = carrier.books.shipments()
    assert parcel["create_calls"] == 2 and carrier.statuses == [201, 200]
    assert first == again
    assert (first.express_no, first.shipment_id) == (parcel["tracking_number"], parcel["shipment_id"])
    assert [request.headers["Idempotency-Key"] for request in carrier.requests] == ["0b6c6a43-msg"] * 2
    assert carrier.requests[0].content == carrier.requests[1].content


def test_no_authorization_header_is_sent_without_an_api_key():
    carrier = Carrier(ok(tracking()))
    with make_client(carrier, logistics_api_key=None) as client:
        client.track("SIM0000000042")
    assert "Authorization" not in carrier.requests[0].headers


def test_tracking_asks_for_the_carrier_and_number_in_the_path_and_defaults_to_the_sandbox():
    carrier = Carrier(echoing())
    with make_client(carrier) as client:
        client.track("SIM0000000042")
        client.track("SF/1 2", carrier="shunfeng")
    assert [r.url.raw_path for r in carrier.requests] == [
        b"/v1/trackings/sandbox/SIM0000000042",
        b"/v1/trackings/shunfeng/SF%2F1%202",
    ]


def test_the_configured_default_carrier_is_used_when_none_is_given():
    carrier = Carrier(echoing())
    with make_client(carrier, logistics_carrier="zto") as client:
        client.track("7700")
    assert carrier.requests[0].url.path == "/v1/trackings/zto/7700"


def test_delivered_and_returned_are_the_only_final_statuses():
    assert "returned" in STATUSES
    assert [status for status in STATUSES if is_final(status)] == ["delivered", "returned"]
    assert not is_final(None) and not is_final("cancelled")


@pytest.mark.parametrize("status", STATUSES)
def test_every_normalised_status_is_kept(status):
    with make_client(Carrier(ok(tracking(status)))) as client:
        result = client.track("SIM0000000042")
    assert result.status == status and result.checkpoints[0].status == status


@pytest.mark.parametrize(
    ("given", "expected"),
    [("Out-For-Delivery", "out_for_delivery"), ("in transit", "in_transit"), ("lost_in_space", "exception")],
)
def test_statuses_are_normalised_and_unknown_ones_need_a_look(given, expected):
    with make_client(Carrier(ok(tracking(given)))) as client:
        assert client.track("SIM0000000042").status == expected


def test_checkpoints_come_back_newest_first_in_utc_whatever_order_and_offset_the_carrier_used():
    points = [
        {"time": "2026-11-24T18:00:00+08:00", "status": "info_received", "message": "label", "location": ""},
        {"time": "2026-11-24T12:30:00Z", "status": "in_transit", "message": "hub", "location": "Hangzhou"},
    ]
    with make_client(Carrier(ok(tracking("in_transit", points)))) as client:
        result = client.track("SIM0000000042").to_json(redemption_id=7)
    assert result == {
        "redemption_id": 7,
        "express_no": "SIM0000000042",
        "carrier": "sandbox",
        "status": "in_transit",
        "checkpoints": [
            {
                "time": "2026-11-24T12:30:00+00:00",
                "status": "in_transit",
                "message": "hub",
                "location": "Hangzhou",
            },
            {
                "time": "2026-11-24T10:00:00+00:00",
                "status": "info_received",
                "message": "label",
                "location": None,
            },
        ],
    }


# --- error mapping ------------------------------------------------------------------------------


def test_an_unknown_number_is_an_unknown_parcel_exit_1():
    carrier = Carrier(error(404, "not_found", "no parcel"))
    with make_client(carrier) as client, pytest.raises(UnknownParcel) as raised:
        client.track("SIM0000000099")
    assert raised.value.exit_code == 1 and raised.value.code == "unknown_parcel"
    assert isinstance(raised.value, ParcelNotFound) and raised.value.final and raised.value.http_status == 404
    assert "SIM0000000099" in raised.value.message
    assert len(carrier.requests) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 422])
def test_a_final_refusal_is_not_retried_and_is_carrier_rejected(status):
    carrier = Carrier(error(status, "bad", "the carrier says no"))
    clock = FakeClock()
    with make_client(carrier, clock=clock) as client, pytest.raises(CarrierRejected) as raised:
        create(client)
    assert len(carrier.requests) == 1 and clock.sleeps == []
    assert raised.value.exit_code == 1 and raised.value.code == "carrier_rejected"
    assert f"HTTP {status}" in raised.value.message


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, "bad_request", CarrierRefusal),
        (401, "unauthorized", CarrierKeyRefused),
        (403, "forbidden", CarrierKeyRefused),
        (404, "not_found", CarrierRefusal),
        (409, "conflict", CarrierRefusal),
        (422, "invalid_shipment", CarrierRefusal),
    ],
)
def test_a_final_refusal_carries_the_status_and_the_carriers_code_for_shipment_failed(status, code, kind):
    with make_client(Carrier(error(status, code, "no"))) as client, pytest.raises(CarrierError) as raised:
        create(client)
    refusal = raised.value
    assert type(refusal) is kind and refusal.final is True
    assert (refusal.http_status, refusal.error_code, refusal.reason) == (
        status,
        code,
        f"HTTP {status} {code}",
    )


def test_a_refusal_without_an_error_body_still_has_its_status_as_reason():
    with (
        make_client(Carrier(httpx.Response(422, text="nope"))) as client,
        pytest.raises(CarrierRefusal) as raised,
    ):
        create(client)
    assert (raised.value.http_status, raised.value.error_code, raised.value.reason) == (422, None, "HTTP 422")


@pytest.mark.parametrize(
    ("answer", "http_status"),
    [
        (error(503), None),  # gave up after retrying: the message says what the last attempt got
        (error(429, **{"Retry-After": "120"}), None),
        (lambda r: httpx.ReadTimeout("timed out", request=r), None),
        (lambda r: httpx.RemoteProtocolError("Server disconnected", request=r), None),
        (error(501), 501),  # not retried: a 5xx the carrier will not serve now
    ],
    ids=["503", "429-past-the-bound", "timeout", "dropped", "501"],
)
def test_try_again_later_is_its_own_type_apart_from_final_refusals(answer, http_status):
    with (
        make_client(Carrier(answer), total_timeout=5) as client,
        pytest.raises(CarrierUnreachable) as raised,
    ):
        create(client)
    error_ = raised.value
    assert error_.final is False and not isinstance(error_, CarrierRejected)
    assert isinstance(error_, Unavailable) and error_.exit_code == 69
    assert error_.http_status == http_status and error_.reason


def test_the_same_key_with_another_body_is_final_with_a_conflict_reason():
    carrier = ContractCarrier()
    with make_client(carrier) as client:
        create(client, "msg-1")
        with pytest.raises(CarrierRefusal) as raised:
            client.create_shipment(
                idempotency_key="msg-1",
                order_ref="another order",
                recipient={"name": "u-2", "phone": "", "address": "9 Short Lane"},
                items=[{"sku": "SOAP", "quantity": 2}],
            )
    assert raised.value.reason == "HTTP 409 conflict" and "msg-1" in raised.value.message
    assert len(carrier.books.shipments()) == 1


def test_a_refused_key_says_which_setting_to_check():
    with make_client(Carrier(error(401))) as client, pytest.raises(CarrierRejected) as raised:
        client.track("SIM0000000042")
    assert "CREDEX_LOGISTICS_API_KEY" in raised.value.message


def test_the_same_key_with_another_body_is_a_conflict_the_warehouse_can_read():
    with make_client(Carrier(error(409, "conflict"))) as client, pytest.raises(CarrierRejected) as raised:
        create(client, "redemption-7")
    assert "redemption-7" in raised.value.message and "other content" in raised.value.message


@pytest.mark.parametrize("status", [501, 505])
def test_a_5xx_that_is_not_worth_retrying_is_unavailable_at_once(status):
    carrier = Carrier(error(status))
    with make_client(carrier) as client, pytest.raises(Unavailable) as raised:
        client.track("SIM0000000042")
    assert len(carrier.requests) == 1 and raised.value.exit_code == 69


def undecodable(status: int, encoding: str) -> httpx.Response:
    """An answer whose body is not what its Content-Encoding says (read as it arrives, as on the wire)."""
    body = httpx.ByteStream(b'{"x": 1}')
    return httpx.Response(status, headers={"Content-Encoding": encoding}, stream=body)


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>maintenance</html>"),
        httpx.Response(200, text='{"tracking_number": "SIM00000'),
        httpx.Response(200, text=""),
        httpx.Response(200, content=b"\xff\xfe{}"),
        ok([1, 2]),
        lambda request: undecodable(200, "gzip"),
        httpx.Response(200, text="[" * 100_000 + "]" * 100_000),
    ],
    ids=[
        "html",
        "truncated-json",
        "empty",
        "not-utf8",
        "json-list",
        "not-what-its-encoding-says",
        "nested-deep",
    ],
)
def test_an_answer_that_is_not_a_json_object_is_asked_again_and_then_read(answer):
    carrier = Carrier(answer, ok(tracking("out_for_delivery")))
    clock = FakeClock()
    with make_client(carrier, clock=clock) as client:
        assert client.track("SIM0000000042").status == "out_for_delivery"
    assert len(carrier.requests) == 2 and len(clock.sleeps) == 1


@pytest.mark.parametrize("call", ["create", "track", "cancel"])
@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>maintenance</html>"),
        lambda request: undecodable(201, "gzip"),
    ],
    ids=["html", "not-what-its-encoding-says"],
)
def test_an_answer_that_is_never_a_json_object_is_try_again_later(call, answer):
    carrier = Carrier(answer)
    with make_client(carrier, total_timeout=5) as client, pytest.raises(CarrierUnreachable) as raised:
        call_carrier(client, call)
    assert raised.value.final is False and raised.value.exit_code == 69
    assert "cannot read" in raised.value.message and len(carrier.requests) > 1


class Endless(httpx.SyncByteStream):
    """A body that never ends: ``chunk`` bytes at a time, each taking ``seconds`` of the clock."""

    def __init__(self, clock: FakeClock, *, chunk: int, seconds: float) -> None:
        self.clock, self.chunk, self.seconds, self.sent = clock, chunk, seconds, 0

    def __iter__(self):
        while True:
            self.clock.now += self.seconds
            self.sent += self.chunk
            yield b"x" * self.chunk


def test_an_answer_that_keeps_coming_is_given_up_when_the_time_runs_out():
    clock = FakeClock()
    began = clock.now
    body = Endless(clock, chunk=100, seconds=0.5)  # a trickle: never too large, never a read timeout
    carrier = Carrier(lambda request: httpx.Response(200, stream=body))
    with (
        make_client(carrier, clock=clock, total_timeout=5) as client,
        pytest.raises(CarrierUnreachable) as raised,
    ):
        client.track("SIM0000000042")
    assert "still arriving when the time ran out" in raised.value.message and raised.value.exit_code == 69
    assert 5 <= clock.now - began <= 5.5 and len(carrier.requests) == 1


def test_an_answer_larger_than_a_mebibyte_is_not_read_whole():
    clock = FakeClock()
    bodies: list[Endless] = []

    def huge(request: httpx.Request) -> httpx.Response:
        bodies.append(Endless(clock, chunk=64 * 1024, seconds=0))
        return httpx.Response(201, stream=bodies[-1])

    carrier = Carrier(huge)
    with (
        make_client(carrier, clock=clock, total_timeout=60) as client,
        pytest.raises(CarrierUnreachable) as raised,
    ):
        call_carrier(client, "create")
    assert "larger than 1024 KiB" in raised.value.message and raised.value.final is False
    assert len(bodies) > 1 and all(body.sent <= 1024 * 1024 + 64 * 1024 for body in bodies)


def shipment(**changes) -> dict:
    return {**SHIPMENT, **changes}


@pytest.mark.parametrize(
    ("document", "words"),
    [
        (
            {key: value for key, value in SHIPMENT.items() if key != "tracking_number"},
            "tracking_number is missing",
        ),
        (shipment(tracking_number="SIM" + "9" * 5000), "5003 characters"),
        (shipment(tracking_number="SIM42\nerror: forged"), "'SIM42\\nerror: forged'"),
        (shipment(tracking_number="SIM\x0042"), "not an express number"),
        (shipment(tracking_number="SIM\u202e24"), "not an express number"),
        (shipment(tracking_number="ＳＩＭ４２"), "not an express number"),
        (shipment(tracking_number=42), "not an express number"),
        (shipment(carrier="sand box"), "carrier is not a carrier code"),
        (shipment(shipment_id=None), "shipment_id is missing"),
        (shipment(shipment_id="sbx 1"), "shipment_id is not a printable token"),
        (shipment(status=["info_received"]), "status is not text"),
        (shipment(created_at="yesterday"), "created_at is not an RFC 3339 time"),
    ],
    ids=[
        "no-number",
        "huge-number",
        "newline",
        "nul",
        "bidi",
        "full-width",
        "number-not-text",
        "bad-carrier",
        "no-shipment-id",
        "spaced-shipment-id",
        "status-not-text",
        "bad-time",
    ],
)
def test_a_waybill_that_breaks_the_contract_is_refused_for_good_and_never_returned(document, words):
    """Refused for good (the carrier replays it to this key), and the shipment it may stand for
    is cancelled first when its id can be named, so no waybill stays live for a failed redemption."""
    cancelled = ok({"shipment_id": "shp-9", "status": "cancelled"})
    carrier = Carrier(
        lambda request: cancelled if request.url.path.endswith("/cancel") else ok(document, 201)
    )
    clock = FakeClock()
    with make_client(carrier, clock=clock) as client, pytest.raises(InvalidCarrierAnswer) as raised:
        create(client)
    error = raised.value
    readable_id = document.get("shipment_id") == "shp-9"
    assert [request.url.path for request in carrier.requests] == ["/v1/shipments"] + (
        ["/v1/shipments/shp-9/cancel"] if readable_id else []
    )
    assert [request.headers["Idempotency-Key"] for request in carrier.requests] == ["redemption-42"] + (
        ["cancel-redemption-42"] if readable_id else []
    )
    assert clock.sleeps == []
    assert ("its shipment shp-9 was cancelled at the carrier" in error.message) is readable_id
    assert error.final and isinstance(error, CarrierRefusal) and error.exit_code == 1
    assert (error.code, error.http_status, error.error_code) == (
        "invalid_carrier_answer",
        201,
        "invalid_answer",
    )
    assert words in error.message and error.reason.startswith("HTTP 201 invalid_answer: ")
    assert "\n" not in error.message and "\x00" not in error.message and "\u202e" not in error.message
    assert len(error.message) < 400


def test_a_broken_waybill_whose_shipment_cannot_be_cancelled_yet_is_asked_again_later():
    broken = ok(shipment(tracking_number=None), 201)
    carrier = Carrier(lambda request: error(503) if request.url.path.endswith("/cancel") else broken)
    with make_client(carrier, total_timeout=3) as client, pytest.raises(CarrierUnreachable) as raised:
        create(client)
    assert not raised.value.final and "shp-9 could not be cancelled yet" in raised.value.message
    assert raised.value.reason.endswith("cancel of shp-9 pending")


def test_a_broken_waybill_whose_parcel_was_picked_up_is_final_and_says_so():
    picked_up = error(409, "already_picked_up", "on its way")
    broken = ok(shipment(tracking_number=None), 201)
    carrier = Carrier(lambda request: picked_up if request.url.path.endswith("/cancel") else broken)
    with make_client(carrier) as client, pytest.raises(InvalidCarrierAnswer) as raised:
        create(client)
    assert raised.value.final and "shp-9 could not be cancelled: picked up" in raised.value.message


@pytest.mark.parametrize(
    "document",
    [
        {"checkpoints": [{"time": "soon"}]},
        tracking(status=None),
        tracking(status=7),
        tracking(checkpoints={"time": "2026-11-24T12:00:00Z"}),
        tracking(checkpoints=["moving"]),
        tracking(checkpoints=[{"time": "2026-11-24T12:00:00Z", "status": {"tag": "x"}}]),
        tracking(checkpoints=[{"time": "2026-11-24T12:00:00Z", "status": "in_transit", "message": 5}]),
        # Times UTC cannot hold: an uncaught OverflowError, exit 70 from `credex track`.
        tracking(checkpoints=[{"time": "0001-01-01T00:00:00+01:00", "status": "in_transit"}]),
        tracking(checkpoints=[{"time": "9999-12-31T23:59:59-01:00", "status": "in_transit"}]),
        {**tracking(), "updated_at": "0001-01-01T00:00:00+05:00"},
    ],
    ids=[
        "no-status",
        "null-status",
        "number-status",
        "points-not-a-list",
        "point-not-object",
        "point-status-object",
        "message-not-text",
        "time-before-year-1-in-utc",
        "time-after-9999-in-utc",
        "updated-before-year-1-in-utc",
    ],
)
def test_a_tracking_that_breaks_the_contract_is_a_clear_final_error(document):
    carrier = Carrier(ok(document))
    with make_client(carrier) as client, pytest.raises(InvalidCarrierAnswer) as raised:
        client.track("SIM0000000042")
    assert len(carrier.requests) == 1 and "cannot read" in raised.value.message


@pytest.mark.parametrize(
    ("echo", "words"),
    [
        ({"tracking_number": "SIM0000000043"}, "tracking_number is 'SIM0000000043', not 'SIM0000000042'"),
        ({"tracking_number": "sim0000000042"}, "another parcel"),  # case is kept, as credex keeps it
        ({"tracking_number": "SIM\x00999"}, "another parcel"),
        ({"tracking_number": 42}, "tracking_number is 42"),
        ({"tracking_number": None}, "tracking_number is missing"),
        ({"tracking_number": ""}, "tracking_number is missing"),
        ({"carrier": "zto"}, "carrier is 'zto', not 'sandbox'"),
        ({"carrier": None}, "carrier is missing"),
    ],
    ids=["other-number", "other-case", "nul", "number", "null", "empty", "other-carrier", "no-carrier"],
)
def test_a_tracking_about_another_parcel_is_refused_for_good_and_never_returned(echo, words):
    """A `returned` about another parcel was taken for the one asked, and `track sync` refunded a
    gift still on its way."""
    document = {**tracking("returned"), **echo}
    carrier = Carrier(ok({key: value for key, value in document.items() if value is not None}))
    with make_client(carrier) as client, pytest.raises(InvalidCarrierAnswer) as raised:
        client.track("SIM0000000042")
    refusal = raised.value
    assert words in refusal.message and refusal.final and len(carrier.requests) == 1
    assert refusal.exit_code == 1 and refusal.to_json()["error"]["code"] == "invalid_carrier_answer"
    assert refusal.reason.startswith("HTTP 200 invalid_answer: ")


def test_an_echo_with_plain_spaces_around_the_number_is_the_number_asked():
    document = {**tracking("delivered"), "tracking_number": " SIM0000000042 "}
    with make_client(Carrier(ok(document))) as client:
        result = client.track("SIM0000000042")
    assert (result.express_no, result.carrier, result.status) == ("SIM0000000042", "sandbox", "delivered")


def test_a_tracking_is_about_the_number_asked_and_its_words_are_made_safe_to_print():
    document = tracking(
        checkpoints=[
            {
                "time": "2026-11-24T12:00:00Z",
                "status": "in_transit",
                "message": "moving\nerror: forged line\x00 \u202eevil" + "x" * 2000,
                "location": "Hub\r\n",
            },
            # A lone surrogate is valid JSON; printed or stored it failed `track` with exit 2.
            {
                "time": "2026-11-24T11:00:00Z",
                "status": "in_transit",
                "message": "lost \ud800 half",
                "location": "\udc00",
            },
        ]
    )
    body = json.dumps(document).encode()  # ASCII: the surrogates as JSON escapes, as a carrier sends them
    answer = httpx.Response(200, content=body, headers={"Content-Type": "application/json"})
    with make_client(Carrier(answer)) as client:
        result = client.track("SIM0000000042")
    point, lone = result.checkpoints
    assert (lone.message, lone.location) == ("lost \ufffd half", "\ufffd")
    assert result.express_no == "SIM0000000042"
    assert point.message.startswith("moving error: forged line   evil") and len(point.message) <= 500
    assert point.location == "Hub"
    assert not any(char in point.message for char in "\n\r\x00\u202e")


# --- retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_a_retryable_status_is_tried_again_and_then_succeeds(status):
    carrier = Carrier(error(status), ok(SHIPMENT, 201))
    clock = FakeClock()
    with make_client(carrier, clock=clock) as client:
        waybill = create(client)
    assert waybill.express_no == "SIM0000000042"
    assert len(carrier.requests) == 2 and len(clock.sleeps) == 1
    assert all(r.headers["Idempotency-Key"] == "redemption-42" for r in carrier.requests)


@pytest.mark.parametrize(
    "failure",
    [
        lambda r: httpx.ConnectError("[Errno 111] Connection refused", request=r),
        lambda r: httpx.ConnectTimeout("timed out", request=r),
        lambda r: httpx.ReadTimeout("timed out", request=r),
        lambda r: httpx.RemoteProtocolError("Server disconnected without sending a response.", request=r),
        lambda r: httpx.ReadError("[Errno 104] Connection reset by peer", request=r),
    ],
    ids=["refused", "connect-timeout", "read-timeout", "dropped", "reset"],
)
def test_timeouts_and_lost_connections_are_tried_again(failure):
    carrier = Carrier(failure, failure, ok(tracking("delivered")))
    clock = FakeClock()
    with make_client(carrier, clock=clock) as client:
        assert client.track("SIM0000000042").status == "delivered"
    assert len(carrier.requests) == 3 and len(clock.sleeps) == 2


def test_retry_after_in_seconds_is_waited_exactly():
    clock = FakeClock()
    carrier = Carrier(error(429, **{"Retry-After": "3"}), ok(tracking()))
    with make_client(carrier, clock=clock) as client:
        client.track("SIM0000000042")
    assert clock.sleeps == [3.0]


def test_retry_after_as_an_http_date_is_honoured():
    later = datetime.now(UTC) + timedelta(seconds=4)
    waited = retry_after_seconds(format_datetime(later, usegmt=True))
    assert 2.5 < waited <= 4.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_a_retry_after_past_the_bound_gives_up_at_once_instead_of_sleeping():
    clock = FakeClock()
    carrier = Carrier(error(429, **{"Retry-After": "120"}))
    with make_client(carrier, clock=clock, total_timeout=30) as client, pytest.raises(Unavailable) as raised:
        client.track("SIM0000000042")
    assert len(carrier.requests) == 1 and clock.sleeps == []
    assert "asking to wait 120 s" in raised.value.message and "within 30 s" in raised.value.message


def test_backoff_doubles_to_a_cap_with_jitter():
    backoff = dataclasses.replace(RetryPolicy().backoff, rng=random.Random(11))
    for retry in range(12):
        step = min(8.0, 0.5 * 2**retry)
        delays = [backoff.delay(retry + 1) for _ in range(200)]
        assert all(step / 2 <= delay <= step for delay in delays)
        assert len({round(delay, 6) for delay in delays}) > 150  # jittered, not one fixed wait
    assert max(backoff.delay(31) for _ in range(100)) <= 8.0


def test_the_waits_between_attempts_follow_the_capped_backoff():
    clock = FakeClock()
    carrier = Carrier(error(503))
    with make_client(carrier, clock=clock, total_timeout=1000) as client, pytest.raises(Unavailable):
        client.track("SIM0000000042")
    assert len(carrier.requests) == 8  # the policy's max_attempts
    steps = [min(8.0, 0.5 * 2**n) for n in range(7)]
    assert all(step / 2 <= slept <= step for step, slept in zip(steps, clock.sleeps, strict=True))


def test_a_carrier_that_is_down_gives_up_within_the_bound():
    clock = FakeClock()
    carrier = Carrier(lambda r: httpx.ConnectError("[Errno 111] Connection refused", request=r))
    with make_client(carrier, clock=clock, total_timeout=5) as client, pytest.raises(Unavailable) as raised:
        client.track("SIM0000000042")
    assert clock.elapsed <= 5
    assert raised.value.exit_code == 69 and raised.value.code == "unavailable"
    assert "within 5 s" in raised.value.message and "connection refused" in raised.value.message
    assert f"{len(carrier.requests)} attempts" in raised.value.message


def test_no_attempt_may_outlive_the_bound_however_long_the_read_timeout():
    clock = FakeClock()
    carrier = Carrier(lambda r: timeout_after_read(r, clock))
    with (
        make_client(carrier, clock=clock, total_timeout=12, logistics_read_timeout=10) as client,
        pytest.raises(Unavailable) as raised,
    ):
        client.track("SIM0000000042")
    reads = [r.extensions["timeout"]["read"] for r in carrier.requests]
    assert reads[0] == 10 and all(read < 10 for read in reads[1:])
    assert clock.elapsed <= 12 + 1e-9
    assert "no answer in time" in raised.value.message


def test_total_timeout_given_by_the_caller_overrides_the_setting():
    clock = FakeClock()
    carrier = Carrier(error(503))
    with (
        make_client(carrier, clock=clock, total_timeout=2, logistics_total_timeout=600) as client,
        pytest.raises(Unavailable) as raised,
    ):
        create(client)
    assert clock.elapsed <= 2 and "within 2 s" in raised.value.message


# --- cancel ------------------------------------------------------------------------------------


def call_carrier(client, call: str):
    if call == "create":
        return create(client)
    if call == "cancel":
        return client.cancel_shipment("shp-9", idempotency_key="cancel-1")
    return client.track("SIM0000000042")


def test_a_shipment_not_yet_picked_up_is_cancelled_with_the_key_and_again_gives_the_same_answer():
    carrier = ContractCarrier()
    with make_client(carrier) as client:
        waybill = create(client, "msg-1")
        first = client.cancel_shipment(waybill.shipment_id, idempotency_key="cancel-msg-7")
        again = client.cancel_shipment(waybill.shipment_id, idempotency_key="cancel-msg-7")
    assert first == again and first.cancelled and first.outcome is CancelOutcome.CANCELLED
    assert (first.shipment_id, first.express_no, first.carrier) == (
        waybill.shipment_id,
        waybill.express_no,
        "sandbox",
    )
    assert first.cancelled_at is not None and first.to_json()["outcome"] == "cancelled"
    cancels = carrier.requests[1:]
    assert [request.url.path for request in cancels] == [f"/v1/shipments/{waybill.shipment_id}/cancel"] * 2
    assert all(request.method == "POST" for request in cancels)
    assert [request.headers["Idempotency-Key"] for request in cancels] == ["cancel-msg-7"] * 2
    assert cancels[0].headers["Authorization"] == f"Bearer {API_KEY}"
    [parcel] = carrier.books.shipments()
    assert parcel["status"] == "cancelled" and parcel["cancel_calls"] == 2 and not parcel["live"]


def test_once_the_parcel_is_picked_up_a_cancel_is_an_answer_not_an_error():
    carrier = ContractCarrier(stage_seconds=60)
    with make_client(carrier) as client:
        waybill = create(client)
        carrier.advance(61)
        result = client.cancel_shipment(waybill.shipment_id, idempotency_key="cancel-1")
    assert result.outcome is CancelOutcome.ALREADY_PICKED_UP and not result.cancelled
    assert result.shipment_id == waybill.shipment_id and "picked up" in result.detail
    assert carrier.statuses[-1] == 409 and carrier.books.shipments()[0]["status"] == "in_transit"


def test_a_cancel_of_a_shipment_the_carrier_does_not_know_is_final():
    carrier = ContractCarrier()
    clock = FakeClock()
    with make_client(carrier, clock=clock) as client, pytest.raises(UnknownShipment) as raised:
        client.cancel_shipment("sbx-nobody", idempotency_key="cancel-1")
    refusal = raised.value
    assert refusal.final and isinstance(refusal, CarrierRefusal) and refusal.exit_code == 1
    assert (refusal.code, refusal.http_status, refusal.error_code) == ("unknown_shipment", 404, "not_found")
    assert "sbx-nobody" in refusal.message and len(carrier.requests) == 1 and clock.sleeps == []


def test_a_cancel_is_retried_like_every_call_with_the_same_key():
    cancelled = ok({**SHIPMENT, "status": "cancelled", "cancelled_at": "2026-11-24T10:05:00Z"})
    carrier = Carrier(error(503), lambda r: httpx.ReadTimeout("timed out", request=r), cancelled)
    clock = FakeClock()
    with make_client(carrier, clock=clock) as client:
        result = client.cancel_shipment("shp-9", idempotency_key="cancel-1")
    assert result.cancelled and result.cancelled_at == datetime(2026, 11, 24, 10, 5, tzinfo=UTC)
    assert len(carrier.requests) == 3 and len(clock.sleeps) == 2
    assert {request.headers["Idempotency-Key"] for request in carrier.requests} == {"cancel-1"}


def test_a_cancel_the_carrier_cannot_be_asked_within_the_bound_is_try_again_later():
    with (
        make_client(Carrier(error(503)), total_timeout=3) as client,
        pytest.raises(CarrierUnreachable) as raised,
    ):
        client.cancel_shipment("shp-9", idempotency_key="cancel-1")
    assert not raised.value.final and "the cancel of shipment shp-9" in raised.value.message


@pytest.mark.parametrize(
    ("answer", "kind", "reason"),
    [
        (error(409, "conflict", "key reused"), CarrierRefusal, "HTTP 409 conflict"),
        (error(409, "already_delivered"), CarrierRefusal, "HTTP 409 already_delivered"),
        (error(422, "invalid", "no"), CarrierRefusal, "HTTP 422 invalid"),
        (
            ok({**SHIPMENT, "status": "in_transit"}),
            InvalidCarrierAnswer,
            "HTTP 200 invalid_answer: status is",
        ),
        (ok({**SHIPMENT, "status": "cancelled", "shipment_id": "shp-1"}), InvalidCarrierAnswer, "HTTP 200"),
        (
            ok({**SHIPMENT, "status": "cancelled", "tracking_number": "x" * 65}),
            InvalidCarrierAnswer,
            "HTTP 200",
        ),
    ],
    ids=["409-other-code", "409-not-picked-up", "422", "not-cancelled", "another-shipment", "bad-number"],
)
def test_other_cancel_answers_are_final_refusals_with_a_reason(answer, kind, reason):
    carrier = Carrier(answer)
    with make_client(carrier) as client, pytest.raises(kind) as raised:
        client.cancel_shipment("shp-9", idempotency_key="cancel-1")
    assert raised.value.final and raised.value.reason.startswith(reason) and len(carrier.requests) == 1


@pytest.mark.parametrize(
    ("shipment_id", "key", "words"),
    [
        ("", "k", "the shipment id"),
        ("shp 9", "k", "the shipment id"),
        ("shp-9", "", "the idempotency key"),
        ("shp-9", "key\r\nX-Injected: 1", "the idempotency key"),
        ("shp-9", "k" * 129, "the idempotency key"),
    ],
)
def test_a_cancel_with_an_unusable_id_or_key_sends_nothing(shipment_id, key, words):
    carrier = Carrier(ok(SHIPMENT))
    with make_client(carrier) as client, pytest.raises(InvalidInput) as raised:
        client.cancel_shipment(shipment_id, idempotency_key=key)
    assert words in raised.value.message and carrier.requests == []


def test_a_shipment_id_is_quoted_into_the_path_and_a_number_is_accepted():
    carrier = Carrier(ok({"status": "cancelled"}))
    with make_client(carrier) as client:
        assert client.cancel_shipment("a/b?c", idempotency_key="k").shipment_id == "a/b?c"
        assert client.cancel_shipment(7, idempotency_key="k").shipment_id == "7"
    assert [request.url.raw_path for request in carrier.requests] == [
        b"/v1/shipments/a%2Fb%3Fc/cancel",
        b"/v1/shipments/7/cancel",
    ]


# --- configuration -----------------------------------------------------------------------------


def test_without_a_carrier_url_the_error_says_how_to_start_the_sandbox():
    from credex.config import Settings
    from credex.logistics import carrier_client

    with pytest.raises(CarrierNotConfigured) as raised:
        carrier_client(Settings())
    assert raised.value.exit_code == 2 and isinstance(raised.value, CredexError)
    assert "credex logistics sandbox" in raised.value.message
    assert "CREDEX_LOGISTICS_URL=http://127.0.0.1:8700" in raised.value.message


@pytest.mark.parametrize(
    "settings",
    [
        {"logistics_provider": "fedex", "logistics_url": "http://carrier.test"},
        {"logistics_url": "127.0.0.1:8700"},
        {"logistics_url": "ftp://carrier.test"},
        {"logistics_provider": "kuaidi100", "kuaidi100_customer": "C1"},
        {"logistics_url": "http://127.0.0.1:99999"},  # was retried for 30 s as "connection refused"
        {"logistics_url": "http://127.0.0.1:0"},
    ],
    ids=["unknown-provider", "no-scheme", "not-http", "kuaidi100-without-key", "port-too-high", "port-0"],
)
def test_unusable_carrier_settings_are_a_configuration_error(settings):
    from credex.config import Settings
    from credex.logistics import carrier_client

    with pytest.raises(CarrierNotConfigured) as raised:
        carrier_client(Settings(**settings))
    assert raised.value.exit_code == 2 and raised.value.code == "not_configured"


# --- secrets ------------------------------------------------------------------------------------


def _every_failure() -> list[tuple[str, object]]:
    refused = lambda r: httpx.ConnectError("[Errno 111] Connection refused", request=r)  # noqa: E731
    return [
        ("track", error(401)),
        ("track", error(404)),
        ("create", error(409)),
        ("create", error(422, "invalid", f"bad Authorization: Bearer {API_KEY}")),
        ("cancel", error(409, "already_delivered", f"Bearer {API_KEY}")),
        ("cancel", error(404)),
        ("create", ok({**SHIPMENT, "tracking_number": f"Bearer {API_KEY}"}, 201)),
        ("track", error(503)),
        ("track", error(501)),
        ("track", refused),
        ("track", httpx.Response(200, text="garbage")),
    ]


@pytest.mark.parametrize(("call", "answer"), _every_failure())
def test_the_api_key_never_appears_in_errors_tracebacks_reprs_or_logs(call, answer, caplog):
    caplog.set_level(logging.DEBUG)
    client = make_client(Carrier(answer), total_timeout=3)
    with client, pytest.raises(CredexError) as raised:
        call_carrier(client, call)
    seen = [
        raised.value.message,
        str(raised.value),
        repr(raised.value),
        json.dumps(raised.value.to_json()),
        "".join(traceback.format_exception(raised.value)),
        repr(client),
        repr(client._http),
        caplog.text,
    ]
    assert not [text for text in seen if API_KEY in text]


ECHOED_KEY = "GENERICSECRET77"  # a key a carrier quotes back in its own words, where no pattern finds it


@pytest.mark.parametrize(
    ("call", "answer"),
    [
        ("track", error(400, "invalid_request", f"the api_key {ECHOED_KEY} may not track this")),
        ("track", error(400, "invalid_request", f"api_key {ECHOED_KEY.lower()} (as we store it)")),
        ("track", error(400, "invalid_request", "x" * 190 + ECHOED_KEY)),  # across the cut at 200
        ("track", error(422, f"key_{ECHOED_KEY}_refused", "")),  # in the error code
        ("track", ok({**tracking(), "tracking_number": ECHOED_KEY})),  # an answer credex cannot read
        ("create", error(409, f"conflict_{ECHOED_KEY}", "")),
        ("create", error(422, "invalid", f"account of {ECHOED_KEY}")),
        ("cancel", error(404, f"{ECHOED_KEY}_not_found", "")),
        ("cancel", error(400, "bad_request", f"no shipment for {ECHOED_KEY}")),
        ("track", error(501, "down", f"{ECHOED_KEY} is not served here")),
    ],
)
def test_a_key_the_carrier_quotes_back_is_hidden_wherever_its_words_go(call, answer, caplog):
    """Only patterns (``key=…``, ``Bearer …``) were hidden: "api_key GENERICSECRET77" was printed
    whole in the exit-1 message, and kept in the warehouse's reason for `shipment.failed`."""
    from credex.warehouse.answers import reason_of

    caplog.set_level(logging.DEBUG)
    with (
        make_client(Carrier(answer), logistics_api_key=ECHOED_KEY) as client,
        pytest.raises(CarrierError) as raised,
    ):
        call_carrier(client, call)
    seen = [
        raised.value.message,
        raised.value.reason,
        str(raised.value.error_code),
        json.dumps(raised.value.to_json()),
        reason_of(raised.value),
        caplog.text,
    ]
    assert not [text for text in seen if ECHOED_KEY.lower() in text.lower()]
    assert "***" in raised.value.message or "***" in raised.value.reason
    assert "GENERICSE" not in raised.value.message  # not the beginning of it either, where the words were cut


def test_a_key_the_carrier_quotes_in_a_cancel_refusal_or_a_checkpoint_is_hidden_from_what_is_kept():
    picked_up = error(409, "already_picked_up", f"too late for {ECHOED_KEY}")
    point = {"time": "2026-11-24T12:00:00Z", "status": "in_transit", "message": f"for {ECHOED_KEY}"}
    point["location"] = f"Hub {ECHOED_KEY}"
    carrier = Carrier(picked_up, ok(tracking(checkpoints=[point])))
    with make_client(carrier, logistics_api_key=ECHOED_KEY) as client:
        refused = client.cancel_shipment("shp-9", idempotency_key="cancel-1")
        result = client.track("SIM0000000042")
    assert refused.detail == "too late for ***"
    assert (result.checkpoints[0].message, result.checkpoints[0].location) == ("for ***", "Hub ***")


def test_a_key_too_short_to_hide_without_mangling_the_carriers_words_leaves_them_as_they_are():
    words = "label printed 2026-11-24, parcel 1234567 at the depot"
    client = make_client(Carrier(error(400, "bad", words)), logistics_api_key="1234567")
    with client, pytest.raises(CarrierRefusal) as raised:
        client.track("SIM0000000042")
    assert raised.value.message.endswith(words)
