"""Fixtures: a fresh database per test on SQLite and on Postgres, the CLI, real processes.

With CI=true a test that needs Postgres or RabbitMQ fails when the service is missing;
elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import AMQP_URL, Outcome, pg_admin, pg_url, service_missing

pytest_plugins = ["tests.sandbox"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from credex's defaults, whatever the developer's shell exports."""
    for name in list(os.environ):
        if name.startswith("CREDEX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CREDEX_OPERATOR", "tester")


# --- Postgres -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """A migrated database that every Postgres test copies (CREATE DATABASE … TEMPLATE)."""
    try:
        admin = pg_admin()
    except Exception as error:  # psycopg.OperationalError, but keep the import lazy
        service_missing("PostgreSQL", error)
    name = f"credex_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        from credex.db.engine import dispose_engines, upgrade

        upgrade(pg_url(name))
        dispose_engines()
        yield name
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_postgres_database(template: str) -> tuple[str, Callable[[], None]]:
    name = f"credex_t_{uuid.uuid4().hex[:12]}"
    with pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')

    def drop() -> None:
        from credex.db.engine import dispose_engines

        dispose_engines()
        with pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return pg_url(name), drop


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty points database: SQLite (created on first use) or Postgres (migrated)."""
    from credex.db.engine import dispose_engines

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'credex.db'}"
        dispose_engines()
        return
    template = request.getfixturevalue("postgres_template")
    url, drop = make_postgres_database(template)
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def backend(db_url: str) -> str:
    return "postgres" if db_url.startswith("postgresql") else "sqlite"


# --- running credex ---------------------------------------------------------------------------


@pytest.fixture
def credex(db_url: str) -> Callable[..., Outcome]:
    """Run credex in-process through Typer's CliRunner against the test database."""
    from typer.testing import CliRunner

    from credex.cli import app

    runner = CliRunner()

    def run(*args: object, input: str | None = None, env: dict[str, str] | None = None) -> Outcome:
        result = runner.invoke(
            app, ["--database-url", db_url, *map(str, args)], input=input, env=env, catch_exceptions=False
        )
        return Outcome(result.exit_code, result.stdout, result.stderr)

    return run


# --- RabbitMQ ---------------------------------------------------------------------------------


@pytest.fixture
def amqp_url() -> str:
    """The broker's URL; the test fails (CI) or is skipped when it cannot be reached."""
    import pika

    try:
        connection = pika.BlockingConnection(
            pika.URLParameters(AMQP_URL + "?connection_attempts=1&socket_timeout=5")
        )
        connection.close()
    except Exception as error:
        service_missing("RabbitMQ", type(error).__name__)
    return AMQP_URL


@pytest.fixture
def amqp_prefix(amqp_url: str) -> Iterator[str]:
    """A prefix of our own on the shared broker; its exchanges and queues are deleted afterwards."""
    import pika

    prefix = f"t{uuid.uuid4().hex[:10]}."
    yield prefix
    from credex.relay.topology import Names

    names = Names(prefix)
    try:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = connection.channel()
        for queue in (names.warehouse_queue, names.confirmations_queue):
            channel.queue_delete(queue)
        channel.exchange_delete(names.exchange)
        connection.close()
    except Exception:
        pass  # cleaning up is best effort; the names are unique anyway


class Rabbit:
    """The test's own corner of the broker: its names, and a plain connection to look inside."""

    def __init__(self, url: str, prefix: str) -> None:
        import pika

        from credex.relay.topology import Names

        self.url = url
        self.prefix = prefix
        self.names = Names(prefix)
        self._connection = pika.BlockingConnection(pika.URLParameters(url))
        self._open_channel()

    def _open_channel(self) -> None:
        # Confirmed publishes: a message the test published is in its queue when publish returns.
        self.channel = self._connection.channel()
        self.channel.confirm_delivery()

    @property
    def env(self) -> dict[str, str]:
        return {"CREDEX_AMQP_URL": self.url, "CREDEX_AMQP_PREFIX": self.prefix}

    def count(self, queue: str) -> int:
        """Messages ready in ``queue`` (0 when it does not exist yet)."""
        import pika.exceptions

        try:
            return self.channel.queue_declare(queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            self._open_channel()
            return 0

    def take(self, queue: str) -> list[tuple[object, dict]]:
        """Every message ready in ``queue``, acked: (properties, JSON body)."""
        taken = []
        while True:
            method, properties, body = self.channel.basic_get(queue)
            if method is None:
                return taken
            self.channel.basic_ack(method.delivery_tag)
            taken.append((properties, json.loads(body)))

    def publish(self, routing_key: str, body: dict | bytes, **properties) -> None:
        import pika

        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.channel.basic_publish(
            self.names.exchange, routing_key, data, pika.BasicProperties(delivery_mode=2, **properties)
        )

    def close(self) -> None:
        self._connection.close()


@pytest.fixture
def rabbit(amqp_url: str, amqp_prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rabbit]:
    """The broker for this test, under a prefix of its own; credex (in-process) is pointed at it."""
    for name, value in (("CREDEX_AMQP_URL", amqp_url), ("CREDEX_AMQP_PREFIX", amqp_prefix)):
        monkeypatch.setenv(name, value)
    broker = Rabbit(amqp_url, amqp_prefix)
    yield broker
    broker.close()
