"""The generic carrier client over httpx.MockTransport: the contract, status mapping, retry rules,
the bound on total time, error mapping, and the API key kept out of every message."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import traceback
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from credex.errors import (
    CarrierNotConfigured,
    CarrierRejected,
    CredexError,
    Unavailable,
    UnknownParcel,
)
from credex.logistics import STATUSES
from credex.logistics.retrying import RetryPolicy, retry_after_seconds
from tests.logistics_fakes import API_KEY, Carrier, FakeClock, make_client, timeout_after_read

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


def test_a_repeated_create_answered_200_gives_the_same_waybill():
    with make_client(Carrier(ok(SHIPMENT, 201), ok(SHIPMENT, 200))) as client:
        assert create(client) == create(client)


def test_no_authorization_header_is_sent_without_an_api_key():
    carrier = Carrier(ok(tracking()))
    with make_client(carrier, logistics_api_key=None) as client:
        client.track("SIM0000000042")
    assert "Authorization" not in carrier.requests[0].headers


def test_tracking_asks_for_the_carrier_and_number_in_the_path_and_defaults_to_the_sandbox():
    carrier = Carrier(ok(tracking()))
    with make_client(carrier) as client:
        client.track("SIM0000000042")
        client.track("SF/1 2", carrier="shunfeng")
    assert [r.url.raw_path for r in carrier.requests] == [
        b"/v1/trackings/sandbox/SIM0000000042",
        b"/v1/trackings/shunfeng/SF%2F1%202",
    ]


def test_the_configured_default_carrier_is_used_when_none_is_given():
    carrier = Carrier(ok(tracking()))
    with make_client(carrier, logistics_carrier="zto") as client:
        client.track("7700")
    assert carrier.requests[0].url.path == "/v1/trackings/zto/7700"


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
    assert "SIM0000000099" in raised.value.message
    assert len(carrier.requests) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 409, 422])
def test_a_final_refusal_is_not_retried_and_is_carrier_rejected(status):
    carrier = Carrier(error(status, "bad", "the carrier says no"))
    clock = FakeClock()
    with make_client(carrier, clock=clock) as client, pytest.raises(CarrierRejected) as raised:
        create(client)
    assert len(carrier.requests) == 1 and clock.sleeps == []
    assert raised.value.exit_code == 1 and raised.value.code == "carrier_rejected"
    assert f"HTTP {status}" in raised.value.message


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


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>maintenance</html>"),
        ok([1, 2]),
        ok({"checkpoints": [{"time": "soon"}]}),
    ],
)
def test_an_answer_that_cannot_be_read_is_unavailable(answer):
    with make_client(Carrier(answer)) as client, pytest.raises(Unavailable) as raised:
        client.track("SIM0000000042")
    assert "cannot read" in raised.value.message


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
    ],
    ids=["unknown-provider", "no-scheme", "not-http", "kuaidi100-without-key"],
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
        create(client) if call == "create" else client.track("SIM0000000042")
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
