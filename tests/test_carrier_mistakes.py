"""What the warehouse does when the carrier gets it wrong: a final refusal is answered
shipment.failed at once, an express number handed out twice is refused (and its waybill
cancelled), and two installations sharing one carrier account never take each other's waybills."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.sandbox import running_sandbox, stop_and_wait
from tests.test_warehouse import declared  # noqa: F401 - the fixture every test here uses
from tests.warehouse_messages import answers, cancel_body, created_body, rows, send

pytestmark = [pytest.mark.rabbitmq, pytest.mark.usefixtures("declared")]


def run(credex, env: dict, *options: str) -> dict:
    result = credex("warehouse", "run", "--once", "--json", *options, env=env)
    assert result.exit_code == 0, result.stderr
    return result.json()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("fault", ["409", "422"])
def test_a_final_refusal_is_answered_shipment_failed_after_one_attempt(credex, db_url, rabbit, fault):
    with running_sandbox("--faults", fault) as sandbox:
        create = send(rabbit, created_body(1))
        report = run(credex, sandbox.env())
        assert (report["failed"], report["waybills"], report["without_waybill"]) == (1, 0, 0)
        ((kind, body, correlation),) = answers(rabbit)
        assert (kind, correlation, body["message_id"], body["redemption_id"]) == (
            "shipment.failed",
            create["message_id"],
            create["message_id"],
            1,
        )
        assert f"HTTP {fault}" in body["reason"]
        assert sandbox.requests()["by_route"] == {"POST /v1/shipments": 1}  # no retry of a final answer
        row = rows(db_url)[1]
        assert (row["status"], row["express_no"]) == ("failed", None) and f"HTTP {fault}" in row["reason"]


def test_two_installations_on_one_carrier_account_both_ship_redemption_one(
    credex, db_url, rabbit, carrier_sandbox, tmp_path: Path
):
    # Each installation has its own redemption 1; the carrier keys them by their message ids.
    other_db = f"sqlite:///{tmp_path / 'other-shop.db'}"
    ours, theirs = created_body(1), created_body(1, address="1 Other Lane")
    send(rabbit, ours)
    run(credex, carrier_sandbox.env())
    send(rabbit, theirs)
    run(credex, carrier_sandbox.env(CREDEX_WAREHOUSE_DATABASE_URL=other_db))

    found = answers(rabbit)
    assert [kind for kind, _, _ in found] == ["shipment.requested"] * 2
    parcels = carrier_sandbox.shipments()
    assert sorted(p["idempotency_key"] for p in parcels) == sorted([ours["message_id"], theirs["message_id"]])
    assert len({p["tracking_number"] for p in parcels}) == 2
    assert rows(db_url)[1]["express_no"] != rows(other_db)[1]["express_no"]


def test_a_sandbox_restarted_mid_flow_never_hands_out_a_number_twice(credex, db_url, rabbit):
    port = free_port()
    with running_sandbox("--port", port) as sandbox:
        for n in (1, 2, 3):
            send(rabbit, created_body(n))
        assert run(credex, sandbox.env())["waybills"] == 3
        assert stop_and_wait(sandbox) == 0
    with running_sandbox("--port", port) as sandbox:  # the same address: the warehouse sees no change
        for n in (4, 5, 6):
            send(rabbit, created_body(n))
        assert run(credex, sandbox.env())["waybills"] == 3
        assert len(sandbox.shipments()) == 3  # it forgot the first three
    stored = rows(db_url)
    assert {row["status"] for row in stored.values()} == {"waybill"}
    numbers = [row["express_no"] for row in stored.values()]
    assert len(numbers) == len(set(numbers)) == 6
    assert [kind for kind, _, _ in answers(rabbit)] == ["shipment.requested"] * 6


def test_a_number_handed_out_again_after_a_restart_is_refused_and_its_waybill_cancelled(
    credex, db_url, rabbit
):
    port = free_port()
    with running_sandbox("--port", port, "--numbering", "sequential") as sandbox:
        send(rabbit, created_body(1))
        run(credex, sandbox.env())
        assert sandbox.shipments()[0]["tracking_number"] == "SIM0000000001"
        stop_and_wait(sandbox)
    answers(rabbit)
    with running_sandbox("--port", port, "--numbering", "sequential") as sandbox:
        create = send(rabbit, created_body(2))
        report = run(credex, sandbox.env())
        assert (report["failed"], report["confirmed"]) == (1, 1)
        ((kind, body, correlation),) = answers(rabbit)
        assert (kind, correlation) == ("shipment.failed", create["message_id"])
        assert "SIM0000000001" in body["reason"] and "already holds" in body["reason"]
        (parcel,) = sandbox.shipments()
        assert parcel["tracking_number"] == "SIM0000000001" and parcel["status"] == "cancelled"
        assert not parcel["live"]
    stored = rows(db_url)
    assert (stored[1]["status"], stored[1]["express_no"]) == ("waybill", "SIM0000000001")
    assert (stored[2]["status"], stored[2]["express_no"]) == ("failed", None)
    assert "SIM0000000001" in stored[2]["reason"]


def test_a_cancel_the_carrier_cannot_place_is_refused_for_a_person_to_look_at(credex, db_url, rabbit):
    # The carrier lost the shipment (a sandbox restarted keeps nothing): 404 on the cancel.
    port = free_port()
    with running_sandbox("--port", port) as sandbox:
        send(rabbit, created_body(1))
        run(credex, sandbox.env())
        stop_and_wait(sandbox)
    answers(rabbit)
    with running_sandbox("--port", port) as sandbox:
        send(rabbit, cancel_body(1))
        report = run(credex, sandbox.env())
        assert report["refused"] == 1
        ((kind, body, _),) = answers(rabbit)
        assert (kind, body["outcome"]) == ("shipment.cancelled", "refused")
        assert "HTTP 404" in body["reason"] and rows(db_url)[1]["status"] == "waybill"


def test_a_malformed_cancel_is_dropped_and_changes_nothing(credex, db_url, rabbit, carrier_sandbox):
    send(rabbit, {"message_id": "m-1", "redemption_id": "1", "reason": "x"}, "redemption.cancelled")
    send(rabbit, {"message_id": "has spaces", "redemption_id": 1, "reason": "x"}, "redemption.cancelled")
    send(rabbit, {"message_id": "m-3", "redemption_id": 1}, "redemption.cancelled")
    rabbit.publish("redemption.cancelled", cancel_body(1), type="redemption.shipped")  # an unknown type
    rabbit.publish("redemption.cancelled", b"\xff not json", type="redemption.cancelled")
    # the message id is the carrier's idempotency key and must be the outbox's UUID
    send(rabbit, {**cancel_body(1), "message_id": "not-a-uuid"}, "redemption.cancelled")
    send(rabbit, {**created_body(1), "message_id": "1234"})
    report = run(credex, carrier_sandbox.env())
    assert (report["received"], report["rejected"], report["confirmed"]) == (7, 7, 0)
    assert rows(db_url) == {} and answers(rabbit) == []
    assert rabbit.count(rabbit.names.warehouse_queue) == 0
