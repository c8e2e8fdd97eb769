"""The relay and the warehouse against a broker that misbehaves for real: confirmations that are
not JSON objects, a confirmation the broker refuses, a queue deleted under its consumer,
publisher confirms that stop arriving, a second SIGTERM, and a full broker restart (tests/test_outages.py).

Each ends with every redemption shipped exactly once and every rule of domain.md holding (the
``db_url`` teardown check, plus ``check_shipped_exactly_once`` where a warehouse ran)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.netfaults import FaultyProxy
from tests.pipeline import Pipeline, check_shipped_exactly_once
from tests.sandbox import running_sandbox
from tests.support import wait_for
from tests.test_worker_metrics import metrics_url, one, scrape

pytestmark = [pytest.mark.rabbitmq]


@pytest.fixture
def shop(credex):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "100")
    credex("award", "grant", "u1", "1000", "--reason", "opening", "--ref", "open-u1")

    def redeem(n: int = 1) -> list[dict]:
        created = []
        for i in range(n):
            result = credex("redeem", "create", "u1", "MUG", "--address", f"{i} High St", "--json")
            assert result.exit_code == 0, result.stderr
            created.append(result.json())
        return created

    return redeem


def message_of(credex, redemption: dict) -> dict:
    (message,) = [
        m for m in credex("relay", "list", "--json").json() if m["message_id"] == redemption["message_id"]
    ]
    return message


# --- confirmations the relay cannot use ------------------------------------------------------------


def test_confirmations_that_are_not_objects_or_miss_a_field_are_dropped_and_change_nothing(
    db_url, credex, shop, rabbit
):
    (redemption,) = shop(1)
    assert credex("relay", "run", "--once", "--json").json()["published"] == 1
    mid = redemption["message_id"]
    malformed = [
        b"[1, 2]",
        b'"shipped"',
        b"null",
        b"42",
        b"{}",
        b"\xff\xfe not even text",
        {"message_id": mid},  # no express number
        {"message_id": mid, "express_no": ""},
        {"message_id": mid, "express_no": 42},
        {"express_no": "SIM1", "carrier": "sandbox"},  # no message id, no correlation id
        {"message_id": 7, "express_no": "SIM1"},
    ]
    for body in malformed:
        rabbit.publish("shipment.requested", body)
    # Well formed, for a message nobody wrote: unknown (not a repeat), it finds nothing to confirm.
    rabbit.publish("shipment.requested", {"message_id": "no-such-message", "express_no": "SIM9"})

    report = credex("relay", "run", "--once", "--json")
    assert report.exit_code == 0, report.stderr
    counts = report.json()
    assert (
        counts["malformed_confirmations"],
        counts["unknown_confirmations"],
        counts["repeated_confirmations"],
        counts["confirmed"],
    ) == (len(malformed), 1, 0, 0)
    assert report.stderr.count("dropped a malformed confirmation") == len(malformed)
    assert rabbit.count(rabbit.names.confirmations_queue) == 0, "every one of them is acked"
    shown = credex("redeem", "show", str(redemption["redemption_id"]), "--json").json()
    assert (shown["status"], shown["express_no"], shown["message_state"]) == ("pending", None, "sent")

    # The relay is still of use: the real confirmation comes and is recorded.
    rabbit.publish("shipment.requested", {"message_id": mid, "express_no": "SIM1", "carrier": "sandbox"})
    assert credex("relay", "run", "--once", "--json").json()["confirmed"] == 1
    assert credex("redeem", "show", str(redemption["redemption_id"]), "--json").json()["express_no"] == "SIM1"


# --- the warehouse's confirmation refused by the broker ---------------------------------------------


@pytest.fixture
def pipeline(db_url, rabbit, tmp_path):
    with running_sandbox() as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            yield pipeline
        finally:
            pipeline.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_confirmation_that_cannot_be_published_is_sent_again_with_the_next_delivery(shop, rabbit, pipeline):
    names = rabbit.names
    relay = pipeline.relay("--confirm-timeout", "1", "--max-confirm-timeout", "1")
    warehouse = pipeline.warehouse()
    for process in (relay, warehouse):
        pipeline.wait_ready(process)  # both declared the topology
    # No queue takes the confirmations any more: the broker returns each one unroutable.
    rabbit.channel.queue_unbind(names.confirmations_queue, names.exchange, routing_key="shipment.requested")
    try:
        (redemption,) = shop(1)
        wait_for(
            lambda: pipeline.log(warehouse).count("not published: unroutable") >= 2,
            timeout=60,
            what="the warehouse's confirmation returned twice (the relay sent the message again)",
        )
        assert pipeline.confirmed() == 0
        assert rabbit.count(names.warehouse_queue) == 0, "acked all the same: the relay sends it again"
    finally:
        rabbit.channel.queue_bind(names.confirmations_queue, names.exchange, routing_key="shipment.requested")
    pipeline.wait_all_confirmed(1, timeout=60)
    (relay_exit, _), (warehouse_exit, warehouse_out) = pipeline.stop(relay), pipeline.stop(warehouse)
    assert (relay_exit, warehouse_exit) == (0, 0)
    report = json.loads(warehouse_out)
    assert report["received"] >= 3 and report["shipments_created"] == 1 and report["waybills"] == 1
    check_shipped_exactly_once(pipeline, 1)
    (parcel,) = pipeline.sandbox.shipments()
    assert parcel["idempotency_key"] == redemption["message_id"]  # the message's UUID


# --- a queue deleted under its consumer -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("worker", ["warehouse", "relay"])
def test_a_worker_whose_queue_is_deleted_under_it_reconnects_and_everything_ships(
    shop, rabbit, pipeline, worker
):
    relay = pipeline.relay("--confirm-timeout", "1", "--max-confirm-timeout", "2")
    warehouse = pipeline.warehouse()
    for process in (relay, warehouse):
        pipeline.wait_ready(process)
    shop(2)
    pipeline.wait_all_confirmed(2)
    victim = warehouse if worker == "warehouse" else relay
    queue = rabbit.names.warehouse_queue if worker == "warehouse" else rabbit.names.confirmations_queue
    rabbit.channel.queue_delete(queue)  # the broker cancels the consumer
    wait_for(
        lambda: "reconnected to the broker" in pipeline.log(victim),
        timeout=60,
        what=f"the {worker} to reconnect",
    )
    assert "cancelled the consumer" in pipeline.log(victim)
    shop(3)
    pipeline.wait_all_confirmed(5, timeout=90)
    (relay_exit, relay_out), (warehouse_exit, warehouse_out) = pipeline.stop(relay), pipeline.stop(warehouse)
    assert (relay_exit, warehouse_exit) == (0, 0), pipeline.log(victim)
    reports = {"relay": json.loads(relay_out), "warehouse": json.loads(warehouse_out)}
    assert reports[worker]["reconnects"] >= 1
    check_shipped_exactly_once(pipeline, 5)


# --- publisher confirms that stop arriving --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
# Postgres: its claims are row locks, released while the publish waits; SQLite's lease path for a
# publish whose confirm never came is the crash test's "relay_after_publish" kill.
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_publisher_confirms_that_stop_arriving_leave_the_message_unsent_until_published_again(
    credex, shop, rabbit, pipeline
):
    # The relay talks to the broker through a proxy that, once muted, passes what the relay sends
    # (the broker stores the message) and swallows every answer: the publisher confirm never comes.
    # It waits CREDEX_AMQP_PUBLISH_TIMEOUT for it (30 s by default), then reconnects.
    with FaultyProxy("127.0.0.1", 5672) as proxy:
        pipeline.env["CREDEX_AMQP_URL"] = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"
        pipeline.env["CREDEX_AMQP_PUBLISH_TIMEOUT"] = "4"
        relay = pipeline.relay("--confirm-timeout", "60")
        pipeline.wait_ready(relay)
        assert proxy.mute_answers() == 1
        (redemption,) = shop(1)
        queue = rabbit.names.warehouse_queue
        wait_for(lambda: rabbit.count(queue) == 1, timeout=30, what="the broker to have the message")
        # Never marked sent without its confirm, however long the relay waits for it.
        while "publisher confirms stopped arriving" not in pipeline.log(relay):
            assert message_of(credex, redemption)["state"] == "pending"
            assert relay.poll() is None, pipeline.log(relay)
            time.sleep(0.5)
        assert "no publisher confirm within 4 s" in pipeline.log(relay)
        wait_for(
            lambda: message_of(credex, redemption)["state"] == "sent", timeout=60, what="the publish again"
        )
        message = message_of(credex, redemption)
        assert message["attempts"] == 2
        assert rabbit.count(queue) == 2  # both copies: the warehouse ships it once all the same
        pipeline.env["CREDEX_AMQP_URL"] = rabbit.url
        del pipeline.env["CREDEX_AMQP_PUBLISH_TIMEOUT"]
        warehouse = pipeline.warehouse()
        pipeline.wait_all_confirmed(1, timeout=90)
        (relay_exit, relay_out), (warehouse_exit, _) = pipeline.stop(relay), pipeline.stop(warehouse)
    assert (relay_exit, warehouse_exit) == (0, 0)
    assert json.loads(relay_out)["reconnects"] >= 1
    check_shipped_exactly_once(pipeline, 1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_warehouse_whose_answer_is_never_confirmed_reconnects_and_ships_once(
    db_url, shop, rabbit, tmp_path
):
    # The warehouse talks to the broker through a proxy, muted while the carrier (2 s to answer)
    # is asked for the waybill: the warehouse's answer reaches the broker, its publisher confirm
    # never reaches the warehouse. After CREDEX_AMQP_PUBLISH_TIMEOUT it gives the connection up,
    # the delivery it never acked comes back on the next one, and it answers again from its row.
    with (
        running_sandbox("--faults", "slow", "--slow-seconds", "2") as sandbox,
        FaultyProxy("127.0.0.1", 5672) as proxy,
    ):
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            # The relay sends nothing again for a minute: the copy the warehouse answers again is
            # the delivery it never acked, given back by the broker as its old connection ended.
            relay = pipeline.relay("--confirm-timeout", "60")
            warehouse = pipeline.warehouse(
                "--metrics-port",
                "0",
                "--log-format",
                "json",
                env={
                    "CREDEX_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F",
                    "CREDEX_AMQP_PUBLISH_TIMEOUT": "3",
                },
            )
            for process in (relay, warehouse):
                pipeline.wait_ready(process)
            metrics = metrics_url(pipeline, warehouse)
            shop(1)
            wait_for(
                lambda: sandbox.requests()["faults"].get("slow", 0) >= 1,
                timeout=60,
                what="the warehouse waiting on the carrier",
            )
            assert proxy.mute_answers() == 1
            wait_for(
                lambda: "reconnected to the broker" in pipeline.log(warehouse),
                timeout=60,
                what="the warehouse to give up its muted connection and connect again",
            )
            log = pipeline.log(warehouse)
            assert "broker lost (publisher confirms stopped arriving)" in log
            assert "not published: no publisher confirm within 3 s" in log
            # The delivery never acked came back on the new connection and was answered again,
            # from its row (no second carrier call): that answer's confirm arrives, within 30 s,
            # before the relay's 60 s could have sent a copy of its own.
            wait_for(
                lambda: one(scrape(metrics)[1], "credex_warehouse_messages_total", outcome="confirmed") == 1,
                timeout=30,
                what="the answer published again and confirmed",
            )
            assert (
                one(scrape(metrics)[1], "credex_warehouse_messages_total", outcome="confirmation_failed") == 1
            )
            pipeline.wait_all_confirmed(1, timeout=90)
            (relay_exit, _), (warehouse_exit, warehouse_out) = pipeline.stop(relay), pipeline.stop(warehouse)
            assert (relay_exit, warehouse_exit) == (0, 0), pipeline.log(warehouse)
            report = json.loads(warehouse_out)
            assert report["reconnects"] >= 1 and report["received"] == 2  # the delivery, then again
            assert report["shipments_created"] == 1 and report["waybills"] == 1
            check_shipped_exactly_once(pipeline, 1)
        finally:
            pipeline.close()


# --- a second SIGTERM -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_sigterm_leaves_at_once_and_the_message_comes_back_to_the_next_warehouse(
    db_url, shop, rabbit, tmp_path
):
    # The carrier takes two minutes to answer the first request: the warehouse is busy with it.
    with running_sandbox("--faults", "slow", "--slow-seconds", "120") as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            shop(1)
            published = pipeline.run("relay", "run", "--once", "--json")
            assert published.returncode == 0, published.stderr
            warehouse = pipeline.warehouse("--carrier-timeout", "100")
            wait_for(
                lambda: sandbox.requests()["faults"].get("slow") == 1,
                timeout=60,
                what="the warehouse waiting on the carrier",
            )
            warehouse.send_signal(signal.SIGTERM)
            wait_for(
                lambda: "SIGTERM received" in pipeline.log(warehouse), timeout=30, what="the first SIGTERM"
            )
            time.sleep(0.5)
            assert warehouse.poll() is None, "the first SIGTERM lets the work in hand finish"
            warehouse.send_signal(signal.SIGTERM)
            try:
                out, _ = warehouse.communicate(timeout=20)  # far less than the carrier's 120 s
            except subprocess.TimeoutExpired:
                pytest.fail("the second SIGTERM did not make the warehouse leave at once")
            assert warehouse.returncode == 128 + signal.SIGTERM, pipeline.log(warehouse)
            assert '"code": "interrupted"' in pipeline.log(warehouse) and out == ""
            wait_for(  # the broker requeues what the dead connection held once it sees it closed
                lambda: rabbit.count(rabbit.names.warehouse_queue) == 1,
                timeout=30,
                what="the unacked message back in the queue",
            )

            relay, again = pipeline.relay(), pipeline.warehouse()
            pipeline.wait_all_confirmed(1, timeout=90)
            assert (pipeline.stop(relay)[0], pipeline.stop(again)[0]) == (0, 0)
        finally:
            pipeline.close()
        check_shipped_exactly_once(pipeline, 1)
