"""Redemptions reach the warehouse and ship exactly once: the relay, the warehouse consumer and
the sandbox carrier as real processes on the real broker, on SQLite and on Postgres."""

from __future__ import annotations

import json

import pytest

from tests.pipeline import Pipeline, check_shipped_exactly_once
from tests.sandbox import running_sandbox
from tests.support import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture
def shop(credex):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10")
    credex("award", "grant", "u1", "100000", "--reason", "opening", "--ref", "open-u1")

    def redeem(n: int) -> list[dict]:
        return [
            credex("redeem", "create", "u1", "MUG", "--address", f"{i} High St", "--json").json()
            for i in range(n)
        ]

    return redeem


@pytest.fixture
def pipeline(db_url, rabbit, tmp_path):
    with running_sandbox() as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        yield pipeline
        pipeline.close()


def test_redemptions_ship_and_redeem_show_has_the_express_number(credex, shop, pipeline):
    created = shop(5)
    relay, warehouse = pipeline.relay(), pipeline.warehouse()
    pipeline.wait_all_confirmed(5)
    (relay_exit, relay_out), (warehouse_exit, warehouse_out) = pipeline.stop(relay), pipeline.stop(warehouse)
    assert (relay_exit, warehouse_exit) == (0, 0)
    assert json.loads(relay_out)["confirmed"] == 5
    assert json.loads(warehouse_out)["waybills"] == 5

    shipments = {s["redemption_id"]: s for s in credex("warehouse", "list", "--json").json()}
    for redemption in created:
        shown = credex("redeem", "show", str(redemption["redemption_id"]), "--json").json()
        assert shown["status"] == "shipping" and shown["carrier"] == "sandbox"
        assert shown["express_no"] == shipments[redemption["redemption_id"]]["express_no"]
    check_shipped_exactly_once(pipeline, 5)

    tracked = pipeline.run("track", str(created[0]["redemption_id"]), "--json")
    assert tracked.returncode == 0, tracked.stderr
    assert json.loads(tracked.stdout)["status"] == "info_received"


def test_cron_style_passes_deliver_and_confirm(credex, shop, pipeline):
    shop(3)
    for command in (("relay", "run", "--once", "--json"), ("warehouse", "run", "--once", "--json")):
        done = pipeline.run(*command)
        assert done.returncode == 0, done.stderr
    assert pipeline.confirmed() == 0  # the confirmations wait in the relay's queue until its next pass
    done = pipeline.run("relay", "run", "--once", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["confirmed"] == 3
    check_shipped_exactly_once(pipeline, 3)
    assert credex("relay", "status", "--json").json()["oldest_unconfirmed_age_seconds"] is None


def test_a_carrier_too_slow_to_answer_gets_the_message_again_and_ships_it_once(
    db_url, credex, shop, rabbit, tmp_path
):
    # The carrier takes 2 s to answer its first request; the warehouse gives up after 0.5 s and acks
    # without confirming; the relay publishes again after 1 s, and the warehouse completes the same
    # shipment request with the waybill the carrier issued for the same idempotency key.
    with running_sandbox("--faults", "slow", "--slow-seconds", "2") as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            (redemption,) = shop(1)
            relay = pipeline.relay("--confirm-timeout", "1")
            warehouse = pipeline.warehouse("--carrier-timeout", "0.5")
            pipeline.wait_all_confirmed(1, timeout=60)
            pipeline.stop(relay)
            warehouse_out = pipeline.stop(warehouse)[1]
        finally:
            pipeline.close()
        report = json.loads(warehouse_out)
        assert report["received"] >= 2 and report["without_waybill"] >= 1 and report["waybills"] == 1
        assert "no waybill yet" in pipeline.log(warehouse)
        message = credex("relay", "list", "--json").json()[0]
        assert message["state"] == "confirmed" and message["attempts"] >= 2
        (parcel,) = sandbox.shipments()
        assert parcel["idempotency_key"] == redemption["message_id"]  # the message's UUID
        # Asked twice with the one key. Counted as the requests arrive: the slow first one reaches
        # the parcel only after its 2 s, which can be after the workers have stopped.
        assert sandbox.requests()["by_route"]["POST /v1/shipments"] >= 2
        check_shipped_exactly_once(pipeline, 1)


def test_a_warehouse_started_late_gets_every_copy_and_ships_each_redemption_once(
    credex, shop, pipeline, rabbit
):
    created = shop(2)
    relay = pipeline.relay("--confirm-timeout", "0.3")
    queue = rabbit.names.warehouse_queue
    wait_for(lambda: rabbit.count(queue) >= 6, timeout=30, what="each message published three times")
    warehouse = pipeline.warehouse()
    pipeline.wait_all_confirmed(2)
    (_, relay_out), (_, warehouse_out) = pipeline.stop(relay), pipeline.stop(warehouse)
    report = json.loads(warehouse_out)
    assert report["received"] >= 6
    assert report["shipments_created"] == 2 and report["waybills"] == 2
    assert json.loads(relay_out)["confirmed"] == 2
    check_shipped_exactly_once(pipeline, len(created))


def test_the_warehouse_keeps_its_shipments_in_a_database_of_its_own(db_url, credex, shop, rabbit, tmp_path):
    warehouse_db = f"sqlite:///{tmp_path / 'warehouse.db'}"
    with running_sandbox() as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path, warehouse_db_url=warehouse_db)
        try:
            shop(2)
            relay, warehouse = pipeline.relay(), pipeline.warehouse()
            pipeline.wait_all_confirmed(2)
            pipeline.stop(relay), pipeline.stop(warehouse)
        finally:
            pipeline.close()
        check_shipped_exactly_once(pipeline, 2)
    assert pipeline.scalar("SELECT count(*) FROM shipment_request") == 0  # none on the points side
    listed = credex("warehouse", "list", "--json", env={"CREDEX_WAREHOUSE_DATABASE_URL": warehouse_db})
    assert len(listed.json()) == 2


def test_two_relays_and_two_warehouses_at_once_ship_no_redemption_twice(credex, shop, pipeline):
    shop(30)
    warehouses = [pipeline.warehouse("--prefetch", "3"), pipeline.warehouse("--prefetch", "3")]
    for warehouse in warehouses:  # both consume before the first message goes out: on a busy
        pipeline.wait_ready(warehouse)  # machine one could otherwise ship all 60 before the other
    workers = [pipeline.relay("--batch-size", "5"), pipeline.relay("--batch-size", "5"), *warehouses]
    shop(30)  # more arrive while all four run
    pipeline.wait_all_confirmed(60)
    reports = [json.loads(pipeline.stop(worker)[1]) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    assert sum(r["confirmed"] for r in reports[:2]) == 60
    assert all(r["received"] > 0 for r in reports[2:]), "both warehouse consumers took part"
    check_shipped_exactly_once(pipeline, 60)
