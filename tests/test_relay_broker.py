"""The relay against the real broker: what it publishes, what it does with confirmations, refusals
from the broker, a broker that is away, and the long-running relay's stop and reconnect.

(Over 400 lines on purpose: every test here drives the relay against the one real broker, with
the same fixtures; split, the halves would each need that set-up.)"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.invariants import check_points_invariants
from tests.support import credex_command, run_process, subprocess_env, wait_for

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def shop(credex):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10")
    credex("award", "grant", "u1", "1000", "--reason", "opening", "--ref", "open-u1")

    def redeem(n: int = 1) -> list[dict]:
        return [
            credex("redeem", "create", "u1", "MUG", "--address", f"{i} High St", "--json").json()
            for i in range(n)
        ]

    return redeem


def relay_once(credex, *options: str) -> dict:
    result = credex("relay", "run", "--once", "--json", *options)
    assert result.exit_code == 0, result.stderr
    return result.json()


def confirmation(redemption: dict, express_no: str) -> dict:
    return {
        "message_id": redemption["message_id"],
        "redemption_id": redemption["redemption_id"],
        "shipment_id": redemption["redemption_id"],
        "carrier": "sandbox",
        "express_no": express_no,
        "created_at": "2026-11-25T10:00:00+00:00",
    }


def test_a_relay_on_postgres_warns_when_nothing_vacuums_the_tables_it_rewrites(credex, shop, rabbit, db_url):
    from sqlalchemy import text

    from credex.db.engine import get_engine

    shop(1)
    result = credex("relay", "run", "--once", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["published"] == 1
    warned = "autovacuum is off" in result.stderr
    if db_url.startswith("sqlite"):
        assert not warned  # nothing to vacuum by hand: SQLite keeps no dead row versions
        return
    with get_engine(db_url).connect() as connection:
        off = connection.execute(text("SELECT current_setting('autovacuum')")).scalar() == "off"
    assert warned == off, result.stderr
    if warned:
        assert "outbox_message, redemption, shipment_request" in result.stderr and "VACUUM" in result.stderr


def test_answers_holding_what_no_column_stores_are_malformed_or_cleaned_never_a_failed_pass(
    db_url, credex, shop, rabbit
):
    """Postgres refuses NUL in text and no driver encodes a lone surrogate: an answer carrying one
    where an id goes is dropped as malformed, and a reason is kept cleaned, so no such message
    can fail the relay's pass (and come back to fail it again)."""
    first, second, third = shop(3)
    relay_once(credex)
    rabbit.publish("shipment.requested", confirmation(first, "SIM0000000001"), correlation_id="m\x00id")
    rabbit.publish(
        "shipment.requested", confirmation(first, "SIM\x00001") | {"message_id": first["message_id"]}
    )
    rabbit.publish(
        "shipment.requested",
        confirmation(second, "SIM0000000002") | {"carrier": "sand\x00box"},
        correlation_id=second["message_id"],
    )
    rabbit.publish(
        "shipment.failed",
        {
            "message_id": third["message_id"],
            "redemption_id": third["redemption_id"],
            "reason": "no\x00 \ud800road",
        },
        correlation_id=third["message_id"],
        type="shipment.failed",
    )
    report = relay_once(credex)
    # recorded: the second's confirmation and the third's failure; dropped: the first's two
    assert (report["confirmed"], report["malformed_confirmations"]) == (2, 2), report
    shown = {
        r["redemption_id"]: r
        for r in (
            credex("redeem", "show", str(n["redemption_id"]), "--json").json() for n in (first, second, third)
        )
    }
    assert shown[first["redemption_id"]]["status"] == "pending"
    assert (shown[second["redemption_id"]]["status"], shown[second["redemption_id"]]["express_no"]) == (
        "shipping",
        "SIM0000000002",
    )
    assert shown[second["redemption_id"]]["carrier"] is None  # the waybill stands without the carrier's name
    failed = shown[third["redemption_id"]]
    assert failed["status"] == "exception"
    (detail,) = [e["detail"] for e in failed["events"] if e["status"] == "exception"]
    assert "no" in detail and "road" in detail and "\x00" not in detail and "\ud800" not in detail
    assert rabbit.count(rabbit.names.confirmations_queue) == 0


def test_one_pass_publishes_each_due_message_once_as_the_contract_says(credex, shop, rabbit):
    created = shop(3)
    report = relay_once(credex)
    assert (report["published"], report["failed"]) == (3, 0)

    delivered = rabbit.take(rabbit.names.warehouse_queue)
    assert [body["redemption_id"] for _, body in delivered] == [r["redemption_id"] for r in created]
    properties, body = delivered[0]
    assert properties.message_id == created[0]["message_id"] == body["message_id"]
    assert properties.delivery_mode == 2 and properties.content_type == "application/json"
    assert properties.type == "redemption.created" and properties.timestamp > 0
    assert set(body) == {
        "message_id",
        "redemption_id",
        "user_id",
        "sku",
        "quantity",
        "points",
        "address",
        "created_at",
    }
    assert all(m["state"] == "sent" and m["attempts"] == 1 for m in credex("relay", "list", "--json").json())

    # Overlapping cron runs: nothing is due again until the warehouse had time to confirm.
    assert relay_once(credex)["published"] == 0
    assert rabbit.count(rabbit.names.warehouse_queue) == 0


def test_confirmations_waiting_are_recorded_and_a_repeat_changes_nothing(db_url, credex, shop, rabbit):
    first, second = shop(2)
    relay_once(credex)
    rabbit.publish(
        "shipment.requested", confirmation(first, "SIM0000000001"), correlation_id=first["message_id"]
    )
    rabbit.publish("shipment.requested", confirmation(first, "SIM0000000001"))  # again, body only
    rabbit.publish("shipment.requested", b"not json")
    rabbit.publish(
        "shipment.requested", b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    )  # deeper than the parser goes

    report = relay_once(credex)
    assert (report["confirmed"], report["repeated_confirmations"], report["malformed_confirmations"]) == (
        1,
        1,
        2,
    )
    shown = credex("redeem", "show", str(first["redemption_id"]), "--json").json()
    assert (shown["status"], shown["carrier"], shown["express_no"]) == (
        "shipping",
        "sandbox",
        "SIM0000000001",
    )
    assert credex("redeem", "show", str(second["redemption_id"]), "--json").json()["status"] == "pending"
    assert rabbit.count(rabbit.names.confirmations_queue) == 0  # all acked, the malformed one too
    status = credex("relay", "status", "--json").json()
    assert (status["confirmed"], status["sent"]) == (1, 1)
    check_points_invariants(db_url)


def test_an_unroutable_publish_is_reported_as_a_failure_not_as_sent(rabbit):
    from credex.amqp.broker import Broker
    from credex.amqp.confirms import Outgoing

    broker = Broker(
        rabbit.url,
        rabbit.names.topology(),
        consume=rabbit.names.confirmations_queue,
        prefetch=10,
        connection_name="test",
    )
    broker.open()
    try:
        outcomes = broker.publish(
            [
                Outgoing("m-routed", "redemption.created", b"{}", "redemption.created"),
                Outgoing("m-lost", "no.such.route", b"{}", "redemption.created"),
            ]
        )
    finally:
        broker.close()
    assert outcomes["m-routed"] is None
    assert outcomes["m-lost"].startswith("unroutable: 312 NO_ROUTE")
    assert rabbit.count(rabbit.names.warehouse_queue) == 1


@pytest.fixture
def full_warehouse_queue(rabbit):
    """A full queue beside the warehouse's, bound to the same key, that refuses every message: the
    broker nacks a publish when any queue it routes to rejects it."""
    names = rabbit.names
    rabbit.channel.exchange_declare(names.exchange, "topic", durable=True)
    full = f"{rabbit.prefix}test.full"
    rabbit.channel.queue_declare(full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    rabbit.channel.queue_bind(full, names.exchange, routing_key="redemption.created")
    yield
    rabbit.channel.queue_delete(full)


def test_a_nacked_publish_is_a_failed_attempt_and_past_max_attempts_the_message_is_dead(
    credex, shop, rabbit, full_warehouse_queue
):
    shop(2)
    report = relay_once(credex, "--max-attempts", "2")
    assert (report["published"], report["failed"], report["dead"]) == (0, 2, 0)
    listed = credex("relay", "list", "--json").json()
    assert {(m["state"], m["attempts"], m["last_error"]) for m in listed} == {
        ("pending", 1, "nacked by the broker")
    }

    credex("relay", "retry", *[m["message_id"] for m in listed])  # due now, rather than in a second
    report = relay_once(credex, "--max-attempts", "2")
    assert (report["failed"], report["dead"]) == (2, 2)
    assert credex("relay", "status", "--json").json()["dead"] == 2
    dead = credex("relay", "list", "--state", "dead", "--json").json()
    assert {(m["attempts"], m["last_error"]) for m in dead} == {(2, "nacked by the broker")}
    assert relay_once(credex, "--max-attempts", "2")["published"] == 0  # parked until an operator acts


def test_a_broker_that_cannot_be_reached_exits_69_without_showing_its_password(db_url, shop):
    env = subprocess_env(
        CREDEX_DATABASE_URL=db_url,
        CREDEX_AMQP_URL="amqp://guest:s3cret-Pw@127.0.0.1:1/%2F",
        CREDEX_LOGISTICS_URL="http://127.0.0.1:1",
    )
    for command in (("relay", "run", "--once"), ("relay", "run"), ("warehouse", "run", "--once")):
        started = time.monotonic()
        result = run_process(*command, env=env, timeout=60)
        assert result.exit_code == 69, (command, result.stderr)
        assert time.monotonic() - started < 15
        assert "cannot reach the broker amqp://guest@127.0.0.1:1/" in result.stderr
        assert "s3cret" not in result.stderr + result.stdout
    assert all(
        m["state"] == "pending" for m in json.loads(run_process("relay", "list", "--json", env=env).stdout)
    )


def _relay_process(db_url: str, rabbit, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        credex_command("relay", "run", "--json", *options),
        env=subprocess_env(CREDEX_DATABASE_URL=db_url, **rabbit.env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_an_unconfirmed_message_is_published_again_until_the_warehouse_confirms(db_url, credex, shop, rabbit):
    (redemption,) = shop(1)
    relay = _relay_process(db_url, rabbit, "--confirm-timeout", "0.3", "--poll-interval", "0.05")
    try:
        queue = rabbit.names.warehouse_queue
        wait_for(lambda: rabbit.count(queue) >= 3, timeout=30, what="three publishes of the message")
        delivered = rabbit.take(queue)
        assert {body["message_id"] for _, body in delivered} == {redemption["message_id"]}
        message = credex("relay", "list", "--json").json()[0]
        assert message["attempts"] >= 3
        assert message["last_error"] == "not confirmed by its due time: published again"

        rabbit.publish(
            "shipment.requested", confirmation(redemption, "SIM7"), correlation_id=redemption["message_id"]
        )
        wait_for(
            lambda: credex("relay", "status", "--json").json()["confirmed"] == 1,
            timeout=30,
            what="the confirmation",
        )
        rabbit.take(queue)
        # A second redemption, left unconfirmed, is published again and again meanwhile; the
        # confirmed one never comes back.
        (later,) = shop(1)
        wait_for(lambda: rabbit.count(queue) >= 3, timeout=30, what="three publishes of the second message")
        assert {body["message_id"] for _, body in rabbit.take(queue)} == {later["message_id"]}
    finally:
        relay.send_signal(signal.SIGTERM)
        out, err = relay.communicate(timeout=30)
    assert relay.returncode == 0, err
    assert json.loads(out)["confirmed"] == 1
    shown = credex("redeem", "show", str(redemption["redemption_id"]), "--json").json()
    assert shown["express_no"] == "SIM7"


def test_the_long_running_relay_reconnects_after_its_connection_is_closed(db_url, credex, shop, rabbit):
    relay = _relay_process(db_url, rabbit, "--poll-interval", "0.05")
    try:
        shop(1)
        queue = rabbit.names.warehouse_queue
        wait_for(lambda: rabbit.count(queue) == 1, timeout=30, what="the first message")
        closed = close_connections(f":{relay.pid}:")
        assert closed >= 1
        shop(1)
        wait_for(lambda: rabbit.count(queue) == 2, timeout=60, what="a message published after the reconnect")
    finally:
        relay.send_signal(signal.SIGTERM)
        out, err = relay.communicate(timeout=30)
    assert relay.returncode == 0, err
    assert json.loads(out)["reconnects"] >= 1
    assert "reconnected to the broker" in err
    assert all(m["state"] == "sent" for m in credex("relay", "list", "--json").json())


def close_connections(needle: str) -> int:
    """Close, from the broker's side, the connections whose name contains ``needle``."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    pids = [
        line.split("\t", 1)[0]
        for line in listed.splitlines()
        if '"connection_name"' in line and needle in line
    ]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "test: cut the connection"],
            capture_output=True,
            timeout=60,
        )
    return len(pids)


def test_sigterm_lets_the_relay_finish_the_batches_in_hand_and_leave_no_claim_behind(db_url, credex, rabbit):
    from sqlalchemy import text

    from credex.db.engine import get_engine, session_for
    from credex.points.awards import award_grant
    from credex.points.catalog import add_item
    from credex.points.redemptions import redeem

    with session_for(db_url, write=True) as session:
        add_item(session, "PIN", name="Pin", points=1, stock=None)
    with session_for(db_url, write=True) as session:
        award_grant(session, "u1", 100_000, reason="opening", ref="open-u1", operator="tester")
    for n in range(1500):
        with session_for(db_url, write=True) as session:
            redeem(session, "u1", "PIN", address=f"{n} High St", operator="tester")

    relay = _relay_process(db_url, rabbit, "--batch-size", "10", "--poll-interval", "0.05")
    wait_for(
        lambda: rabbit.count(rabbit.names.warehouse_queue) >= 50, timeout=60, what="publishing under way"
    )
    relay.send_signal(signal.SIGTERM)
    out, err = relay.communicate(timeout=60)
    assert relay.returncode == 0, err
    report = json.loads(out)

    with get_engine(db_url).connect() as connection:
        states = dict(
            connection.execute(text("SELECT state, count(*) FROM outbox_message GROUP BY state")).all()
        )
        claimed = connection.execute(
            text("SELECT count(*) FROM outbox_message WHERE claimed_by IS NOT NULL")
        ).scalar()
    assert claimed == 0, "a batch was left claimed"
    assert states.get("sent", 0) == report["published"] > 0
    assert states.get("sent", 0) + states.get("pending", 0) == 1500
    wait_for(
        lambda: rabbit.count(rabbit.names.warehouse_queue) == report["published"], timeout=10, what="queue"
    )


def test_confirmations_taken_while_the_database_is_away_are_recorded_once_it_is_back(
    db_url, backend, credex, shop, rabbit, tmp_path
):
    """Confirmations in hand when the database goes away are kept, not dropped unacked: the
    running relay records them once the database answers, without reconnecting to the broker."""
    from sqlalchemy.engine import make_url

    from credex.db.engine import dispose_engines
    from tests.support import pg_admin

    if backend != "postgres":
        pytest.skip("a database server that can refuse connections for a while")
    created = shop(2)
    log_path = tmp_path / "relay.log"
    with open(log_path, "w") as log:
        relay = subprocess.Popen(
            credex_command("relay", "run", "--json", "--poll-interval", "0.05"),
            env=subprocess_env(CREDEX_DATABASE_URL=db_url, **rabbit.env),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    database = make_url(db_url).database
    try:
        wait_for(lambda: rabbit.count(rabbit.names.warehouse_queue) == 2, timeout=60, what="publishing")
        with pg_admin() as admin:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,)
            )
        try:
            for n, redemption in enumerate(created, start=1):
                rabbit.publish(
                    "shipment.requested",
                    confirmation(redemption, f"SIM{n}"),
                    correlation_id=redemption["message_id"],
                )
            wait_for(lambda: "trying again" in log_path.read_text(), timeout=30, what="the database to fail")
        finally:
            with pg_admin() as admin:
                admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            # This process's pooled connections were cut too; `relay status` reads on a
            # connection of its own, so nothing here would notice before the invariants do.
            dispose_engines()

        def confirmed() -> int:
            status = credex("relay", "status", "--json")
            return status.json()["confirmed"] if status.exit_code == 0 else -1

        wait_for(lambda: confirmed() == 2, timeout=60, what="the confirmations recorded")
        assert rabbit.count(rabbit.names.confirmations_queue) == 0
    finally:
        relay.send_signal(signal.SIGTERM)
        out, _ = relay.communicate(timeout=60)
    assert relay.returncode == 0, log_path.read_text()
    report = json.loads(out)
    assert (report["confirmed"], report["reconnects"]) == (2, 0)
