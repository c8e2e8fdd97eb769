"""The sandbox carrier as a real process on a free port: the generic contract, idempotency,
time-based progression, cancels, refused parcels, numbers never handed out twice, injected faults
(retryable and final), and a clean stop.

(Over 400 lines on purpose: one real sandbox process per module serves every test here.)
"""

from __future__ import annotations

import re
import signal
import socket

import httpx
import pytest

from credex.logistics import CancelOutcome, CarrierRefusal, UnknownShipment, is_final
from tests.logistics_fakes import Wall
from tests.sandbox import running_sandbox, stop_and_wait
from tests.support import Outcome, credex_command, run_process, subprocess_env, wait_for

EXPRESS_NO = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")

BODY = {
    "order_ref": "redemption-42",
    "recipient": {"name": "u-1001", "phone": "", "address": "8 Long Road"},
    "items": [{"sku": "SHAMPOO-500", "quantity": 1}],
}


def post_shipment(url: str, key: str | None, body: object = BODY, **headers: str) -> httpx.Response:
    if key is not None:
        headers["Idempotency-Key"] = key
    return httpx.post(f"{url}/v1/shipments", json=body, headers=headers, timeout=10)


def get_tracking(
    url: str, number: str, carrier: str = "sandbox", timeout: float = 10, **headers: str
) -> httpx.Response:
    return httpx.get(f"{url}/v1/trackings/{carrier}/{number}", headers=headers, timeout=timeout)


def warehouse_client(url: str, **settings):
    from credex.config import Settings
    from credex.logistics import carrier_client

    return carrier_client(Settings(logistics_url=url, **settings))


def test_the_sandbox_announces_its_url_first_and_stops_cleanly_on_sigterm():
    with running_sandbox() as sandbox:
        host, port = sandbox.url.removeprefix("http://").split(":")
        assert host == "127.0.0.1" and int(port) > 0
        assert httpx.get(f"{sandbox.url}/_sandbox/shipments", timeout=10).json() == []
        assert stop_and_wait(sandbox) == 0


def test_the_sandbox_stops_cleanly_on_sigint():
    with running_sandbox() as sandbox:
        sandbox.process.send_signal(signal.SIGINT)
        assert sandbox.process.wait(10) == 0


def test_a_create_is_idempotent_on_its_key_and_a_changed_body_is_a_conflict(carrier_sandbox):
    first = post_shipment(carrier_sandbox.url, "redemption-42")
    assert first.status_code == 201
    waybill = first.json()
    assert waybill["carrier"] == "sandbox" and waybill["status"] == "info_received"
    assert waybill["tracking_number"].startswith("SIM") and EXPRESS_NO.fullmatch(waybill["tracking_number"])

    again = post_shipment(carrier_sandbox.url, "redemption-42")
    assert again.status_code == 200 and again.json() == waybill
    other = post_shipment(carrier_sandbox.url, "redemption-42", {**BODY, "order_ref": "redemption-43"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "conflict"

    [parcel] = carrier_sandbox.shipments()
    assert parcel["idempotency_key"] == "redemption-42" and parcel["create_calls"] == 3
    assert parcel["tracking_number"] == waybill["tracking_number"]
    second = carrier_sandbox.create_shipment("redemption-43")
    assert second["tracking_number"] != waybill["tracking_number"]
    assert len(carrier_sandbox.shipments()) == 2


@pytest.mark.parametrize(
    ("key", "body", "status", "code"),
    [
        (None, BODY, 400, "missing_idempotency_key"),
        ("k", {**BODY, "items": []}, 422, "invalid_shipment"),
        ("k", {**BODY, "recipient": {"name": "x", "phone": "", "address": " "}}, 422, "invalid_shipment"),
        ("k", {**BODY, "items": [{"sku": "A", "quantity": 0}]}, 422, "invalid_shipment"),
        ("k", ["not", "an", "object"], 422, "invalid_shipment"),
    ],
)
def test_bad_create_requests_are_refused_and_create_nothing(carrier_sandbox, key, body, status, code):
    response = post_shipment(carrier_sandbox.url, key, body)
    assert response.status_code == status and response.json()["error"]["code"] == code
    assert carrier_sandbox.shipments() == []


def raw_body(**texts: bytes) -> bytes:
    """A create body as bytes, each text a JSON string as given (escapes and all): an encoder
    would refuse a lone surrogate before it was sent."""
    given = {"order_ref": b'"r-42"', "name": b'"u-1001"', "phone": b'""', "address": b'"8 Long Road"'}
    given |= {"sku": b'"SHAMPOO-500"'} | texts
    return (
        b'{"order_ref": %(order_ref)s, "recipient": {"name": %(name)s, "phone": %(phone)s, '
        b'"address": %(address)s}, "items": [{"sku": %(sku)s, "quantity": 1}]}'
        % {name.encode(): text for name, text in given.items()}
    )


UNSENDABLE = {
    "surrogate-in-order-ref": ("order_ref", rb'"r-\ud800"', "order_ref"),
    "control-in-address": ("address", rb'"8 Long\u0001 Road"', "recipient.address"),
    "newline-in-name": ("name", rb'"u-1001\nerror: forged"', "recipient.name"),
    "del-in-phone": ("phone", rb'"138\u007f"', "recipient.phone"),
    "c1-in-sku": ("sku", rb'"SHAMPOO\u0085"', "a sku"),
    "surrogate-in-sku": ("sku", rb'"\udfff"', "a sku"),
}


@pytest.mark.parametrize(("name", "text", "field"), UNSENDABLE.values(), ids=UNSENDABLE.keys())
def test_a_create_whose_texts_hold_controls_or_lone_surrogates_is_422(carrier_sandbox, name, text, field):
    """Accepted once (201), such a parcel made every later listing and tracking drop the connection."""
    for path in ("/v1/shipments", "/_sandbox/shipments"):
        response = httpx.post(
            carrier_sandbox.url + path,
            content=raw_body(**{name: text}),
            headers={"Idempotency-Key": "k"},
            timeout=10,
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_shipment" and error["message"].startswith(f"{field} must not hold")
    assert carrier_sandbox.shipments() == []
    plain = httpx.post(
        f"{carrier_sandbox.url}/v1/shipments",
        content=raw_body(),
        headers={"Idempotency-Key": "k"},
        timeout=10,
    )
    assert plain.status_code == 201 and [r["order_ref"] for r in carrier_sandbox.shipments()] == ["r-42"]


def test_an_answer_holding_any_text_is_sent_whole():
    """The sandbox's answers are ASCII JSON: a lone surrogate in its books (here put there behind
    the create's checks) is sent as an escape, where encoding it as UTF-8 failed."""
    import threading

    from credex.logistics.sandbox import SandboxCarrier, SandboxOptions
    from credex.logistics.sandbox_http import SandboxServer

    server = SandboxServer(("127.0.0.1", 0), SandboxCarrier(SandboxOptions()))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        body = {**BODY, "order_ref": "r-\ud800", "recipient": {**BODY["recipient"], "address": "x\udfff"}}
        number = server.carrier.create("k", body)[1]["tracking_number"]
        server.carrier.advance(600)  # delivered: its last checkpoint is at the address
        listed = httpx.get(f"{server.url}/_sandbox/shipments", timeout=10)
        tracked = get_tracking(server.url, number)
    finally:
        server.stop()
        thread.join(5)
    assert listed.status_code == 200 and listed.content.isascii()
    # Compared as ascii(): a report holding a lone surrogate cannot reach pytest-xdist's controller.
    assert ascii(listed.json()[0]["order_ref"]) == ascii("r-\ud800")
    assert tracked.status_code == 200 and ascii(tracked.json()["checkpoints"][0]["location"]) == ascii(
        "x\udfff"
    )


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[" * 100_000 + b"]" * 100_000], ids=["not-json", "nested-too-deep"]
)
def test_a_create_body_that_is_not_json_is_400_and_the_sandbox_keeps_serving(carrier_sandbox, raw):
    response = httpx.post(
        f"{carrier_sandbox.url}/v1/shipments", content=raw, headers={"Idempotency-Key": "k"}, timeout=10
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_json"
    assert post_shipment(carrier_sandbox.url, "k2").status_code == 201
    assert len(carrier_sandbox.shipments()) == 1


def test_an_unknown_number_or_carrier_is_404(carrier_sandbox):
    number = carrier_sandbox.create_shipment("redemption-1")["tracking_number"]
    assert get_tracking(carrier_sandbox.url, "SIM9999999999").status_code == 404
    assert get_tracking(carrier_sandbox.url, number, carrier="shunfeng").status_code == 404
    assert get_tracking(carrier_sandbox.url, number).status_code == 200


@pytest.mark.parametrize("seconds", ["1e308", "1" + "0" * 400, "NaN", "Infinity", "3155760001"])
def test_the_clock_cannot_be_moved_out_of_the_calendar(carrier_sandbox, seconds):
    """1e308 seconds ahead made every later request a 500: the sandbox could only be restarted."""
    number = carrier_sandbox.create_shipment("redemption-1")["tracking_number"]
    moved = httpx.post(
        f"{carrier_sandbox.url}/_sandbox/clock",
        content=f'{{"advance_seconds": {seconds}}}',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert moved.status_code == 422 and moved.json()["error"]["code"] == "invalid_clock"
    assert get_tracking(carrier_sandbox.url, number).json()["status"] == "info_received"
    assert carrier_sandbox.advance(3600)["offset_seconds"] == 3600  # the clock still moves


def test_a_parcel_moves_one_stage_per_stage_duration_from_its_creation(carrier_sandbox):
    waybill = carrier_sandbox.create_shipment("redemption-1")
    number = waybill["tracking_number"]

    def seen() -> tuple[str, list[str]]:
        answer = get_tracking(carrier_sandbox.url, number).json()
        return answer["status"], [point["status"] for point in answer["checkpoints"]]

    assert seen() == ("info_received", ["info_received"])
    carrier_sandbox.advance(60)
    assert seen() == ("in_transit", ["in_transit", "info_received"])
    carrier_sandbox.advance(60)
    assert seen() == ("out_for_delivery", ["out_for_delivery", "in_transit", "info_received"])
    carrier_sandbox.advance(3600)
    answer = get_tracking(carrier_sandbox.url, number).json()
    assert answer["status"] == "delivered"
    assert [point["status"] for point in answer["checkpoints"]] == [
        "delivered",
        "out_for_delivery",
        "in_transit",
        "info_received",
    ]
    assert answer["checkpoints"][0]["location"] == "8 Long Road"
    assert answer["checkpoints"][-1]["time"] == waybill["created_at"]
    assert carrier_sandbox.shipments()[0]["status"] == "delivered"


def test_with_short_stages_a_parcel_is_delivered_in_real_time():
    with running_sandbox("--stage-seconds", "0.2") as sandbox:
        number = sandbox.create_shipment("redemption-9")["tracking_number"]
        with warehouse_client(sandbox.url) as client:
            delivered = lambda: client.track(number).status == "delivered"  # noqa: E731
            wait_for(delivered, timeout=20, what="the parcel to be delivered")
            assert len(client.track(number).checkpoints) == 4


def test_the_warehouse_client_gets_one_waybill_per_key_however_often_it_asks():
    with running_sandbox("--faults", "503,drop") as sandbox, warehouse_client(sandbox.url) as client:
        waybills = [
            client.create_shipment(
                idempotency_key="redemption-42",
                order_ref="redemption-42",
                recipient={"name": "u-1001", "phone": "", "address": "8 Long Road"},
                items=[{"sku": "SHAMPOO-500", "quantity": 1}],
            )
            for _ in range(3)
        ]
        assert len({waybill.express_no for waybill in waybills}) == 1
        [parcel] = sandbox.shipments()
        assert parcel["create_calls"] == 3 and parcel["tracking_number"] == waybills[0].express_no
        assert sandbox.requests()["faults"] == {"503": 1, "drop": 1}
        tracking = client.track(waybills[0].express_no, carrier=waybills[0].carrier)
        assert tracking.status == "info_received"


def test_a_fault_can_be_asked_for_on_one_request(carrier_sandbox):
    number = carrier_sandbox.create_shipment("redemption-1")["tracking_number"]
    assert get_tracking(carrier_sandbox.url, number, **{"X-Sandbox-Fault": "503"}).status_code == 503
    limited = get_tracking(carrier_sandbox.url, number, **{"X-Sandbox-Fault": "429"})
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    with pytest.raises(httpx.RemoteProtocolError):
        get_tracking(carrier_sandbox.url, number, **{"X-Sandbox-Fault": "drop"})
    assert get_tracking(carrier_sandbox.url, number, **{"X-Sandbox-Fault": "boom"}).status_code == 400
    assert get_tracking(carrier_sandbox.url, number).status_code == 200
    assert carrier_sandbox.requests()["faults"] == {"503": 1, "429": 1, "drop": 1}


def test_a_slow_answer_outlasts_a_short_read_timeout():
    with running_sandbox("--slow-seconds", "3") as sandbox:
        number = sandbox.create_shipment("redemption-1")["tracking_number"]
        with pytest.raises(httpx.ReadTimeout):
            get_tracking(sandbox.url, number, timeout=0.3, **{"X-Sandbox-Fault": "slow"})


def statuses(url: str, count: int) -> list[int]:
    with httpx.Client(timeout=10) as client:
        return [client.get(f"{url}/v1/trackings/sandbox/SIM0000000001").status_code for _ in range(count)]


def test_random_faults_come_in_the_share_asked_for_and_repeat_with_a_seed():
    args = ("--unavailable-share", "0.5", "--seed", "7")
    with running_sandbox(*args) as one, running_sandbox(*args) as two:
        first, second = statuses(one.url, 40), statuses(two.url, 40)
    assert first == second  # 404 (no such parcel) when no fault is drawn
    assert set(first) == {404, 503} and 8 <= first.count(503) <= 32
    with running_sandbox("--unavailable-share", "1") as always:
        assert set(statuses(always.url, 5)) == {503}


def test_with_an_api_key_set_requests_must_carry_it():
    with running_sandbox(env={"CREDEX_LOGISTICS_API_KEY": "sbx-key-1"}) as sandbox:
        assert post_shipment(sandbox.url, "k").status_code == 401
        assert post_shipment(sandbox.url, "k", Authorization="Bearer wrong").status_code == 401
        created = post_shipment(sandbox.url, "k", Authorization="Bearer sbx-key-1")
        assert created.status_code == 201
        with warehouse_client(sandbox.url, logistics_api_key="sbx-key-1") as client:
            assert client.track(created.json()["tracking_number"]).status == "info_received"


def test_with_an_api_key_set_the_admin_endpoints_need_it_too():
    """They make parcels, refuse them and move the clock: open, they let anyone who reaches the
    port fake a delivery or a return."""
    with running_sandbox(env={"CREDEX_LOGISTICS_API_KEY": "sbx-key-1"}) as sandbox:
        number = sandbox.create_shipment("k")["tracking_number"]  # with the key
        shipment_id = sandbox.shipments()[0]["shipment_id"]
        calls = [
            ("GET", "/_sandbox/shipments", None),
            ("POST", "/_sandbox/shipments", BODY),
            ("POST", f"/_sandbox/shipments/{shipment_id}/refuse", None),
            ("GET", "/_sandbox/requests", None),
            ("GET", "/_sandbox/clock", None),
            ("POST", "/_sandbox/clock", {"advance_seconds": 600}),
            ("GET", "/_sandbox/nowhere", None),
        ]
        for authorization in (None, "Bearer wrong", "Bearer sbx-key-1x"):
            headers = {"Idempotency-Key": "k2"} | (
                {} if authorization is None else {"Authorization": authorization}
            )
            for method, path, body in calls:
                response = httpx.request(method, sandbox.url + path, json=body, headers=headers, timeout=10)
                assert response.status_code == 401, (authorization, method, path)
                assert response.json()["error"]["code"] == "unauthorized"
        [row] = sandbox.shipments()  # nothing was made, refused or moved
        assert row["refused"] is False and row["status"] == "info_received"
        assert sandbox.refuse(shipment_id)["refused"] is True
        assert sandbox.advance(600)["offset_seconds"] == 600
        assert get_tracking(sandbox.url, number, Authorization="Bearer sbx-key-1").status_code == 200


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--faults", "503,boom"], "unknown fault 'boom'"),
        (["--unavailable-share", "0.6", "--drop-share", "0.6"], "more than 1"),
        (["--conflict-share", "0.6", "--invalid-share", "0.6"], "more than 1"),
        (["--numbering", "random"], "unknown --numbering 'random'"),
        # Beyond what the parcels' clock can count: every tracking then failed with a 500.
        (["--stage-seconds", "inf"], "--stage-seconds"),
        (["--slow-seconds", "1e308"], "--slow-seconds"),
    ],
)
def test_bad_sandbox_options_are_refused(args, words):
    refused = run_process("logistics", "sandbox", "--port", "0", *args, timeout=30)
    assert refused.exit_code == 2 and words in refused.stderr and refused.stdout == ""


def test_a_port_in_use_is_refused_with_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = run_process("logistics", "sandbox", "--port", port, timeout=30)
    assert refused.exit_code == 2
    assert refused.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_the_sandbox_is_a_credex_command():
    import subprocess

    done = subprocess.run(
        credex_command("logistics", "sandbox", "--help"), capture_output=True, text=True, env=subprocess_env()
    )
    outcome = Outcome(done.returncode, done.stdout, done.stderr)
    assert outcome.exit_code == 0 and "--stage-seconds" in outcome.stdout and "--faults" in outcome.stdout
    for option in ("--refuse-share", "--numbering", "--conflict-share", "--invalid-share"):
        assert option in outcome.stdout


# --- cancels, over the socket -------------------------------------------------------------------


def test_the_warehouse_client_cancels_before_pickup_and_is_told_too_late_after_it(carrier_sandbox):
    with warehouse_client(carrier_sandbox.url) as client:
        early = client.create_shipment(
            idempotency_key="msg-1", order_ref="redemption-1", recipient=RECIPIENT, items=ITEMS
        )
        late = client.create_shipment(
            idempotency_key="msg-2", order_ref="redemption-2", recipient=RECIPIENT, items=ITEMS
        )
        cancelled = client.cancel_shipment(early.shipment_id, idempotency_key="cancel-1")
        again = client.cancel_shipment(early.shipment_id, idempotency_key="cancel-1")
        carrier_sandbox.advance(60)  # both are picked up now, had they not been cancelled
        still = client.cancel_shipment(early.shipment_id, idempotency_key="cancel-1")
        too_late = client.cancel_shipment(late.shipment_id, idempotency_key="cancel-2")
        with pytest.raises(UnknownShipment) as unknown:
            client.cancel_shipment("sbx-nobody", idempotency_key="cancel-3")
        tracking = client.track(early.express_no)
    assert cancelled.outcome is CancelOutcome.CANCELLED and cancelled == again == still
    assert cancelled.express_no == early.express_no
    assert too_late.outcome is CancelOutcome.ALREADY_PICKED_UP and "in_transit" in too_late.detail
    assert unknown.value.http_status == 404 and unknown.value.final
    # A cancelled parcel stops where it was, its last checkpoint saying why.
    assert tracking.status == "exception" and not is_final(tracking.status)
    assert [point.status for point in tracking.checkpoints] == ["exception", "info_received"]
    assert "cancelled" in tracking.checkpoints[0].message
    rows = {row["idempotency_key"]: row for row in carrier_sandbox.shipments()}
    assert (rows["msg-1"]["status"], rows["msg-1"]["live"], rows["msg-1"]["cancel_calls"]) == (
        "cancelled",
        False,
        3,
    )
    assert (rows["msg-2"]["status"], rows["msg-2"]["live"], rows["msg-2"]["cancel_calls"]) == (
        "in_transit",
        True,
        1,
    )
    assert carrier_sandbox.live_waybills(order_ref="redemption-1") == []
    assert [row["tracking_number"] for row in carrier_sandbox.live_waybills(order_ref="redemption-2")] == [
        late.express_no
    ]
    assert carrier_sandbox.requests()["by_route"]["POST /v1/shipments/{shipment_id}/cancel"] == 5


def test_a_cancel_needs_its_idempotency_key_and_the_answer_is_the_shipment(carrier_sandbox):
    waybill = carrier_sandbox.create_shipment("msg-1")
    without = httpx.post(f"{carrier_sandbox.url}/v1/shipments/{waybill['shipment_id']}/cancel", timeout=10)
    assert without.status_code == 400 and without.json()["error"]["code"] == "missing_idempotency_key"
    assert carrier_sandbox.shipments()[0]["status"] == "info_received"
    answer = carrier_sandbox.cancel(waybill["shipment_id"])
    assert answer.status_code == 200
    assert answer.json() == {**waybill, "status": "cancelled", "cancelled_at": answer.json()["cancelled_at"]}
    gone = carrier_sandbox.cancel("sbx-0")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


# --- refused parcels ----------------------------------------------------------------------------


def test_a_parcel_marked_refused_goes_back_and_ends_returned(carrier_sandbox):
    refused = carrier_sandbox.create_shipment("msg-1", address="8 Long Road")
    kept = carrier_sandbox.create_shipment("msg-2")
    row = carrier_sandbox.refuse(refused["shipment_id"])
    assert row["refused"] is True and row["status"] == "info_received" and row["live"]
    with warehouse_client(carrier_sandbox.url) as client:
        seen = []
        for _ in range(5):
            seen.append(client.track(refused["tracking_number"]).status)
            carrier_sandbox.advance(60)
        last = client.track(refused["tracking_number"])
        assert client.track(kept["tracking_number"]).status == "delivered"
    assert seen == ["info_received", "in_transit", "out_for_delivery", "exception", "returned"]
    assert is_final(last.status) and [point.status for point in last.checkpoints] == [
        "returned",
        "exception",
        "out_for_delivery",
        "in_transit",
        "info_received",
    ]
    assert last.checkpoints[1].message == "Refused by the recipient"
    assert last.checkpoints[1].location == "8 Long Road"
    [row] = carrier_sandbox.shipments(idempotency_key="msg-1")
    assert (row["status"], row["live"]) == ("returned", False)
    assert carrier_sandbox.shipments(status="delivered")[0]["idempotency_key"] == "msg-2"


def test_a_delivered_or_cancelled_parcel_cannot_be_refused_and_an_unknown_one_is_404(carrier_sandbox):
    delivered = carrier_sandbox.create_shipment("msg-1")
    carrier_sandbox.advance(3 * 60)
    cancelled = carrier_sandbox.create_shipment("msg-2")
    assert carrier_sandbox.cancel(cancelled["shipment_id"]).status_code == 200

    def refuse(shipment_id: str) -> httpx.Response:
        return httpx.post(f"{carrier_sandbox.url}/_sandbox/shipments/{shipment_id}/refuse", timeout=10)

    assert refuse(delivered["shipment_id"]).json()["error"]["code"] == "already_delivered"
    assert refuse(cancelled["shipment_id"]).json()["error"]["code"] == "cancelled"
    assert refuse("sbx-0").status_code == 404
    assert [row["refused"] for row in carrier_sandbox.shipments()] == [False, False]


def test_a_seeded_share_of_parcels_is_refused_whatever_the_faults():
    from credex.logistics.sandbox import SandboxCarrier, SandboxOptions

    def refused(**options) -> list[bool]:
        carrier = SandboxCarrier(SandboxOptions(refuse_share=0.2, seed=7, **options), wall=Wall())
        for index in range(200):
            carrier.choose_fault("POST /v1/shipments")
            carrier.create(f"msg-{index}", BODY)
        return [row["refused"] for row in carrier.shipments()]

    first = refused()
    assert 20 <= sum(first) <= 60
    assert refused() == first == refused(unavailable_share=0.5)
    assert not any(row["refused"] for row in _books().shipments())  # none by default


# --- tracking numbers ---------------------------------------------------------------------------


def create_one(sandbox, key: str) -> dict:
    response = post_shipment(sandbox.url, key)
    assert response.status_code == 201
    return response.json()


def test_a_restarted_sandbox_never_hands_out_a_number_seen_before():
    seen: list[dict] = []
    for _ in range(2):
        with running_sandbox() as sandbox:
            seen += [create_one(sandbox, "msg-1"), create_one(sandbox, "msg-2")]
            assert stop_and_wait(sandbox) == 0
    numbers = [waybill["tracking_number"] for waybill in seen]
    assert len(set(numbers)) == 4 and all(EXPRESS_NO.fullmatch(number) for number in numbers)
    assert len({waybill["shipment_id"] for waybill in seen}) == 4


def test_sequential_numbering_starts_from_1_on_every_start():
    seen = []
    for _ in range(2):
        with running_sandbox("--numbering", "sequential") as sandbox:
            seen.append(create_one(sandbox, "msg-1"))
            seen.append(create_one(sandbox, "msg-2"))
    assert [waybill["tracking_number"] for waybill in seen] == [
        "SIM0000000001",
        "SIM0000000002",
        "SIM0000000001",
        "SIM0000000002",
    ]
    assert [waybill["shipment_id"] for waybill in seen] == ["sbx-1", "sbx-2", "sbx-1", "sbx-2"]


def test_unique_numbers_differ_between_two_starts_in_the_same_second_and_are_short_tokens():
    from credex.logistics.sandbox import Numbering

    wall = Wall()
    starts = [Numbering("unique", wall=wall) for _ in range(50)]
    numbers = {start.shipment(sequence) for start in starts for sequence in (1, 2, 1_000_000)}
    assert len(numbers) == 150
    assert all(EXPRESS_NO.fullmatch(number) and len(number) <= 64 for _, number in numbers)
    assert Numbering("sequential").shipment(42) == ("sbx-42", "SIM0000000042")
    with pytest.raises(ValueError):
        Numbering("random")


# --- final faults -------------------------------------------------------------------------------


RECIPIENT = {"name": "u-1001", "phone": "", "address": "8 Long Road"}
ITEMS = [{"sku": "SHAMPOO-500", "quantity": 1}]


def test_injected_409_and_422_are_final_refusals_in_the_contracts_error_body():
    with running_sandbox("--faults", "409,422") as sandbox, warehouse_client(sandbox.url) as client:
        refusals = []
        for key in ("msg-1", "msg-2"):
            with pytest.raises(CarrierRefusal) as raised:
                client.create_shipment(idempotency_key=key, order_ref=key, recipient=RECIPIENT, items=ITEMS)
            refusals.append(raised.value)
        waybill = client.create_shipment(
            idempotency_key="msg-1", order_ref="msg-1", recipient=RECIPIENT, items=ITEMS
        )
        seen = sandbox.requests()
        parcels = sandbox.shipments()
    assert [(r.http_status, r.error_code, r.reason) for r in refusals] == [
        (409, "conflict", "HTTP 409 conflict"),
        (422, "invalid_shipment", "HTTP 422 invalid_shipment"),
    ]
    assert seen["faults"] == {"409": 1, "422": 1} and seen["by_route"] == {"POST /v1/shipments": 3}
    assert [parcel["tracking_number"] for parcel in parcels] == [waybill.express_no]  # not retried


def test_a_final_fault_can_be_asked_for_on_one_request_or_as_a_share(carrier_sandbox):
    conflict = post_shipment(carrier_sandbox.url, "k", **{"X-Sandbox-Fault": "409"})
    invalid = post_shipment(carrier_sandbox.url, "k", **{"X-Sandbox-Fault": "422"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "conflict"
    assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_shipment"
    assert all(set(r.json()["error"]) == {"code", "message"} for r in (conflict, invalid))
    assert carrier_sandbox.shipments() == []
    with running_sandbox("--conflict-share", "0.5", "--invalid-share", "0.5", "--seed", "3") as sandbox:
        codes = {post_shipment(sandbox.url, f"k-{n}").status_code for n in range(20)}
        assert codes == {409, 422} and sandbox.shipments() == []


# --- the sandbox's state, in process -----------------------------------------------------------


def _books(**options):
    from credex.logistics.sandbox import SandboxCarrier, SandboxOptions

    return SandboxCarrier(SandboxOptions(stage_seconds=60, **options), wall=Wall())


def test_a_cancel_is_allowed_until_the_first_stage_ends_and_freezes_the_parcel():
    books = _books()
    shipment_id = books.create("k", BODY)[1]["shipment_id"]
    books.advance(59.999)
    status, answer = books.cancel(shipment_id, "c")
    assert status == 200 and answer["status"] == "cancelled"
    books.advance(10_000)
    assert books.cancel(shipment_id, "c") == (200, answer)
    tracked = books.tracking("sandbox", answer["tracking_number"])[1]
    assert tracked["status"] == "exception" and len(tracked["checkpoints"]) == 2
    assert tracked["checkpoints"][0]["time"] == answer["cancelled_at"]

    other = books.create("k2", BODY)[1]["shipment_id"]
    books.advance(60)
    status, refusal = books.cancel(other, "c2")
    assert status == 409 and refusal["error"]["code"] == "already_picked_up"


def test_shipments_can_be_filtered_and_an_unknown_filter_is_refused(carrier_sandbox):
    carrier_sandbox.create_shipment("msg-1")
    carrier_sandbox.create_shipment("msg-2")
    assert [row["idempotency_key"] for row in carrier_sandbox.shipments(order_ref="msg-2")] == ["msg-2"]
    assert carrier_sandbox.shipments(status="cancelled") == []
    bad = httpx.get(f"{carrier_sandbox.url}/_sandbox/shipments?colour=red", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_filter"


def test_stages_change_exactly_at_each_stage_boundary():
    from credex.logistics.sandbox import SandboxCarrier, SandboxOptions

    wall = Wall()
    carrier = SandboxCarrier(SandboxOptions(stage_seconds=60), wall=wall)
    number = carrier.create("k", BODY)[1]["tracking_number"]
    seen = []
    for elapsed in (0, 59.999, 60, 119.999, 120, 180, 10_000):
        wall.now = 1_800_000_000.0 + elapsed
        seen.append(carrier.tracking("sandbox", number)[1]["status"])
    assert seen == [
        "info_received",
        "info_received",
        "in_transit",
        "in_transit",
        "out_for_delivery",
        "delivered",
        "delivered",
    ]


def test_the_same_body_in_another_key_order_is_the_same_request():
    from credex.logistics.sandbox import SandboxCarrier, SandboxOptions

    carrier = SandboxCarrier(SandboxOptions())
    first = carrier.create("k", BODY)
    reordered = {"items": BODY["items"], "recipient": BODY["recipient"], "order_ref": BODY["order_ref"]}
    assert carrier.create("k", reordered) == (200, first[1])
    assert carrier.shipments()[0]["create_calls"] == 2
