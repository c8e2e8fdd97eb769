"""The warehouse consumer on its own: one shipment request and one waybill per redemption however
often its message comes, malformed messages dropped, and a carrier it cannot use refused at start."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.support import wait_for

pytestmark = pytest.mark.rabbitmq


def redemption_message(redemption_id: int, **overrides) -> dict:
    body = {
        "message_id": str(uuid.uuid4()),
        "redemption_id": redemption_id,
        "user_id": "u1",
        "sku": "MUG",
        "quantity": 2,
        "points": 20,
        "address": "8 Long Road",
        "created_at": "2026-11-25T10:00:00+00:00",
    }
    return body | overrides


def warehouse_once(credex, env: dict) -> dict:
    result = credex("warehouse", "run", "--once", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    return result.json()


@pytest.fixture
def declared(credex, rabbit, carrier_sandbox):
    """A first warehouse run, with nothing to do, has declared the exchange and both queues."""
    assert rabbit.count(rabbit.names.warehouse_queue) == 0
    assert warehouse_once(credex, carrier_sandbox.env())["received"] == 0
    rabbit.publish("shipment.requested", b"{}")  # bound by the warehouse, for the relay
    wait_for(
        lambda: rabbit.take(rabbit.names.confirmations_queue), timeout=10, what="the confirmations queue"
    )


def test_a_message_delivered_three_times_makes_one_shipment_and_one_waybill(
    credex, rabbit, carrier_sandbox, declared
):
    message = redemption_message(7)
    for _ in range(3):
        rabbit.publish("redemption.created", message, message_id=message["message_id"])
    report = warehouse_once(credex, carrier_sandbox.env())
    assert (report["received"], report["shipments_created"], report["waybills"], report["confirmed"]) == (
        3,
        1,
        1,
        3,
    )

    (shipment,) = credex("warehouse", "list", "--json").json()
    assert (shipment["redemption_id"], shipment["sku"], shipment["quantity"], shipment["type"]) == (
        7,
        "MUG",
        2,
        2,
    )
    (parcel,) = carrier_sandbox.shipments()
    assert parcel["idempotency_key"] == message["message_id"]  # never a bare redemption number
    assert parcel["tracking_number"] == shipment["express_no"]

    confirmations = rabbit.take(rabbit.names.confirmations_queue)
    assert len(confirmations) == 3
    for properties, body in confirmations:
        assert properties.type == "shipment.requested" and properties.delivery_mode == 2
        assert properties.correlation_id == message["message_id"] == body["message_id"]
        assert properties.message_id != message["message_id"]
        assert body["express_no"] == shipment["express_no"] and body["carrier"] == "sandbox"
        assert body["shipment_id"] == shipment["shipment_id"] and body["redemption_id"] == 7
    assert rabbit.count(rabbit.names.warehouse_queue) == 0


def test_malformed_messages_are_dropped_and_the_good_ones_still_ship(
    credex, rabbit, carrier_sandbox, declared
):
    rabbit.publish("redemption.created", b"{not json")
    rabbit.publish("redemption.created", redemption_message(1, quantity=0))
    rabbit.publish("redemption.created", redemption_message(2) | {"redemption_id": "2"})
    rabbit.publish("redemption.created", b"[" * 100_000 + b"]" * 100_000)  # deeper than the parser goes
    # What no column stores (Postgres refuses NUL; a lone surrogate is not UTF-8) fails no batch.
    rabbit.publish("redemption.created", redemption_message(4) | {"user_id": "u\x001"})
    rabbit.publish("redemption.created", redemption_message(5) | {"address": "8 Long Road \ud800"})
    good = redemption_message(3)
    rabbit.publish("redemption.created", good, message_id=good["message_id"])
    report = warehouse_once(credex, carrier_sandbox.env())
    assert (report["received"], report["rejected"], report["waybills"], report["confirmed"]) == (7, 6, 1, 1)
    assert [s["redemption_id"] for s in credex("warehouse", "list", "--json").json()] == [3]
    assert rabbit.count(rabbit.names.warehouse_queue) == 0


def test_a_carrier_that_is_down_leaves_the_request_open_for_the_next_delivery(
    credex, rabbit, carrier_sandbox, declared
):
    message = redemption_message(5)
    rabbit.publish("redemption.created", message)
    down = {"CREDEX_LOGISTICS_URL": "http://127.0.0.1:1", "CREDEX_OPERATOR": "tester"}
    report = credex("warehouse", "run", "--once", "--json", "--carrier-timeout", "0.5", env=down)
    assert report.exit_code == 0, report.stderr
    assert (
        report.json()["shipments_created"],
        report.json()["without_waybill"],
        report.json()["confirmed"],
    ) == (
        1,
        1,
        0,
    )
    assert "no waybill yet" in report.stderr and "the relay will send it again" in report.stderr
    (shipment,) = credex("warehouse", "list", "--json").json()
    assert shipment["express_no"] is None
    assert rabbit.count(rabbit.names.confirmations_queue) == 0

    rabbit.publish("redemption.created", message)  # the relay's next attempt
    report = warehouse_once(credex, carrier_sandbox.env())
    assert (report["shipments_created"], report["waybills"], report["confirmed"]) == (0, 1, 1)
    (shipment,) = credex("warehouse", "list", "--json").json()
    assert shipment["express_no"] == carrier_sandbox.shipments()[0]["tracking_number"]


def test_a_refused_api_key_fails_no_shipment_and_the_message_ships_once_the_key_is_fixed(
    credex, rabbit, declared
):
    """A wrong key (rotated at the carrier, mistyped) refuses every call alike: no shipment is
    failed for it (that would put every redemption meanwhile in `exception`), the message is acked
    unanswered as when the carrier is away, and the relay's next attempt ships it."""
    from tests.sandbox import running_sandbox

    message = redemption_message(6)
    rabbit.publish("redemption.created", message, message_id=message["message_id"])
    with running_sandbox(env={"CREDEX_LOGISTICS_API_KEY": "the-right-key"}) as carrier:
        refused = credex(
            "warehouse", "run", "--once", "--json", env=carrier.env(CREDEX_LOGISTICS_API_KEY="a-wrong-key")
        )
        assert refused.exit_code == 0, refused.stderr
        report = refused.json()
        assert (report["shipments_created"], report["without_waybill"], report["failed"]) == (1, 1, 0)
        assert report["confirmed"] == 0 and rabbit.count(rabbit.names.confirmations_queue) == 0
        assert "refused the API key" in refused.stderr and "the relay will send it again" in refused.stderr
        assert "a-wrong-key" not in refused.stdout + refused.stderr  # never an API key
        (shipment,) = credex("warehouse", "list", "--json").json()
        assert (shipment["status"], shipment["express_no"]) == ("requested", None)
        assert carrier.shipments() == []

        rabbit.publish("redemption.created", message, message_id=message["message_id"])  # sent again
        report = warehouse_once(credex, carrier.env(CREDEX_LOGISTICS_API_KEY="the-right-key"))
        assert (report["shipments_created"], report["waybills"], report["confirmed"]) == (0, 1, 1)
        ((properties, body),) = rabbit.take(rabbit.names.confirmations_queue)
        assert properties.type == "shipment.requested" and body["redemption_id"] == 6
        (parcel,) = carrier.shipments()
        assert parcel["idempotency_key"] == message["message_id"]


@pytest.mark.parametrize("prefetch", [1, 20, 100, 1000])
def test_a_requesting_row_is_not_taken_for_abandoned_while_its_consumer_may_still_ask(prefetch):
    """A hand's rows are claimed `requesting` together and asked CARRIER_CALLS at a time: the
    lease after which a cancel takes such a row for abandoned outlasts the last one's turn."""
    from credex.relay.topology import Names
    from credex.warehouse.consumer import CARRIER_CALLS, Warehouse, warehouse_broker

    broker = warehouse_broker("amqp://guest:guest@127.0.0.1:5672/%2F", Names("t."), prefetch=prefetch)
    warehouse = Warehouse("sqlite://", broker, lambda: None, carrier_timeout=15.0)
    last_turn = -(-prefetch // CARRIER_CALLS) * 15.0  # every call before it taking its whole bound
    assert warehouse.requesting_lease > last_turn
    assert warehouse.requesting_lease >= 4 * 15.0 + 30  # never shorter than it was


def test_without_a_carrier_the_warehouse_refuses_to_start_and_consumes_nothing(credex, rabbit):
    rabbit.channel.exchange_declare(rabbit.names.exchange, "topic", durable=True)
    result = credex("warehouse", "run", "--once", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "not_configured" and "credex logistics sandbox" in error["message"]

    tracking_only = {
        "CREDEX_LOGISTICS_PROVIDER": "kuaidi100",
        "CREDEX_KUAIDI100_CUSTOMER": "C0FFEE",
        "CREDEX_KUAIDI100_KEY": "k3y-never-shown",
    }
    result = credex("warehouse", "run", "--once", env=tracking_only)
    assert result.exit_code == 2
    assert "cannot issue waybills" in result.stderr and "k3y-never-shown" not in result.stderr


def test_warehouse_list_with_no_shipments_says_so(credex):
    assert credex("warehouse", "list", "--json").json() == []
    assert "(none)" in credex("warehouse", "list").stdout


def test_messages_taken_while_the_database_is_away_are_shipped_once_it_is_back(
    db_url, backend, rabbit, carrier_sandbox, tmp_path
):
    """The messages in hand when the database goes away are neither dropped nor left unacked on
    the channel: the running warehouse handles them again once the database answers, without
    reconnecting to the broker."""
    import signal
    import subprocess

    from sqlalchemy.engine import make_url

    from tests.support import credex_command, pg_admin

    if backend != "postgres":
        pytest.skip("a database server that can refuse connections for a while")
    database = make_url(db_url).database
    log_path = tmp_path / "warehouse.log"
    with open(log_path, "w") as log:
        warehouse = subprocess.Popen(
            credex_command("warehouse", "run", "--json"),
            env=carrier_sandbox.env(CREDEX_DATABASE_URL=db_url, **rabbit.env),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        wait_for(lambda: " connected to " in log_path.read_text(), timeout=60, what="the warehouse")
        first = redemption_message(1)
        rabbit.publish("redemption.created", first, message_id=first["message_id"])
        wait_for(lambda: rabbit.count(rabbit.names.confirmations_queue) == 1, timeout=30, what="shipping")

        with pg_admin() as admin:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,)
            )
        try:
            for n in (2, 3):
                message = redemption_message(n)
                rabbit.publish("redemption.created", message, message_id=message["message_id"])
            wait_for(lambda: "trying again" in log_path.read_text(), timeout=30, what="the database to fail")
        finally:
            with pg_admin() as admin:
                admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        wait_for(
            lambda: rabbit.count(rabbit.names.confirmations_queue) == 3, timeout=60, what="the rest shipped"
        )
        assert rabbit.count(rabbit.names.warehouse_queue) == 0
    finally:
        warehouse.send_signal(signal.SIGTERM)
        out, _ = warehouse.communicate(timeout=60)
    assert warehouse.returncode == 0, log_path.read_text()
    report = json.loads(out)
    assert (report["received"], report["shipments_created"], report["reconnects"]) == (3, 3, 0)
    assert len(carrier_sandbox.shipments()) == 3
