"""The kuaidi100 provider over httpx.MockTransport: the form and its signature, states onto the
normalised statuses, what a success must say, failures that arrive as HTTP 200, retries, and the
key and customer kept out of messages.

(Over 400 lines on purpose: like tests/test_logistics_generic.py, they follow one provider's
answers in order and share one fake answer; split, each half would repeat it.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import traceback
from urllib.parse import parse_qs

import httpx
import pytest

from credex.errors import CarrierNotConfigured, CarrierRejected, CredexError, Unavailable, UnknownParcel
from credex.logistics import (
    CarrierKeyRefused,
    CarrierRefusal,
    CarrierUnreachable,
    InvalidCarrierAnswer,
    ParcelNotFound,
    is_final,
)
from credex.logistics.kuaidi100 import STATES, kuaidi100_status, query_param, sign
from tests.logistics_fakes import KUAIDI100_CUSTOMER, KUAIDI100_KEY, Carrier, FakeClock, kuaidi100_client


def answer(state: str = "0", data: list[dict] | None = None) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "message": "ok",
            "status": "200",
            "com": "yuantong",
            "nu": "YT9693083639795",
            "ischeck": "1" if state == "3" else "0",
            "state": state,
            "condition": "F00",
            "data": data
            if data is not None
            else [
                {
                    "time": "2026-11-24 18:30:00",
                    "ftime": "2026-11-24 18:30:00",
                    "context": "快件已到达【杭州转运中心】",
                    "location": "杭州市",
                    "status": "在途",
                    "statusCode": state,
                }
            ],
        },
    )


def failure(code: str, message: str = "失败") -> httpx.Response:
    return httpx.Response(200, json={"result": False, "returnCode": code, "message": message})


def form(request: httpx.Request) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(request.content.decode()).items()}


def test_the_query_is_a_signed_form_over_exactly_the_param_sent():
    carrier = Carrier(answer())
    with kuaidi100_client(carrier) as client:
        client.track("YT9693083639795", carrier="yuantong", phone="13800001234")
    [request] = carrier.requests
    assert request.method == "POST" and str(request.url) == "https://poll.kuaidi100.com/poll/query.do"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    fields = form(request)
    assert set(fields) == {"customer", "param", "sign"}
    assert fields["customer"] == KUAIDI100_CUSTOMER
    assert json.loads(fields["param"]) == {
        "com": "yuantong",
        "num": "YT9693083639795",
        "phone": "13800001234",
        "resultv2": "1",
        "order": "desc",
    }
    expected = (
        hashlib.md5((fields["param"] + KUAIDI100_KEY + KUAIDI100_CUSTOMER).encode()).hexdigest().upper()
    )
    assert fields["sign"] == expected
    assert "Authorization" not in request.headers


def test_the_signature_is_upper_case_md5_of_param_key_customer():
    param = '{"com":"yuantong","num":"YT9693083639795","resultv2":"1","order":"desc"}'
    assert query_param("yuantong", "YT9693083639795") == param
    # md5 of param + "SECRETKEY123" + "CUST42", worked out outside Python.
    assert sign(param, "SECRETKEY123", "CUST42") == "356A60D20FDAA5221F286CB0A0FF832C"


def test_the_base_url_can_point_at_a_local_stand_in():
    carrier = Carrier(answer())
    with kuaidi100_client(carrier, logistics_url="http://127.0.0.1:9100") as client:
        client.track("YT9693083639795", carrier="yuantong")
    assert str(carrier.requests[0].url) == "http://127.0.0.1:9100/poll/query.do"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        *STATES.items(),
        ("1001", "in_transit"),  # a sub-state of 0 that is not listed
        ("304", "delivered"),  # 3xx: signed for, one way or another
        ("205", "exception"),
        ("1401", "exception"),  # a sub-state of 14, refused
        ("402", "exception"),  # a sub-state of 4 that is not listed: not known to be a return
        ("999", "in_transit"),  # unknown: kuaidi100 has the parcel, the words say the rest
        (4, "returned"),  # a number rather than text
    ],
)
def test_every_state_maps_onto_a_normalised_status(state, expected):
    with kuaidi100_client(Carrier(answer(state))) as client:
        tracking = client.track("YT9693083639795", carrier="yuantong")
    assert tracking.status == expected == kuaidi100_status(state)
    assert tracking.checkpoints[0].status == expected


def test_the_documented_states_map_as_a_shopper_would_read_them():
    documented = ("0", "1", "2", "3", "4", "5", "6", "7", "10", "11", "12", "13", "14", "401")
    assert {code: kuaidi100_status(code) for code in documented} == {
        "0": "in_transit",
        "1": "in_transit",
        "2": "exception",
        "3": "delivered",
        "4": "returned",  # back with the sender and signed for: final, the redemption is refunded
        "5": "out_for_delivery",
        "6": "exception",  # on its way back: not final until it is signed for (4)
        "7": "in_transit",
        "10": "in_transit",  # customs: waiting, in progress, cleared
        "11": "in_transit",
        "12": "in_transit",
        "13": "exception",  # a customs problem
        "14": "exception",  # refused by the recipient: it comes back (6, then 4)
        "401": "exception",  # the waybill was cancelled: nothing went out, so not a return
    }
    assert [code for code in STATES if is_final(STATES[code])] == ["3", "4"]


@pytest.mark.parametrize("state", ["402", "403", "405", "499", 499])
def test_an_unknown_sub_state_of_a_return_is_not_taken_for_one_and_refunds_nothing(state):
    """Only state 4 says back with the sender and signed for (final, refunded); a sub-state
    kuaidi100 does not list took 4's `returned` and refunded a parcel that may still be on its way."""
    with kuaidi100_client(Carrier(answer(str(state)))) as client:
        tracking = client.track("YT9693083639795", carrier="yuantong")
    assert tracking.status == "exception" and not is_final(tracking.status)
    assert kuaidi100_status(state) == "exception"
    assert kuaidi100_status("4") == kuaidi100_status(4) == "returned"


def test_a_parcel_back_with_the_sender_is_returned_and_final_in_state_and_checkpoints():
    data = [
        {"time": "2026-11-28 09:00:00", "context": "已退回寄件人并签收", "status": "退签"},
        {"time": "2026-11-26 09:00:00", "context": "收件人拒收", "statusCode": "14"},
    ]
    with kuaidi100_client(Carrier(answer("4", data))) as client:
        tracking = client.track("YT9693083639795", carrier="yuantong")
    assert tracking.status == "returned" and is_final(tracking.status)
    assert [point.status for point in tracking.checkpoints] == ["returned", "exception"]


@pytest.mark.parametrize("state", [["4"], {"code": 4}, True, None, 4.5])
def test_a_state_that_is_not_text_or_a_whole_number_is_a_clear_final_error(state):
    reply = answer("0")
    document = reply.json()
    document["state"] = state
    carrier = Carrier(httpx.Response(200, json=document))
    with kuaidi100_client(carrier) as client, pytest.raises(InvalidCarrierAnswer) as raised:
        client.track("YT9693083639795", carrier="yuantong")
    assert raised.value.final and "cannot read" in raised.value.message and len(carrier.requests) == 1


@pytest.mark.parametrize("time", ["0001-01-01 00:00:00", "0001-01-01 07:59:59"])
def test_a_checkpoint_time_before_year_1_in_utc_is_a_clear_final_error(time):
    """China time is 8 hours ahead: this was an uncaught OverflowError, exit 70 from `track`."""
    carrier = Carrier(answer("0", [{"time": time, "context": "到达"}]))
    with kuaidi100_client(carrier) as client, pytest.raises(InvalidCarrierAnswer) as raised:
        client.track("YT9693083639795", carrier="yuantong")
    assert raised.value.final and "out of range" in raised.value.message and len(carrier.requests) == 1


def test_an_answer_that_is_not_json_is_asked_again():
    carrier = Carrier(httpx.Response(200, text="<html>502 Bad Gateway</html>"), answer("5"))
    clock = FakeClock()
    with kuaidi100_client(carrier, clock=clock) as client:
        assert client.track("YT9693083639795", carrier="yuantong").status == "out_for_delivery"
    assert len(carrier.requests) == 2 and len(clock.sleeps) == 1


def test_kuaidi100s_words_are_made_safe_to_print():
    data = [{"time": "2026-11-24 18:30:00", "context": "到达\nerror: forged\u202e", "location": "杭州\x00"}]
    reply = answer("0", data).json()
    with kuaidi100_client(Carrier(httpx.Response(200, json=reply))) as client:
        tracking = client.track("YT9693083639795", carrier="yuantong")
    assert tracking.express_no == "YT9693083639795"
    assert (
        tracking.checkpoints[0].message == "到达 error: forged" and tracking.checkpoints[0].location == "杭州"
    )


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"nu": "YT9693083639796"}, "nu is 'YT9693083639796', not 'YT9693083639795'"),
        ({"nu": "yt9693083639795"}, "another parcel"),
        ({"nu": "YT\nforged"}, "another parcel"),
        ({"nu": None}, "nu is missing"),
        ({"com": "zhongtong"}, "com is 'zhongtong', not 'yuantong'"),
        ({"com": None}, "com is missing"),
        ({"status": "201", "message": "单号不存在或者已经过期"}, "not a success: status '201'"),
        ({"status": None}, "not a success"),
        ({"status": "200", "message": "failed"}, "not a success"),
        ({"message": None}, "not a success"),
        ({"status": True}, "not a success"),
    ],
    ids=[
        "other-number",
        "other-case",
        "forged",
        "no-number",
        "other-carrier",
        "no-carrier",
        "status-201",
        "no-status",
        "message-not-ok",
        "no-message",
        "status-true",
    ],
)
def test_an_answer_that_is_no_success_or_about_another_parcel_is_refused_and_never_returned(change, words):
    """A return (state 4) about another parcel, or in an answer that does not say it succeeded, was
    taken for the parcel asked: `track sync` refunded a gift still on its way."""
    document = {**answer("4").json(), **change}
    carrier = Carrier(httpx.Response(200, json={k: v for k, v in document.items() if v is not None}))
    with kuaidi100_client(carrier) as client, pytest.raises(InvalidCarrierAnswer) as raised:
        client.track("YT9693083639795", carrier="yuantong")
    refusal = raised.value
    assert words in refusal.message and refusal.final and len(carrier.requests) == 1
    assert refusal.to_json()["error"]["code"] == "invalid_carrier_answer" and refusal.exit_code == 1


@pytest.mark.parametrize("change", [{"status": 200}, {"message": " OK "}, {"nu": " YT9693083639795 "}])
def test_a_success_is_read_whatever_the_type_of_its_status_or_the_case_of_its_ok(change):
    document = {**answer("4").json(), **change}
    with kuaidi100_client(Carrier(httpx.Response(200, json=document))) as client:
        tracking = client.track("YT9693083639795", carrier="yuantong")
    assert (tracking.status, tracking.express_no, tracking.carrier) == (
        "returned",
        "YT9693083639795",
        "yuantong",
    )


def test_checkpoints_keep_their_words_place_and_china_time_as_utc_newest_first():
    data = [
        {"time": "2026-11-24 09:00:00", "context": "已揽收", "status": "揽收", "areaName": "浙江,杭州市"},
        {
            "time": "2026-11-25 10:15:00",
            "ftime": "2026-11-25 10:15:00",
            "context": "已签收",
            "status": "签收",
        },
        {"time": "2026-11-25 08:00:00", "context": "派件中", "status": "派件", "location": "杭州市西湖区"},
    ]
    with kuaidi100_client(Carrier(answer("3", data))) as client:
        result = client.track("YT9693083639795", carrier="yuantong").to_json()
    assert result["status"] == "delivered" and result["carrier"] == "yuantong"
    assert result["checkpoints"] == [
        {"time": "2026-11-25T02:15:00+00:00", "status": "delivered", "message": "已签收", "location": None},
        {
            "time": "2026-11-25T00:00:00+00:00",
            "status": "out_for_delivery",
            "message": "派件中",
            "location": "杭州市西湖区",
        },
        {
            "time": "2026-11-24T01:00:00+00:00",
            "status": "in_transit",
            "message": "已揽收",
            "location": "浙江,杭州市",
        },
    ]


def test_no_result_yet_is_an_unknown_parcel():
    carrier = Carrier(failure("500", "查询无结果，请隔段时间再查"))
    with kuaidi100_client(carrier) as client, pytest.raises(UnknownParcel) as raised:
        client.track("YT0", carrier="yuantong")
    assert raised.value.exit_code == 1 and "no result" in raised.value.message
    assert isinstance(raised.value, ParcelNotFound) and raised.value.error_code == "500"


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        ("400", "bad data"),
        ("408", "--phone"),
        ("503", "CREDEX_KUAIDI100_KEY"),
        ("601", "expired"),
        ("777", "returnCode 777"),
    ],
)
def test_final_failures_are_carrier_rejected_without_a_retry(code, hint):
    carrier = Carrier(failure(code))
    clock = FakeClock()
    with kuaidi100_client(carrier, clock=clock) as client, pytest.raises(CarrierRejected) as raised:
        client.track("YT9693083639795", carrier="yuantong")
    assert hint in raised.value.message and raised.value.exit_code == 1
    assert len(carrier.requests) == 1 and clock.sleeps == []
    refusal = raised.value
    assert isinstance(refusal, CarrierRefusal) and refusal.final
    assert (refusal.http_status, refusal.error_code, refusal.reason) == (
        200,
        code,
        f"kuaidi100 returnCode {code}",
    )
    assert isinstance(refusal, CarrierKeyRefused) == (code in ("503", "601"))


@pytest.mark.parametrize("code", ["501", "502"])
def test_kuaidi100_server_errors_are_retried_though_they_come_as_http_200(code):
    carrier = Carrier(failure(code), answer("5"))
    clock = FakeClock()
    with kuaidi100_client(carrier, clock=clock) as client:
        assert client.track("YT9693083639795", carrier="yuantong").status == "out_for_delivery"
    assert len(carrier.requests) == 2 and len(clock.sleeps) == 1


def test_kuaidi100_failing_until_the_bound_is_unavailable():
    clock = FakeClock()
    carrier = Carrier(failure("502"))
    with (
        kuaidi100_client(carrier, clock=clock, logistics_total_timeout=6) as client,
        pytest.raises(Unavailable) as raised,
    ):
        client.track("YT9693083639795", carrier="yuantong")
    assert raised.value.exit_code == 69 and "returnCode 502" in raised.value.message and clock.elapsed <= 6
    assert isinstance(raised.value, CarrierUnreachable) and not raised.value.final


@pytest.mark.parametrize("status", [429, 503])
def test_http_level_failures_follow_the_same_retry_rules(status):
    carrier = Carrier(httpx.Response(status, headers={"Retry-After": "1"}), answer("0"))
    with kuaidi100_client(carrier) as client:
        client.track("YT9693083639795", carrier="yuantong")
    assert len(carrier.requests) == 2


def test_kuaidi100_creates_no_shipments_and_says_so():
    with kuaidi100_client(Carrier(answer())) as client, pytest.raises(CredexError) as raised:
        client.create_shipment(
            idempotency_key="redemption-1", order_ref="redemption-1", recipient={"address": "x"}, items=[]
        )
    assert (
        "only tracks" in raised.value.message and "CREDEX_LOGISTICS_PROVIDER=generic" in raised.value.message
    )


def test_kuaidi100_cancels_nothing_and_says_so_without_a_request():
    carrier = Carrier(answer())
    with kuaidi100_client(carrier) as client, pytest.raises(CarrierNotConfigured) as raised:
        client.cancel_shipment("sbx-1", idempotency_key="cancel-1")
    assert "cannot cancel" in raised.value.message and raised.value.exit_code == 2
    assert carrier.requests == [] and client.issues_waybills is False


def test_kuaidi100_needs_a_carrier_code():
    carrier = Carrier(answer())
    with kuaidi100_client(carrier) as client, pytest.raises(CarrierNotConfigured) as raised:
        client.track("YT9693083639795")
    assert "--carrier" in raised.value.message and carrier.requests == []
    with kuaidi100_client(carrier, logistics_carrier="yuantong") as client:
        client.track("YT9693083639795")
    assert json.loads(form(carrier.requests[0])["param"])["com"] == "yuantong"


@pytest.mark.parametrize(
    "reply",
    [
        failure("503"),
        failure("601"),
        failure("400"),
        failure("500"),
        failure("502"),
        httpx.Response(200, text="?"),
        httpx.Response(200, text='{"a":' * 50_000 + "1" + "}" * 50_000),
    ],
    ids=["bad-sign", "expired", "bad-data", "no-result", "busy", "garbage", "nested-deep"],
)
def test_neither_the_key_nor_the_signature_appears_in_errors_reprs_or_logs(reply, caplog):
    caplog.set_level(logging.DEBUG)
    carrier = Carrier(reply)
    client = kuaidi100_client(carrier, logistics_total_timeout=3)
    with client, pytest.raises(CredexError) as raised:
        client.track("YT9693083639795", carrier="yuantong")
    signature = form(carrier.requests[0])["sign"]
    seen = "\n".join(
        [
            raised.value.message,
            repr(raised.value),
            json.dumps(raised.value.to_json()),
            "".join(traceback.format_exception(raised.value)),
            repr(client),
            caplog.text,
        ]
    )
    assert KUAIDI100_KEY not in seen and signature not in seen


@pytest.mark.parametrize(
    ("reply", "secret"),
    [
        (failure("601", "key SUPERSECRETKEY99 expired"), "SUPERSECRETKEY99"),
        (failure("601", "key supersecretkey99 expired"), "SUPERSECRETKEY99"),
        (failure("400", f"customer {KUAIDI100_CUSTOMER} may not query yuantong"), KUAIDI100_CUSTOMER),
        (failure("777", "x" * 150 + "SUPERSECRETKEY99"), "SUPERSECRETKEY99"),  # across the cut at 160
        (failure("SUPERSECRETKEY99"), "SUPERSECRETKEY99"),  # in the returnCode
        (httpx.Response(200, json={**answer().json(), "nu": "SUPERSECRETKEY99"}), "SUPERSECRETKEY99"),
    ],
    ids=["expired", "lower-case", "customer", "cut", "return-code", "unreadable"],
)
def test_the_key_or_customer_kuaidi100_quotes_back_is_hidden_wherever_its_words_go(reply, secret, caplog):
    """Only ``key=…`` was hidden: "key SUPERSECRETKEY99 expired" was printed whole."""
    from credex.warehouse.answers import reason_of

    caplog.set_level(logging.DEBUG)
    client = kuaidi100_client(Carrier(reply), kuaidi100_key="SUPERSECRETKEY99")
    with client, pytest.raises(CarrierRejected) as raised:
        client.track("YT9693083639795", carrier="yuantong")
    error = raised.value
    seen = [error.message, error.reason, str(error.error_code), json.dumps(error.to_json())]
    seen += [reason_of(error), caplog.text]
    assert not [text for text in seen if secret.lower() in text.lower()]
    assert "***" in error.message and secret[:8] not in error.message


def test_the_key_kuaidi100_quotes_in_a_checkpoint_is_hidden_from_what_is_kept():
    data = [{"time": "2026-11-24 18:30:00", "context": "签收 SUPERSECRETKEY99", "location": "CUST4242 杭州"}]
    with kuaidi100_client(Carrier(answer("3", data)), kuaidi100_key="SUPERSECRETKEY99") as client:
        point = client.track("YT9693083639795", carrier="yuantong").checkpoints[0]
    assert (point.message, point.location) == ("签收 ***", "*** 杭州")
