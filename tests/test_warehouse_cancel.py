"""The warehouse's row state machine (docs/redemptions.md), one cell at a time: what a
redemption.created and a redemption.cancelled do to the shipment request in each of its states,
what the warehouse answers, and what the carrier (the sandbox) saw. Messages are published as
the relay would; the warehouse runs as `credex warehouse run --once`."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from credex.db.engine import session_for
from credex.db.models import utcnow
from credex.warehouse.messages import parse_redemption_message
from credex.warehouse.shipments import open_request
from tests.sandbox import running_sandbox
from tests.test_warehouse import declared  # noqa: F401 - the fixture every test here uses
from tests.warehouse_messages import answers, cancel_body, created_body, execute, rows, send

pytestmark = [pytest.mark.rabbitmq, pytest.mark.usefixtures("declared")]

DOWN = {"CREDEX_LOGISTICS_URL": "http://127.0.0.1:1"}


def run(credex, env: dict, *options: str) -> dict:
    result = credex("warehouse", "run", "--once", "--json", *options, env=env)
    assert result.exit_code == 0, result.stderr
    return result.json()


def only_answer(rabbit) -> tuple[str, dict, str]:
    (answer,) = answers(rabbit)
    return answer


def carrier_calls(sandbox, route: str = "POST /v1/shipments") -> int:
    return sandbox.requests()["by_route"].get(route, 0)


CANCEL_ROUTE = "POST /v1/shipments/{shipment_id}/cancel"


# --- no row yet -------------------------------------------------------------------------------


def test_a_cancel_before_its_create_leaves_a_tombstone_and_the_create_is_answered_cancelled(
    credex,
    db_url,
    rabbit,
    carrier_sandbox,
):
    cancel = send(rabbit, cancel_body(1, "wrong size"))
    report = run(credex, carrier_sandbox.env())
    assert (report["cancelled"], report["confirmed"]) == (1, 1)
    kind, body, correlation = only_answer(rabbit)
    assert (kind, body["outcome"], body["reason"], correlation) == (
        "shipment.cancelled",
        "cancelled",
        "wrong size",
        cancel["message_id"],
    )
    assert body["message_id"] == cancel["message_id"] and body["redemption_id"] == 1
    tombstone = rows(db_url)[1]
    assert (tombstone["status"], tombstone["sku"], tombstone["express_no"]) == ("cancelled", None, None)
    (listed,) = credex("warehouse", "list", "--json").json()
    assert (listed["status"], listed["reason"], listed["sku"]) == ("cancelled", "wrong size", None)
    table = credex("warehouse", "list")
    assert table.exit_code == 0 and "cancelled" in table.stdout

    create = send(rabbit, created_body(1))
    send(rabbit, create)  # twice
    report = run(credex, carrier_sandbox.env())
    assert (report["cancelled"], report["waybills"], report["shipments_created"]) == (2, 0, 0)
    for kind, body, correlation in answers(rabbit):
        assert (kind, body["outcome"], correlation) == (
            "shipment.cancelled",
            "cancelled",
            create["message_id"],
        )
    assert carrier_sandbox.shipments() == [] and carrier_calls(carrier_sandbox) == 0
    assert rows(db_url)[1]["status"] == "cancelled"


# --- requested ----------------------------------------------------------------------------------


def test_a_request_never_asked_for_is_cancelled_without_calling_the_carrier(
    credex,
    db_url,
    rabbit,
    carrier_sandbox,
):
    # As a consumer that died between writing the request and asking the carrier left it.
    message = created_body(2)
    with session_for(db_url, write=True) as session:
        open_request(session, parse_redemption_message(json.dumps(message).encode()), now=utcnow())
        session.commit()
    assert rows(db_url)[2]["status"] == "requested" and rows(db_url)[2]["asked_at"] is None

    send(rabbit, cancel_body(2))
    run(credex, carrier_sandbox.env())
    assert only_answer(rabbit)[1]["outcome"] == "cancelled"
    assert rows(db_url)[2]["status"] == "cancelled"
    assert carrier_sandbox.requests()["total"] == 0

    send(rabbit, message)  # the relay's next attempt of the create
    run(credex, carrier_sandbox.env())
    assert only_answer(rabbit)[1]["outcome"] == "cancelled"
    assert carrier_sandbox.requests()["total"] == 0


def test_a_cancel_after_a_carrier_call_that_timed_out_cancels_the_waybill_issued_meanwhile(
    credex,
    db_url,
    rabbit,
):
    # The carrier issues the waybill only after 2 s; the warehouse gave up after 0.5 s.
    with running_sandbox("--faults", "slow", "--slow-seconds", "2") as sandbox:
        create = send(rabbit, created_body(3))
        report = run(credex, sandbox.env(), "--carrier-timeout", "0.5")
        assert (report["without_waybill"], report["confirmed"]) == (1, 0)
        assert answers(rabbit) == []
        row = rows(db_url)[3]
        assert (row["status"], row["express_no"]) == ("requested", None) and row["asked_at"] is not None

        send(rabbit, cancel_body(3))
        report = run(credex, sandbox.env())
        assert report["cancelled"] == 1
        assert only_answer(rabbit)[1]["outcome"] == "cancelled"
        (parcel,) = sandbox.shipments(idempotency_key=create["message_id"])
        assert parcel["status"] == "cancelled" and not parcel["live"]
        row = rows(db_url)[3]
        assert (row["status"], row["express_no"]) == ("cancelled", parcel["tracking_number"])


def test_a_create_after_the_carrier_was_down_ships_the_open_request(
    credex,
    db_url,
    rabbit,
    carrier_sandbox,
):
    create = send(rabbit, created_body(4))
    run(credex, DOWN, "--carrier-timeout", "0.5")
    assert rows(db_url)[4]["status"] == "requested" and answers(rabbit) == []
    send(rabbit, create)
    report = run(credex, carrier_sandbox.env())
    assert (report["waybills"], report["confirmed"]) == (1, 1)
    kind, body, correlation = only_answer(rabbit)
    assert kind == "shipment.requested" and correlation == create["message_id"]
    assert rows(db_url)[4]["status"] == "waybill"
    assert body["express_no"] == carrier_sandbox.shipments()[0]["tracking_number"]


# --- requesting ---------------------------------------------------------------------------------


def test_requesting_a_redelivered_create_asks_again_with_the_same_key(
    credex,
    db_url,
    rabbit,
    carrier_sandbox,
):
    create = send(rabbit, created_body(5))
    run(credex, carrier_sandbox.env())
    answers(rabbit)
    (parcel,) = carrier_sandbox.shipments()
    # As a consumer that crashed after asking, before saving the waybill.
    execute(db_url, "UPDATE shipment_request SET status = 'requesting', express_no = NULL, carrier = NULL")

    send(rabbit, create)
    report = run(credex, carrier_sandbox.env())
    assert report["waybills"] == 1
    kind, body, _ = only_answer(rabbit)
    assert kind == "shipment.requested" and body["express_no"] == parcel["tracking_number"]
    assert len(carrier_sandbox.shipments()) == 1 and carrier_sandbox.shipments()[0]["create_calls"] == 2


def test_requesting_a_cancel_waits_for_the_consumer_asking_unless_it_is_long_gone(
    credex,
    db_url,
    rabbit,
    carrier_sandbox,
):
    send(rabbit, created_body(6))
    run(credex, DOWN, "--carrier-timeout", "0.5")  # asked once: the carrier did not answer
    execute(db_url, "UPDATE shipment_request SET status = 'requesting', updated_at = :now", now=utcnow())

    cancel = send(rabbit, cancel_body(6))
    report = run(credex, carrier_sandbox.env())
    assert (report["deferred"], report["confirmed"]) == (1, 0)  # acked; the relay sends it again
    assert answers(rabbit) == [] and rows(db_url)[6]["status"] == "requesting"

    # Still requesting long after any carrier call could last: its consumer died. The cancel asks
    # the carrier itself, and cancels what the key was given.
    stale = utcnow() - timedelta(hours=1)
    execute(db_url, "UPDATE shipment_request SET updated_at = :then", then=stale)
    send(rabbit, cancel)
    run(credex, carrier_sandbox.env())
    assert only_answer(rabbit)[1]["outcome"] == "cancelled"
    assert rows(db_url)[6]["status"] == "cancelled"
    assert carrier_sandbox.live_waybills() == []


# --- waybill ------------------------------------------------------------------------------------


def test_a_waybill_is_cancelled_at_the_carrier_and_a_repeat_is_answered_the_same(
    credex,
    db_url,
    rabbit,
    carrier_sandbox,
):
    create = send(rabbit, created_body(7))
    run(credex, carrier_sandbox.env())
    assert only_answer(rabbit)[0] == "shipment.requested"
    send(rabbit, create)  # a late redelivery: the same waybill again
    run(credex, carrier_sandbox.env())
    assert only_answer(rabbit)[0] == "shipment.requested"

    cancel = send(rabbit, cancel_body(7, "ordered twice"))
    report = run(credex, carrier_sandbox.env())
    assert report["cancelled"] == 1
    kind, body, correlation = only_answer(rabbit)
    assert (kind, body["outcome"], body["reason"], correlation) == (
        "shipment.cancelled",
        "cancelled",
        "ordered twice",
        cancel["message_id"],
    )
    (parcel,) = carrier_sandbox.shipments()
    assert parcel["status"] == "cancelled" and not parcel["live"]
    assert rows(db_url)[7]["status"] == "cancelled"

    send(rabbit, cancel)  # cancelled: the same answer, the carrier not asked again
    send(rabbit, create)  # and a create now is answered cancelled, never with a waybill
    run(credex, carrier_sandbox.env())
    found = answers(rabbit)
    assert [(k, b["outcome"]) for k, b, _ in found] == [("shipment.cancelled", "cancelled")] * 2
    assert carrier_calls(carrier_sandbox, CANCEL_ROUTE) == 1 and carrier_calls(carrier_sandbox) == 1


def test_a_parcel_already_picked_up_is_refused_with_the_carriers_reason(
    credex,
    db_url,
    rabbit,
    carrier_sandbox,
):
    send(rabbit, created_body(8))
    run(credex, carrier_sandbox.env())
    answers(rabbit)
    carrier_sandbox.advance(61)  # picked up: in transit

    send(rabbit, cancel_body(8))
    report = run(credex, carrier_sandbox.env())
    assert report["refused"] == 1
    kind, body, _ = only_answer(rabbit)
    assert (kind, body["outcome"]) == ("shipment.cancelled", "refused")
    assert "already picked up" in body["reason"]
    row = rows(db_url)[8]
    assert row["status"] == "waybill" and "already picked up" in row["reason"]
    assert carrier_sandbox.shipments()[0]["live"]


def test_a_cancel_while_the_carrier_is_down_is_acked_unanswered_and_done_on_the_next_delivery(
    credex,
    db_url,
    rabbit,
    carrier_sandbox,
):
    send(rabbit, created_body(9))
    run(credex, carrier_sandbox.env())
    answers(rabbit)
    cancel = send(rabbit, cancel_body(9))
    report = run(credex, DOWN, "--carrier-timeout", "0.5")
    assert (report["without_waybill"], report["confirmed"]) == (1, 0)
    assert answers(rabbit) == [] and rows(db_url)[9]["status"] == "waybill"
    assert rabbit.count(rabbit.names.warehouse_queue) == 0  # acked

    send(rabbit, cancel)
    run(credex, carrier_sandbox.env())
    assert only_answer(rabbit)[1]["outcome"] == "cancelled"
    assert carrier_sandbox.live_waybills() == []


def test_a_cancel_met_by_a_refused_api_key_is_not_refused_and_is_done_once_the_key_is_fixed(
    credex,
    db_url,
    rabbit,
):
    """A wrong key says nothing of the parcel: the cancel is not answered "refused" (that would put
    the redemption back to `shipping` for good); it comes again and cancels the waybill then."""
    with running_sandbox(env={"CREDEX_LOGISTICS_API_KEY": "the-right-key"}) as carrier:
        right = carrier.env(CREDEX_LOGISTICS_API_KEY="the-right-key")
        send(rabbit, created_body(10))
        run(credex, right)
        assert only_answer(rabbit)[0] == "shipment.requested"
        cancel = send(rabbit, cancel_body(10, "changed my mind"))
        report = run(credex, carrier.env(CREDEX_LOGISTICS_API_KEY="a-wrong-key"))
        assert (report["without_waybill"], report["refused"], report["confirmed"]) == (1, 0, 0)
        assert answers(rabbit) == [] and rows(db_url)[10]["status"] == "waybill"
        assert rabbit.count(rabbit.names.warehouse_queue) == 0  # acked
        assert carrier.live_waybills() != []

        send(rabbit, cancel)  # the relay's next attempt, the key fixed
        run(credex, right)
        kind, body, _ = only_answer(rabbit)
        assert (kind, body["outcome"]) == ("shipment.cancelled", "cancelled")
        assert carrier.live_waybills() == [] and rows(db_url)[10]["status"] == "cancelled"


# --- failed -------------------------------------------------------------------------------------


def test_a_failed_request_is_cancelled_without_the_carrier_and_retried_by_a_create(
    credex,
    db_url,
    rabbit,
):
    with running_sandbox("--faults", "422") as sandbox:
        create = send(rabbit, created_body(10))
        report = run(credex, sandbox.env())
        assert report["failed"] == 1
        kind, body, correlation = only_answer(rabbit)
        assert kind == "shipment.failed" and correlation == create["message_id"]
        assert "422" in body["reason"] and body["redemption_id"] == 10
        assert rows(db_url)[10]["status"] == "failed"

        send(rabbit, create)  # `relay retry` once the cause is fixed: shipped
        run(credex, sandbox.env())
        assert only_answer(rabbit)[0] == "shipment.requested"
        assert rows(db_url)[10]["status"] == "waybill"

    with running_sandbox("--faults", "422") as sandbox:
        send(rabbit, created_body(11))
        run(credex, sandbox.env())
        answers(rabbit)
        send(rabbit, cancel_body(11))
        run(credex, sandbox.env())
        assert only_answer(rabbit)[1]["outcome"] == "cancelled"
        assert rows(db_url)[11]["status"] == "cancelled"
        assert sandbox.shipments() == [] and carrier_calls(sandbox) == 1


# --- orders -------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["create-cancel", "cancel-create", "both-twice-shuffled"])
def test_create_and_cancel_in_any_order_end_cancelled_with_no_live_waybill(
    credex,
    db_url,
    rabbit,
    carrier_sandbox,
    order,
    rng,
):
    create, cancel = created_body(12), cancel_body(12)
    sequence = {
        "create-cancel": [create, cancel],
        "cancel-create": [cancel, create],
        "both-twice-shuffled": rng.sample([create, cancel, create, cancel], 4),
    }[order]
    for body in sequence:
        send(rabbit, body)
    run(credex, carrier_sandbox.env())
    found = answers(rabbit)
    cancels = [b for k, b, c in found if k == "shipment.cancelled" and c == cancel["message_id"]]
    assert cancels and {b["outcome"] for b in cancels} == {"cancelled"}
    assert all(k != "shipment.failed" for k, _, _ in found)
    assert rows(db_url)[12]["status"] == "cancelled"
    assert carrier_sandbox.live_waybills() == []
