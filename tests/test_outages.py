"""The workers through the outages a deployment meets: the database away again and again while
redemptions flow, the carrier unreachable for a while, the broker's service killed and started
again. The relay and the warehouse ride each one out by themselves (no restart), commands run
during a database outage exit 69 quickly without showing a password, and at the end every
redemption is shipped exactly once and every rule of domain.md holds.

The database outage is real on a server shared with other tests: the test's own database stops
accepting connections and every connection to it is terminated (what a restart does to its
clients: 57P01 and refused connections, stale connections in the pools), for OUTAGE_SECONDS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from sqlalchemy.engine import make_url

from tests.netfaults import FaultyProxy
from tests.pipeline import Pipeline, check_shipped_exactly_once
from tests.sandbox import running_sandbox
from tests.support import credex_command, pg_admin, subprocess_env, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

# Long enough for the workers' reconnect backoff (0.5 s doubling) to fail three times or more in
# each outage and for the relay to publish a waiting message again during the carrier's (its
# confirm timeout is 2 s, then 4 s, at most 5 s); longer ones only wait longer. Set them higher to
# soak: CREDEX_TEST_OUTAGE_SECONDS=30 CREDEX_TEST_CARRIER_OUTAGE_SECONDS=60.
OUTAGE_SECONDS = float(os.environ.get("CREDEX_TEST_OUTAGE_SECONDS", "4"))
CARRIER_OUTAGE_SECONDS = float(os.environ.get("CREDEX_TEST_CARRIER_OUTAGE_SECONDS", "10"))


@pytest.fixture
def shop(credex):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "1000")
    credex("award", "grant", "u1", "100000", "--reason", "opening", "--ref", "open-u1")

    def redeem(n: int) -> None:
        for i in range(n):
            result = credex("redeem", "create", "u1", "MUG", "--address", f"{i} High St", "--json")
            assert result.exit_code == 0, result.stderr

    return redeem


def database_away(database: str):
    """The database refuses new connections and loses the ones it had, until the returned
    function is called."""
    with pg_admin() as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,)
        )

    def back() -> None:
        from credex.db.engine import dispose_engines

        with pg_admin() as admin:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        # The test's own in-process commands stand for command-line runs, each a new process with
        # no pool: drop the connections the outage killed. The workers keep theirs and must cope.
        dispose_engines()

    return back


@pytest.mark.timeout(600)
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_the_workers_ride_out_the_database_going_away_five_times_mid_flow(
    db_url, credex, shop, rabbit, tmp_path
) -> None:
    database = make_url(db_url).database
    secret_url = make_url(db_url).set(password="pw-never-shown").render_as_string(hide_password=False)
    with running_sandbox() as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            relay, warehouse = pipeline.relay(), pipeline.warehouse()
            pipeline.wait_ready(relay)
            pipeline.wait_ready(warehouse)
            created = 0
            for outage in range(5):
                shop(4)
                created += 4
                # mid-flow: the work of this round is under way, not necessarily done
                wait_for(lambda c=created: pipeline.confirmed() >= c - 4, timeout=120, what="work under way")
                back = database_away(database)
                try:
                    started = time.monotonic()
                    during = subprocess.run(
                        credex_command("account", "show", "u1", "--json"),
                        env=subprocess_env(CREDEX_DATABASE_URL=secret_url),
                        capture_output=True,
                        text=True,
                        timeout=60,
                    )
                    took = time.monotonic() - started
                    assert during.returncode == 69, during.stderr
                    assert took < 10, f"a command during an outage took {took:.1f} s"
                    assert "pw-never-shown" not in during.stdout + during.stderr
                    time.sleep(max(0.0, OUTAGE_SECONDS - took))  # the outage itself
                finally:
                    back()
                assert relay.poll() is None and warehouse.poll() is None, (
                    f"a worker died in outage {outage + 1}"
                )
            pipeline.wait_all_confirmed(created, timeout=180)
            assert rabbit.count(rabbit.names.warehouse_queue) == 0
            for worker in (relay, warehouse):
                log = pipeline.log(worker)
                assert "trying again" in log, log  # it did meet the outages
            exits = [pipeline.stop(relay)[0], pipeline.stop(warehouse)[0]]
            assert exits == [0, 0], [pipeline.log(relay), pipeline.log(warehouse)]
            check_shipped_exactly_once(pipeline, created)
        finally:
            with pg_admin() as admin:
                admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            pipeline.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the carrier's side; one backend is enough
def test_the_warehouse_rides_out_the_carrier_unreachable_for_a_while(db_url, credex, shop, rabbit, tmp_path):
    with running_sandbox() as sandbox, FaultyProxy("127.0.0.1", int(sandbox.url.rsplit(":", 1)[1])) as proxy:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        pipeline.env["CREDEX_LOGISTICS_URL"] = f"http://127.0.0.1:{proxy.port}"
        try:
            relay = pipeline.relay("--confirm-timeout", "2", "--max-confirm-timeout", "5")
            warehouse = pipeline.warehouse()
            shop(3)
            pipeline.wait_all_confirmed(3)
            proxy.cut()
            try:
                shop(4)
                wait_for(lambda: proxy.refused > 0, timeout=60, what="the warehouse to meet the outage")
                time.sleep(CARRIER_OUTAGE_SECONDS)  # the outage itself
                assert pipeline.confirmed() == 3, "nothing ships while the carrier is away"
            finally:
                proxy.restore()
            pipeline.wait_all_confirmed(7, timeout=180)
            assert relay.poll() is None and warehouse.poll() is None
            exits = [pipeline.stop(relay)[0], pipeline.stop(warehouse)[0]]
            assert exits == [0, 0], [pipeline.log(relay), pipeline.log(warehouse)]
            check_shipped_exactly_once(pipeline, 7)
        finally:
            pipeline.close()


def rabbitmqctl(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr}"
    return done.stdout


def start_the_broker_again() -> None:
    """``rabbitmq-server -detached`` returns before the node answers: wait until it does (a
    deadline, not a sleep), then until it has started its applications."""
    subprocess.run(["rabbitmq-server", "-detached"], capture_output=True, timeout=60)

    def answers() -> bool:
        pinged = subprocess.run(
            ["rabbitmq-diagnostics", "-q", "ping"], capture_output=True, text=True, timeout=60
        )
        return pinged.returncode == 0

    wait_for(answers, timeout=180, interval=1, what="the broker's node to answer")
    rabbitmqctl("await_startup", timeout=180)
    wait_for(lambda: port_open(5672), timeout=60, what="the broker's AMQP port")


def port_open(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def broker_to_ourselves():
    """The shared broker, with no other test of this run using it (they wait on the lock)."""
    from tests.conftest import broker_lock, check_broker

    with broker_lock(exclusive=True):
        yield check_broker()


@pytest.mark.broker_restart
@pytest.mark.timeout(600)
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_the_workers_ride_out_the_broker_stopped_then_killed_and_started_again(
    db_url, credex, shop, broker_to_ourselves, tmp_path
) -> None:
    """Both in one turn with the broker to ourselves (every other broker test waits meanwhile):
    `rabbitmqctl stop_app` / `start_app`, then the broker's service killed and started again."""
    from tests.conftest import Rabbit

    prefix = f"t{tmp_path.name[-8:]}{int(time.time() * 1000) % 100000}."
    rabbit = Rabbit(broker_to_ourselves, prefix)
    rabbit.close()  # only its names and URL: the kill would cut its connection
    with running_sandbox() as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            relay = pipeline.relay("--confirm-timeout", "2", "--max-confirm-timeout", "4")
            warehouse = pipeline.warehouse()
            shop(5)
            pipeline.wait_all_confirmed(5)
            stopped = False
            try:
                rabbitmqctl("stop_app")
                stopped = True
                shop(5)  # shoppers go on while the broker is away: the outbox keeps their messages
                time.sleep(3)  # the outage itself, short: the other tests wait for the broker
            finally:
                rabbitmqctl("start_app")
                rabbitmqctl("await_startup")
            assert stopped
            pipeline.wait_all_confirmed(10, timeout=180)
            for worker in (relay, warehouse):
                log = pipeline.log(worker)
                assert "cannot reach the broker" in log and "reconnected to the broker" in log, log

            pid = int(rabbitmqctl("-q", "eval", "list_to_integer(os:getpid()).").strip())
            restarted = False
            try:
                # The broker's VM is killed (SIGTERM: it stops at once, every connection dropped).
                # Not SIGKILL: a single node's quorum queue declared less than a few minutes before
                # a SIGKILL can come back with an empty Raft log and no leader (RabbitMQ 3.10 keeps
                # the queue's registration in a table it saves every few minutes); a cluster's other
                # members keep it, which tests/test_rabbitmq_cluster.py shows with SIGKILL.
                os.kill(pid, signal.SIGTERM)
                wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=30, what="the broker to die")
                shoppers = threading.Thread(target=shop, args=(5,))  # they go on: the outbox keeps it
                shoppers.start()
                shoppers.join(timeout=60)
                assert not shoppers.is_alive()
            finally:
                start_the_broker_again()
                restarted = True
            assert restarted
            pipeline.wait_all_confirmed(15, timeout=240)
            assert relay.poll() is None and warehouse.poll() is None, "no worker needed a restart"
            (relay_exit, relay_out), (warehouse_exit, warehouse_out) = (
                pipeline.stop(relay),
                pipeline.stop(warehouse),
            )
            assert (relay_exit, warehouse_exit) == (0, 0), [pipeline.log(relay), pipeline.log(warehouse)]
            for out in (relay_out, warehouse_out):
                assert json.loads(out)["reconnects"] >= 2  # once per outage
            check_shipped_exactly_once(pipeline, 15)
        finally:
            pipeline.close()
            delete_names(broker_to_ourselves, rabbit.names)


def delete_names(url: str, names) -> None:
    """The test's exchange and queues off the shared broker (best effort: names are unique)."""
    import contextlib

    import pika

    with contextlib.suppress(Exception):
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        for queue in (names.warehouse_queue, names.confirmations_queue):
            channel.queue_delete(queue)
        channel.exchange_delete(names.exchange)
        connection.close()
