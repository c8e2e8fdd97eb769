"""A redemption.created for a redemption the points side has not used yet (forged, or stale: the
points database restored from a backup behind the warehouse's) leaves a shipment request for
that redemption number. The real redemption's create, another message for the same number, must
not be answered from that request: it never gets the other parcel's waybill, and ends
`exception` with the reason (shipment.failed) for a person to look at. Its repeats, the first
message's repeats and a cancel that came before its create are answered as before. Both ways a
create goes through the warehouse are covered: one at a time (``ShippingDesk.created``) and in
a batch (``created_many``), as the consumer takes a lone create."""

from __future__ import annotations

import json

import pytest

from credex.config import Settings
from credex.db.models import utcnow
from credex.logistics import carrier_client
from credex.warehouse.batches import created_many
from credex.warehouse.lifecycle import ShippingDesk
from credex.warehouse.messages import parse_cancel_message, parse_redemption_message
from tests.test_audit import warehouse_url  # noqa: F401 - the fixture: a warehouse database of its own
from tests.test_warehouse import declared  # noqa: F401 - the fixture: the queues declared
from tests.warehouse_messages import cancel_body, created_body, execute, rows, send

PRICE = 10
ADDRESS = "1 High St"
DOWN = {"CREDEX_LOGISTICS_URL": "http://127.0.0.1:1"}
REFUSED = "was opened by another redemption.created"


def the_body_of_redemption_one(**overrides) -> dict:
    """What the shop's first redemption will carry, under a message id of its own."""
    return created_body(1, user_id="u1", sku="MUG", quantity=1, points=PRICE, address=ADDRESS) | overrides


def as_message(body: dict):
    return parse_redemption_message(json.dumps(body).encode())


def run_all(calls):
    """The carrier calls one after the other: each one's result, or what it raised."""
    results = []
    for call in calls:
        try:
            results.append(call())
        except Exception as error:  # handed back, as the consumer's pool does
            results.append(error)
    return results


@pytest.fixture
def desk(db_url, carrier_sandbox):
    with carrier_client(Settings(logistics_url=carrier_sandbox.url)) as carrier:
        yield ShippingDesk(db_url, carrier)


def handle(desk: ShippingDesk, path: str, body: dict):
    """One redemption.created through the warehouse's single or batch path: its Handled."""
    if path == "single":
        return desk.created(as_message(body))
    (handled,) = created_many(desk, [as_message(body)], run_all)
    return handled


# --- the whole story: points side, relay, warehouse ----------------------------------------------


@pytest.fixture
def shop(credex):
    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", PRICE, "--stock", 5).exit_code == 0
    assert credex("award", "grant", "u1", 100, "--reason", "opening", "--ref", "open-u1").exit_code == 0


def relay_once(credex) -> dict:
    done = credex("relay", "run", "--once", "--json")
    assert done.exit_code == 0, done.stderr
    return done.json()


def warehouse_once(credex, env: dict, *options: str) -> dict:
    done = credex("warehouse", "run", "--once", "--json", *options, env=env)
    assert done.exit_code == 0, done.stderr
    return done.json()


def deliver(credex, sandbox, warehouse_db: str) -> None:
    """The warehouse takes what the relay published (`warehouse run --once`) and refuses it."""
    env = sandbox.env(CREDEX_WAREHOUSE_DATABASE_URL=warehouse_db)
    done = credex("warehouse", "run", "--once", "--json", env=env)
    assert done.exit_code == 0 and done.json()["failed"] == 1, done.stderr
    assert "refused redemption.created" in done.stderr and ADDRESS not in done.stderr  # logged, no address


@pytest.mark.rabbitmq
@pytest.mark.usefixtures("declared", "shop")
@pytest.mark.parametrize("forged_row", ["waybill", "requested"])
def test_the_real_create_after_a_forged_one_never_takes_its_parcel_and_ends_in_exception(
    credex,
    rabbit,
    carrier_sandbox,
    warehouse_url,  # noqa: F811
    forged_row,
):
    """Through `warehouse run` (its batch path); the single and batch paths on their own are the
    tests below."""
    env = carrier_sandbox.env(CREDEX_WAREHOUSE_DATABASE_URL=warehouse_url)
    forged = send(rabbit, the_body_of_redemption_one())
    if forged_row == "waybill":
        assert warehouse_once(credex, env)["waybills"] == 1
        (parcel,) = carrier_sandbox.shipments()
        forged_numbers = [parcel["tracking_number"]]
    else:  # the carrier was down: the request stays open, asked for under the forged message's key
        assert warehouse_once(credex, env | DOWN, "--carrier-timeout", "0.5")["without_waybill"] == 1
        forged_numbers = []
    before = rows(warehouse_url)
    assert before[1]["idempotency_key"] == forged["message_id"]

    real = credex("redeem", "create", "u1", "MUG", "--address", ADDRESS, "--json").json()
    assert real["redemption_id"] == 1 and real["message_id"] != forged["message_id"]
    for attempt in range(2):  # the relay's first publish, then `relay retry` of the dead message
        if attempt:
            assert credex("relay", "retry", real["message_id"]).exit_code == 0
        assert relay_once(credex)["published"] == 1
        deliver(credex, carrier_sandbox, warehouse_url)
        relay_once(credex)  # takes the warehouse's answer

        shown = credex("redeem", "show", 1, "--json").json()
        assert (shown["status"], shown["express_no"], shown["carrier"]) == ("exception", None, None)
        detail = shown["events"][0]["detail"]
        assert detail.startswith("shipment failed: ") and REFUSED in detail and forged["message_id"] in detail
        (message,) = [
            m for m in credex("relay", "list", "--json").json() if m["message_id"] == real["message_id"]
        ]
        assert message["state"] == "dead" and REFUSED in message["last_error"]
        assert [p["tracking_number"] for p in carrier_sandbox.shipments()] == forged_numbers
        assert rows(warehouse_url) == before  # the forged message's request is left as it is
    assert all(e["status"] != "shipping" for e in credex("redeem", "show", 1, "--json").json()["events"])


# --- the warehouse on its own: what it answers, and what it leaves alone --------------------------


@pytest.mark.parametrize("path", ["single", "batch"])
def test_each_create_keeps_its_own_answer_however_often_it_comes(db_url, desk, carrier_sandbox, path):
    first, other = created_body(7), created_body(7)  # the same redemption, two messages
    shipped = handle(desk, path, first)
    (parcel,) = carrier_sandbox.shipments()
    stored = rows(db_url)
    for _ in range(2):
        refused = handle(desk, path, other)
        assert (refused.outcome, refused.answer.kind) == ("failed", "failed")
        assert refused.answer.correlation_id == other["message_id"]
        assert REFUSED in json.loads(refused.answer.body)["reason"]
        assert parcel["tracking_number"] not in refused.answer.body.decode()

        again = handle(desk, path, first)  # a redelivery of the first: the same waybill again
        assert (again.outcome, again.answer.kind, again.answer.correlation_id) == (
            "requested",
            "requested",
            first["message_id"],
        )
        assert json.loads(again.answer.body)["express_no"] == json.loads(shipped.answer.body)["express_no"]
    assert rows(db_url) == stored
    assert len(carrier_sandbox.shipments()) == 1 and carrier_sandbox.shipments()[0]["create_calls"] == 1


@pytest.mark.parametrize("path", ["single", "batch"])
def test_a_create_with_its_id_but_another_body_is_refused(db_url, desk, carrier_sandbox, path):
    first = created_body(8)
    handle(desk, path, first)
    stored = rows(db_url)
    refused = handle(desk, path, first | {"address": "9 Elsewhere", "quantity": 3})
    assert refused.outcome == "failed"
    assert "another quantity, address" in json.loads(refused.answer.body)["reason"]
    assert "9 Elsewhere" not in refused.answer.body.decode()  # the reason names fields, not values
    assert rows(db_url) == stored and len(carrier_sandbox.shipments()) == 1


@pytest.mark.parametrize("path", ["single", "batch"])
def test_a_cancel_that_came_first_still_answers_the_create_cancelled(db_url, desk, carrier_sandbox, path):
    desk.cancelled(parse_cancel_message(json.dumps(cancel_body(9, "wrong size")).encode()))
    assert rows(db_url)[9]["status"] == "cancelled"
    create = created_body(9)
    for _ in range(2):
        handled = handle(desk, path, create)
        assert (handled.outcome, handled.answer.kind, handled.answer.correlation_id) == (
            "cancelled",
            "cancelled",
            create["message_id"],
        )
        assert json.loads(handled.answer.body)["outcome"] == "cancelled"
    assert carrier_sandbox.requests()["total"] == 0


@pytest.mark.parametrize("message_id", ["kept", "none"])
@pytest.mark.parametrize("path", ["single", "batch"])
def test_a_request_from_before_migration_0005_is_still_answered_with_its_waybill(
    db_url, desk, carrier_sandbox, path, message_id
):
    # As 0005 left it: the old key, no recipient, no carrier shipment id; its message id as stored
    # before (or, "none", missing: compared on what the row keeps of the body then).
    create = created_body(10)
    execute(
        db_url,
        "INSERT INTO shipment_request (type, redemption_id, message_id, sku, quantity, address, carrier, "
        "express_no, status, idempotency_key, created_at, updated_at) VALUES (2, 10, :message_id, 'MUG', "
        "1, '8 Long Road', 'sandbox', 'OLD0000000010', 'waybill', 'redemption-10', :now, :now)",
        message_id=create["message_id"] if message_id == "kept" else None,
        now=utcnow(),
    )
    handled = handle(desk, path, create)
    assert (handled.outcome, json.loads(handled.answer.body)["express_no"]) == ("requested", "OLD0000000010")
    assert carrier_sandbox.requests()["total"] == 0
