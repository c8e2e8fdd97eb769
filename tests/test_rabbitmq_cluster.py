"""scripts/rabbitmq-cluster.sh: three real RabbitMQ nodes on loopback, and what a quorum queue
does on them when the node leading it is killed (with pika alone), then credex's relays and
warehouses on the cluster while a node dies.

Skipped when RabbitMQ is not installed, except under CI=true, where that is a failure. The
cluster gets its own directory, node names and free ports, so it neither meets the default node
nor a cluster someone started with the script's defaults; one cluster serves the whole run, one
test at a time, and is stopped (its data removed) after the last test that uses it
(tests/rabbitmq_cluster.py).
"""

from __future__ import annotations

import collections
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest

from tests.rabbitmq_cluster import Cluster, run_id, shared_cluster
from tests.support import CI, wait_for

# The cluster is one for the whole run (tests/rabbitmq_cluster.py): a test may wait for another
# worker's to finish with it before its own time starts.
pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.timeout(600)]

RABBITMQ_INSTALLED = bool(shutil.which("rabbitmq-server")) or Path("/usr/sbin/rabbitmq-server").exists()
NODES = (1, 2, 3)
MESSAGES = 200


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if not RABBITMQ_INSTALLED:
        message = "RabbitMQ is not installed (rabbitmq-server not found)"
        if CI:
            pytest.fail(message + " (CI=true: a missing service is a failure)", pytrace=False)
        pytest.skip(message)
    users = sum(1 for item in request.session.items if "cluster" in getattr(item, "fixturenames", ()))
    with shared_cluster(users, run_id()) as cluster:
        yield cluster


def test_a_quorum_queue_keeps_every_message_when_its_leader_is_killed(cluster: Cluster) -> None:
    queue = f"cluster-test.{uuid.uuid4().hex[:8]}"
    with cluster.connect(1) as connection:
        connection.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    leader = wait_for(lambda: cluster.leader(queue), timeout=30, interval=0.5, what="a leader")
    publisher, consumer = (node for node in NODES if node != leader)

    # 200 persistent messages through a node that does not lead the queue, each confirmed.
    bodies = [f"message {n}".encode() for n in range(MESSAGES)]
    publishing = time.monotonic()
    with cluster.connect(publisher) as connection:
        channel = connection.channel()
        channel.confirm_delivery()  # basic_publish now waits for the broker's ack, raises on a nack
        for n, body in enumerate(bodies):
            channel.basic_publish(
                "",
                queue,
                body,
                pika.BasicProperties(delivery_mode=2, message_id=str(n)),
                mandatory=True,
            )

    cluster.timings["publish 200"] = time.monotonic() - publishing

    # The leader's VM dies; the two others elect a new leader among themselves.
    killed = time.monotonic()
    cluster.check("kill", str(leader), timeout=60)
    new_leader = wait_for(
        lambda: (found := cluster.leader(queue)) not in (None, leader) and found,
        timeout=30,
        interval=0.2,
        what="a new leader",
    )
    cluster.timings["kill to new leader"] = time.monotonic() - killed
    assert new_leader in (publisher, consumer)

    # Everything is still there, through a surviving node.
    received: list[bytes] = []
    consuming = time.monotonic()
    with cluster.connect(consumer) as connection:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=50)
        for method, _properties, body in channel.consume(queue, inactivity_timeout=15):
            if method is None:
                break
            received.append(body)
            channel.basic_ack(method.delivery_tag)
            if len(received) == MESSAGES:
                break
        channel.cancel()
        assert channel.queue_declare(queue, passive=True).method.message_count == 0
    cluster.timings["consume 200"] = time.monotonic() - consuming
    assert collections.Counter(received) == collections.Counter(bodies)  # nothing lost, nothing twice

    # The killed node comes back and is a member again, of the cluster and of the queue.
    restarted = time.monotonic()
    cluster.check("start-node", str(leader))
    cluster.timings["start-node"] = time.monotonic() - restarted
    killed_name = f"{cluster.env['CREDEX_CLUSTER_PREFIX']}{leader}@localhost"

    def back() -> bool:
        status = cluster.run("status", timeout=60)
        lines = status.stdout.splitlines()
        running = [line.split() for line in lines if line.strip().startswith("running:")]
        online = [line.split("\t")[-1] for line in lines if f"\t{queue}\t" in line]
        return (
            status.returncode == 0
            and bool(running)
            and killed_name in running[0]
            and bool(online)
            and killed_name in online[0]
        )

    wait_for(back, timeout=30, interval=1, what=f"{killed_name} back in the cluster and the queue")
    cluster.timings["kill to back in cluster"] = time.monotonic() - killed


def refusal(queue: str, difference: str) -> str:
    where = f"for queue '{queue}' in vhost '/'"
    return f"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' {where}: {difference}"


QUORUM = {"x-queue-type": "quorum"}
CLASSIC = {"x-queue-type": "classic"}
QUORUM_VALUE = "the value 'quorum' of type 'longstr'"


@pytest.mark.parametrize(
    ("first", "again", "difference"),
    [
        # credex's confirmations queue as declared so far: classic by default, no argument
        (None, QUORUM, f"received {QUORUM_VALUE} but current is none"),
        # a classic queue declared with the argument: RabbitMQ compares the queue types
        (CLASSIC, QUORUM, "received 'quorum' but current is 'classic'"),
        # an older credex declaring, without the argument, a queue that is quorum by now
        (QUORUM, None, f"received none but current is {QUORUM_VALUE}"),
    ],
    ids=["classic-then-quorum", "explicit-classic-then-quorum", "quorum-then-no-type"],
)
def test_declaring_a_queue_again_with_another_type_is_refused(
    amqp_url: str, first: dict | None, again: dict | None, difference: str
) -> None:
    """What an upgrade to quorum queues meets (credex.amqp.broker.queue_type_mismatch). RabbitMQ
    compares a queue's type when it is declared again on one node as on a cluster: the test's own
    broker serves, and the cluster is left to the tests that kill its nodes."""
    queue = f"cluster-test.type.{uuid.uuid4().hex[:8]}"
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments=first)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.queue_declare(queue, durable=True, arguments=again)
        assert refused.value.reply_code == 406
        assert refused.value.reply_text == refusal(queue, difference)
        # Only the channel is closed; the queue is as it was.
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments=first)
        channel.queue_delete(queue)


# --- credex on the cluster ----------------------------------------------------------------------


class ClusterBroker:
    """What tests.pipeline.Pipeline needs of a broker: the environment that points credex at the
    cluster (every node's URL, first the one a worker should take) under a prefix of its own."""

    def __init__(self, cluster: Cluster) -> None:
        from credex.relay.topology import Names

        self.prefix = f"t{uuid.uuid4().hex[:10]}."
        self.names = Names(self.prefix)
        self.urls = cluster.urls

    @property
    def env(self) -> dict[str, str]:
        return self.env_for(1)

    def env_for(self, node: int) -> dict[str, str]:
        """The URLs starting with ``node``'s, then the others in order."""
        first = node - 1
        ordered = self.urls[first:] + self.urls[:first]
        return {"CREDEX_AMQP_URL": ",".join(ordered), "CREDEX_AMQP_PREFIX": self.prefix}


def node_of(log: str, cluster: Cluster) -> list[int]:
    """The nodes a worker's log says it connected to, in order."""
    ports = {url.rsplit(":", 1)[1].split("/", 1)[0]: n for n, url in enumerate(cluster.urls, 1)}
    found = []
    for line in log.splitlines():
        if " connected to " in line:
            port = line.split(" connected to ", 1)[1].split(":", 2)[2].split("/", 1)[0]
            found.append(ports[port])
    return found


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_credex_ships_everything_once_while_the_node_leading_its_queue_is_killed(
    cluster: Cluster, db_url: str, credex, tmp_path: Path
) -> None:
    from tests.pipeline import Pipeline, check_shipped_exactly_once
    from tests.sandbox import running_sandbox

    broker = ClusterBroker(cluster)
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10")
    credex("award", "grant", "u1", "100000", "--reason", "opening", "--ref", "open-u1")

    def redeem(count: int) -> None:
        for i in range(count):
            result = credex("redeem", "create", "u1", "MUG", "--address", f"{i} High St", "--json")
            assert result.exit_code == 0, result.stderr

    with running_sandbox() as sandbox:
        pipeline = Pipeline(db_url, broker, sandbox, tmp_path)
        try:
            # Two relays and two warehouses, each starting on another node.
            workers = [
                pipeline.relay(env=broker.env_for(1)),
                pipeline.relay(env=broker.env_for(2)),
                pipeline.warehouse(env=broker.env_for(3)),
                pipeline.warehouse(env=broker.env_for(2)),
            ]
            for worker in workers:
                pipeline.wait_ready(worker)
            assert [node_of(pipeline.log(w), cluster)[0] for w in workers] == [1, 2, 3, 2]
            redeem(10)
            pipeline.wait_all_confirmed(10, timeout=120)

            # The node leading the warehouse queue dies (SIGKILL) while redemptions keep coming.
            queue = broker.names.warehouse_queue
            leader = wait_for(lambda: cluster.leader(queue), timeout=60, interval=0.5, what="a leader")
            redeem(5)
            cluster.check("kill", str(leader), timeout=60)
            redeem(10)
            pipeline.wait_all_confirmed(25, timeout=180)

            # It comes back later; the work goes on.
            cluster.check("start-node", str(leader))
            redeem(5)
            pipeline.wait_all_confirmed(30, timeout=180)

            assert all(w.poll() is None for w in workers), "no worker needed a restart"
            moved = [w for w in workers if node_of(pipeline.log(w), cluster)[0] == leader]
            for worker in moved:  # those on the killed node went on through another one
                nodes = node_of(pipeline.log(worker), cluster)
                assert len(nodes) >= 2 and nodes[-1] != leader, pipeline.log(worker)
            exits = [pipeline.stop(worker)[0] for worker in workers]
            assert exits == [0, 0, 0, 0], [pipeline.log(w) for w in workers]
            check_shipped_exactly_once(pipeline, 30)
        finally:
            pipeline.close()
