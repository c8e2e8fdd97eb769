"""Fixtures: a fresh database per test on SQLite and on Postgres, the CLI, real processes,
every rule of domain.md checked after each test that used a database, and seeded randomness.

With CI=true a test that needs Postgres or RabbitMQ fails when the service is missing;
elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.invariants import CatalogBook, check_invariants, newest_redemption
from tests.support import AMQP_URL, CI, Outcome, file_lock, pg_admin, pg_url, service_missing

pytest_plugins = ["tests.sandbox"]

# Read once, before the autouse fixture below clears every CREDEX_ variable from the environment.
SEED_FROM_ENVIRONMENT = os.environ.get("CREDEX_TEST_SEED")

# Hypothesis: more examples on CI than on a developer's machine; both fit the suite's budget.
# Tests that set max_examples themselves keep their own number.
settings.register_profile(
    "dev", max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    print_blob=True,  # a failure on CI prints @reproduce_failure(...) to replay it anywhere
)
settings.load_profile(os.environ.get("CREDEX_HYPOTHESIS_PROFILE") or ("ci" if CI else "dev"))


def pytest_configure(config: pytest.Config) -> None:
    from tests.rabbitmq_cluster import set_run_id

    set_run_id()  # before pytest-xdist starts its workers: they inherit it
    # CREDEX_TEST_SEED also seeds hypothesis, so one variable replays a whole run.
    if SEED_FROM_ENVIRONMENT and getattr(config.option, "hypothesis_seed", None) is None:
        config.option.hypothesis_seed = int(SEED_FROM_ENVIRONMENT)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The controlling process (not an xdist worker) stops a test cluster left running."""
    if hasattr(session.config, "workerinput"):
        return
    from tests.rabbitmq_cluster import run_id, stop_left_over

    problem = stop_left_over(run_id())
    if problem:
        session.config.get_terminal_writer().line(problem, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Tests in files owned elsewhere that break data on purpose, until those files carry the marker.
BREAK_DATA_ON_PURPOSE = {
    "tests/test_lifecycle_invariants.py::test_the_checker_notices_a_lot_spent_twice",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.split("[", 1)[0] in BREAK_DATA_ON_PURPOSE:
            item.add_marker(pytest.mark.breaks_invariants)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    if report.when == "call":
        item.credex_call_passed = report.passed  # read by the invariant check at teardown
    return report


# --- randomness that can be replayed ------------------------------------------------------------


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The test's random seed: CREDEX_TEST_SEED when set, else a fresh one. Printed (so a failure
    shows it) and kept as a user property of the test report."""
    value = int(SEED_FROM_ENVIRONMENT) if SEED_FROM_ENVIRONMENT else random.SystemRandom().randrange(2**32)
    print(f"\nrandom seed of {request.node.nodeid}: replay with CREDEX_TEST_SEED={value}")
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture
def rng(seed: int) -> random.Random:
    """A random.Random seeded with ``seed``: every random choice of a test comes from it."""
    return random.Random(seed)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from credex's defaults, whatever the developer's shell exports."""
    for name in list(os.environ):
        if name.startswith("CREDEX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CREDEX_OPERATOR", "tester")
    # pytest-xdist's workers export the terminal's width; tables printed for a pipe are 160 wide.
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)


@pytest.fixture(autouse=True)
def _garbage_collector_as_it_was() -> Iterator[None]:
    """A long-running command run in-process sets the collector for its run
    (``collect_for_a_long_run``); the next test gets it back as it was."""
    threshold = gc.get_threshold()
    yield
    if gc.get_freeze_count():
        gc.unfreeze()
    gc.set_threshold(*threshold)


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
        try:
            yield name
        finally:
            from tests import pgreuse

            pgreuse.drop_spares()
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_postgres_database(template: str) -> tuple[str, Callable[[], None]]:
    """A database at ``template``'s state and the function that gives it back when the test is
    done: kept for the next test if the test changed only rows, else dropped (tests/pgreuse.py)."""
    from tests import pgreuse

    name = pgreuse.take(template)

    def drop() -> None:
        from credex.db.engine import dispose_engines

        dispose_engines()
        pgreuse.give_back(template, name)

    return pg_url(name), drop


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to the newest revision, once per test process: every SQLite test's
    database is a copy of it. Migrating a new file costs 60-140 ms of CPU (about 10 ms to open
    a migrated one), and most of a thousand tests would pay it, some in a process that imports
    Alembic for it. Creation on first use has tests of its own (test_database.py)."""
    from credex.db.engine import dispose_engines, upgrade

    path = tmp_path_factory.mktemp("sqlite-template") / "credex.db"
    upgrade(f"sqlite:///{path}")
    dispose_engines()  # the last connection closed: the WAL is checkpointed into the file and gone
    assert not path.with_name("credex.db-wal").exists()
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty points database at the newest revision: SQLite or Postgres, each a copy
    of a migrated template."""
    from credex.db.engine import dispose_engines

    if request.param == "sqlite":
        path = tmp_path / "credex.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
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


# --- the rules, after every test that changed data ----------------------------------------------


@pytest.fixture
def catalog_book() -> CatalogBook:
    """The stock and price of each gift as the test set them (the ``credex`` fixture records
    every successful ``catalog add/update``): stock conservation and prices are checked on it."""
    return CatalogBook()


@pytest.fixture(autouse=True)
def _invariants_after_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test with a ``db_url`` ends by checking every rule (tests/invariants.py) on it, unless
    it is marked ``breaks_invariants``. Skipped when the test itself failed: one failure is enough."""
    if "db_url" not in request.fixturenames or request.node.get_closest_marker("breaks_invariants"):
        yield
        return
    db_url = request.getfixturevalue("db_url")  # torn down after this fixture: the database is still there
    book = request.getfixturevalue("catalog_book")
    yield
    if getattr(request.node, "credex_call_passed", False):
        check_invariants(db_url, book=book)


# --- running credex ---------------------------------------------------------------------------


@pytest.fixture
def credex(db_url: str, catalog_book: CatalogBook) -> Callable[..., Outcome]:
    """Run credex in-process through Typer's CliRunner against the test database. Every
    successful ``catalog add/update`` is recorded in ``catalog_book``."""
    from typer.testing import CliRunner

    from credex.cli import app

    runner = CliRunner()

    def run(*args: object, input: str | None = None, env: dict[str, str] | None = None) -> Outcome:
        words = [str(arg) for arg in args]
        changes_catalog = words[:2] in (["catalog", "add"], ["catalog", "update"]) and len(words) > 2
        before = _newest_redemption(db_url) if changes_catalog else None
        result = runner.invoke(
            app, ["--database-url", db_url, *words], input=input, env=env, catch_exceptions=False
        )
        if changes_catalog and result.exit_code == 0:
            catalog_book.record_from(db_url, words[2], before=before or 0)
        return Outcome(result.exit_code, result.stdout, result.stderr)

    return run


def _newest_redemption(db_url: str) -> int | None:
    """The newest redemption's id (0: none), or None before the schema exists."""
    from sqlalchemy.exc import DBAPIError

    from credex.db.engine import get_engine

    if db_url.startswith("sqlite:///") and not Path(db_url.removeprefix("sqlite:///")).exists():
        return None  # asking would create the file before credex does
    try:
        with get_engine(db_url).connect() as connection:
            return newest_redemption(connection)
    except DBAPIError:
        return None


# --- RabbitMQ ---------------------------------------------------------------------------------


# Tests that stop the broker take this lock exclusively; every other broker test holds it shared,
# so that parallel workers (pytest-xdist) never see a restart they did not ask for.
BROKER_LOCK = Path(tempfile.gettempdir()) / "credex-tests-broker.lock"


def broker_lock(*, exclusive: bool, timeout: float = 600):
    return file_lock(BROKER_LOCK, exclusive=exclusive, timeout=timeout)


def check_broker(url: str = AMQP_URL) -> str:
    """``url``, once a connection to it opened; the test fails (CI) or is skipped otherwise."""
    import pika

    try:
        connection = pika.BlockingConnection(
            pika.URLParameters(url + "?connection_attempts=1&socket_timeout=5")
        )
        connection.close()
    except Exception as error:
        service_missing("RabbitMQ", type(error).__name__)
    return url


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """The broker's URL; the test fails (CI) or is skipped when it cannot be reached."""
    with broker_lock(exclusive=False):
        yield check_broker()


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
