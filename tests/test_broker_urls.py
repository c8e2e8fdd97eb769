"""Several broker URLs (the nodes of a cluster, comma-separated) and queues left by an older
version, against the real broker on loopback. The three-node cluster itself is in
tests/test_rabbitmq_cluster.py."""

from __future__ import annotations

import json
import socket

import pika
import pika.exceptions
import pytest

from credex.amqp.params import display_amqp_url, split_urls
from tests.support import run_process, subprocess_env

pytestmark = pytest.mark.rabbitmq


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released: connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_several_urls_are_split_and_shown_without_any_password() -> None:
    urls = "amqp://ops:s3cret@10.0.0.1:5672/%2F, amqp://ops:s3cret@10.0.0.2:5672/shop,"
    assert split_urls(urls) == ["amqp://ops:s3cret@10.0.0.1:5672/%2F", "amqp://ops:s3cret@10.0.0.2:5672/shop"]
    shown = display_amqp_url(urls)
    assert shown == "amqp://ops@10.0.0.1:5672/%2F,amqp://ops@10.0.0.2:5672/shop"
    assert "s3cret" not in shown


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:hunter2pw@rabbit\t-1:5672/%2F",  # pika dropped the tab: another host
        "amqp://gu\x00est:hunter2pw@127.0.0.1:5672/%2F",  # kept in the user name
        "amqp://guest:hunter2pw@127.0.0.1:5672/shop\x7f",  # kept in the virtual host
        "amqp://127.0.0.1:5672/%2F,amqp://rabbit\n-2:5672/%2F",
    ],
    ids=["tab-in-host", "nul-in-user", "del-in-vhost", "in-the-second-node"],
)
def test_a_broker_url_holding_a_control_character_is_bad_configuration(url) -> None:
    from credex.errors import InvalidInput

    with pytest.raises(InvalidInput) as refused:
        split_urls(url)
    message = refused.value.message
    assert "must be printable text" in message and "hunter2pw" not in message
    assert message.isprintable()


@pytest.fixture
def shop(credex):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10")
    credex("award", "grant", "u1", "1000", "--reason", "opening", "--ref", "open-u1")
    return lambda n: [
        credex("redeem", "create", "u1", "MUG", "--address", f"{i} High St", "--json").json()
        for i in range(n)
    ]


def test_the_relay_connects_to_the_first_node_that_answers(db_url, credex, shop, rabbit) -> None:
    created = shop(2)
    dead = f"amqp://guest:guest@127.0.0.1:{closed_port()}/%2F"
    env = subprocess_env(
        CREDEX_DATABASE_URL=db_url, CREDEX_AMQP_URL=f"{dead},{rabbit.url}", CREDEX_AMQP_PREFIX=rabbit.prefix
    )
    done = run_process("relay", "run", "--once", "--json", env=env, timeout=60)
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["published"] == 2
    delivered = rabbit.take(rabbit.names.warehouse_queue)
    assert sorted(body["redemption_id"] for _, body in delivered) == sorted(
        r["redemption_id"] for r in created
    )
    assert credex("relay", "status", "--json").json()["sent"] == 2


def test_when_no_node_answers_the_relay_exits_69_naming_each_without_its_password(db_url, shop) -> None:
    shop(1)
    ports = [closed_port(), closed_port()]
    urls = ",".join(f"amqp://guest:hunter2pw@127.0.0.1:{port}/%2F" for port in ports)
    env = subprocess_env(CREDEX_DATABASE_URL=db_url, CREDEX_AMQP_URL=urls, CREDEX_AMQP_PREFIX="t-nowhere.")
    done = run_process("relay", "run", "--once", "--json", env=env, timeout=60)
    assert done.exit_code == 69, done.stderr
    error = json.loads(done.stderr.strip().splitlines()[-1])["error"]
    assert error["code"] == "unavailable"
    assert all(f"127.0.0.1:{port}" in error["message"] for port in ports)
    assert "hunter2pw" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("rabbit.internal", "is not an AMQP URL"),
        ("http://guest:hunter2pw@127.0.0.1:15672/", "is not an AMQP URL"),
        ("amqp://guest:hunter2pw@127.0.0.1:5672/%2F?heartbeat=soon", "Invalid heartbeat value"),
        ("amqp://guest:hunter2pw@127.0.0.1:5672/%2F,rabbit-2", "'rabbit-2' is not an AMQP URL"),
        ("amqp://guest:hunter2pw@127.0.0.1\t:5672/%2F", "must be printable text"),
    ],
    ids=["no-scheme", "http", "bad-option", "one-node-of-two", "control-character"],
)
@pytest.mark.parametrize("worker", ["relay", "warehouse"])
def test_a_broker_url_that_is_not_one_is_bad_configuration_before_anything_connects(
    db_url, worker, url, words
) -> None:
    """Exit 2 at once, not 69: a long-running worker would otherwise retry it as a broker away."""
    env = subprocess_env(
        CREDEX_DATABASE_URL=db_url, CREDEX_AMQP_URL=url, CREDEX_LOGISTICS_URL="http://127.0.0.1:9"
    )
    done = run_process(worker, "run", "--json", env=env, timeout=60)  # long-running: it must not wait
    assert done.exit_code == 2, done.stderr
    error = json.loads(done.stderr.strip().splitlines()[-1])["error"]
    assert error["code"] == "invalid_input" and words in error["message"]
    assert "hunter2pw" not in done.stderr + done.stdout


@pytest.mark.parametrize("worker", ["relay", "warehouse"])
@pytest.mark.parametrize(
    ("prefix", "words"),
    [
        ("p" * 228, "longer than 227 characters"),  # with the longest queue name: 256 bytes
        ("\u00fc" * 114, "longer than 227 bytes"),  # 114 characters, 228 bytes
        ("amq.shop.", "must not begin with 'amq.'"),
        ("shop\x1b[2J.", "control character"),
    ],
    ids=["too-long", "too-many-bytes", "reserved", "control"],
)
def test_a_prefix_the_broker_would_refuse_is_bad_configuration_before_anything_connects(
    tmp_path, rabbit, worker, prefix, words
) -> None:
    """Exit 2 at once, naming the setting: a prefix whose names the broker refuses was exit 70
    (too long for an AMQP name) or, reserved by the broker, retried for ever as a broker error.
    The check comes before any database work: one backend is enough."""
    env = subprocess_env(
        CREDEX_DATABASE_URL=f"sqlite:///{tmp_path / 'shop.db'}",
        CREDEX_AMQP_URL=rabbit.url,  # a broker that answers: nothing may be declared on it
        CREDEX_AMQP_PREFIX=prefix,
        CREDEX_LOGISTICS_URL="http://127.0.0.1:9",
    )
    done = run_process(worker, "run", "--json", env=env, timeout=60)  # long-running: it must not wait
    assert done.exit_code == 2, done.stderr
    error = json.loads(done.stderr.strip().splitlines()[-1])["error"]
    assert error["code"] == "invalid_input", error
    assert error["message"].startswith("CREDEX_AMQP_PREFIX") and words in error["message"], error
    assert "connected" not in done.stderr


def test_spaces_around_the_prefix_are_dropped(db_url, credex, shop, rabbit) -> None:
    shop(1)
    env = subprocess_env(
        CREDEX_DATABASE_URL=db_url, CREDEX_AMQP_URL=rabbit.url, CREDEX_AMQP_PREFIX=f"  {rabbit.prefix} "
    )
    done = run_process("relay", "run", "--once", "--json", env=env, timeout=60)
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["published"] == 1
    assert len(rabbit.take(rabbit.names.warehouse_queue)) == 1


def test_a_tls_broker_url_is_shown_as_amqps_and_showing_a_bad_one_never_fails() -> None:
    shown = display_amqp_url("amqps://ops:s3cret@mq.example:5671/shop")
    assert shown == "amqps://ops@mq.example:5671/shop"
    shown = display_amqp_url("amqp://ops:s3cret@10.0.0.1:5672/%2F,rabbit-2,http://ops:s3cret@10.0.0.3/")
    assert shown.startswith("amqp://ops@10.0.0.1:5672/%2F,rabbit-2,http://") and "s3cret" not in shown


@pytest.mark.parametrize("worker", ["relay", "warehouse"])
def test_a_classic_queue_left_by_an_older_version_is_refused_with_the_fix(
    db_url, shop, rabbit, worker
) -> None:
    shop(1)
    old = rabbit.names.confirmations_queue
    rabbit.channel.queue_declare(old, durable=True)  # classic, as credex declared it before
    # the carrier is never called: the worker stops before it consumes anything
    env = subprocess_env(CREDEX_DATABASE_URL=db_url, CREDEX_LOGISTICS_URL="http://127.0.0.1:9", **rabbit.env)
    done = run_process(worker, "run", "--once", "--json", env=env, timeout=60)

    assert done.exit_code == 1, done.stderr
    error = json.loads(done.stderr.strip().splitlines()[-1])["error"]
    assert error["code"] == "queue_type_mismatch"
    assert old in error["message"] and f"rabbitmqctl delete_queue {old}" in error["message"]
    # The queue is left as it was: still there, still classic.
    assert rabbit.channel.queue_declare(old, passive=True).method.queue == old
    with (
        pika.BlockingConnection(pika.URLParameters(rabbit.url)) as connection,
        pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused,
    ):
        connection.channel().queue_declare(old, durable=True, arguments={"x-queue-type": "quorum"})
    assert refused.value.reply_code == 406, "it is still a classic queue"
