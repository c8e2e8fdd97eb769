"""The relay wakes when a message becomes due instead of waiting for its next poll: on Postgres by
LISTEN/NOTIFY (delivered at commit), on SQLite by watching the file's data version. The poll
stays as the safety net: a wake-up lost costs at most one poll interval, never a message."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import bindparam, text

from credex.db.engine import get_engine
from credex.db.models import UTCDateTime
from credex.relay.wakeups import APPLICATION_NAME, PostgresListener, SqliteDataVersion
from tests.pipeline import Pipeline, check_shipped_exactly_once
from tests.sandbox import running_sandbox
from tests.support import pg_admin, wait_for

LONG_POLL = "60"  # seconds: far longer than any test here waits, so only a wake-up can be in time


@pytest.fixture
def shop(credex):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10")
    credex("award", "grant", "u1", "1000", "--reason", "opening", "--ref", "open-u1")

    def redeem(address: str) -> dict:
        done = credex("redeem", "create", "u1", "MUG", "--address", address, "--json")
        assert done.exit_code == 0, done.stderr
        return done.json()

    return redeem


@pytest.fixture
def pipeline(db_url, rabbit, tmp_path):
    with running_sandbox() as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        yield pipeline
        pipeline.close()


def status(credex, redemption: dict) -> str:
    return credex("redeem", "show", str(redemption["redemption_id"]), "--json").json()["status"]


def wait_listening(pipeline: Pipeline, relay) -> None:
    """Until the relay hears commits (LISTEN in force, or the file watched)."""
    wait_for(
        lambda: "listening for due messages" in pipeline.log(relay) or "for commits" in pipeline.log(relay),
        timeout=60,
        what="the relay to listen",
    )


def test_a_commit_wakes_the_idle_relay_long_before_its_poll(credex, shop, pipeline):
    relay = pipeline.relay("--poll-interval", LONG_POLL)
    warehouse = pipeline.warehouse()
    pipeline.wait_ready(relay)
    pipeline.wait_ready(warehouse)
    wait_listening(pipeline, relay)

    for n in range(2):  # the second one finds the relay idle again, after its first round trip
        created = shop(f"{n} High St")
        started = time.monotonic()
        wait_for(lambda c=created: status(credex, c) == "shipping", timeout=20, interval=0.02, what="ship")
        assert time.monotonic() - started < 20 < int(LONG_POLL)

    assert [code for code, _ in (pipeline.stop(relay), pipeline.stop(warehouse))] == [0, 0]
    check_shipped_exactly_once(pipeline, 2)


def test_a_message_committed_before_the_relay_started_is_delivered(credex, shop, pipeline):
    created = shop("1 High St")  # nobody listens yet: its notification is lost
    relay = pipeline.relay("--poll-interval", LONG_POLL)
    pipeline.warehouse()
    wait_for(lambda: status(credex, created) == "shipping", timeout=60, what="shipping")
    assert pipeline.stop(relay)[0] == 0
    check_shipped_exactly_once(pipeline, 1)


def test_postgres_a_notification_never_sent_is_made_up_for_by_the_poll(db_url, credex, shop, pipeline):
    if not db_url.startswith("postgresql"):
        pytest.skip("Postgres: a commit without its NOTIFY (SQLite's data version cannot be skipped)")
    relay = pipeline.relay("--poll-interval", "2")
    pipeline.warehouse()
    pipeline.wait_ready(relay)
    wait_listening(pipeline, relay)
    created = shop("1 High St")
    wait_for(lambda: status(credex, created) == "shipping", timeout=30, what="the first one shipping")

    # A writer whose triggers do not fire (replication role): its commit wakes nobody.
    with get_engine(db_url).begin() as connection:
        connection.exec_driver_sql("SET LOCAL session_replication_role = replica")
        connection.exec_driver_sql(
            "UPDATE outbox_message SET state = 'pending', next_attempt_at = now() - interval '1 second' "
            "WHERE redemption_id = %s",
            (created["redemption_id"],),
        )
    wait_for(lambda: pipeline.confirmed() == 1, timeout=30, what="the poll to publish it again")
    assert pipeline.log(relay).count("published 1 of 1") == 2
    assert pipeline.stop(relay)[0] == 0
    check_shipped_exactly_once(pipeline, 1)


# --- the watchers on their own ------------------------------------------------------------------


class Wakes:
    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()


def test_sqlite_a_commit_of_a_due_message_wakes_and_other_commits_do_not(tmp_path):
    from datetime import timedelta

    from credex.db.engine import ensure_schema
    from credex.db.models import utcnow

    url = f"sqlite:///{tmp_path / 'watched.db'}"
    engine = ensure_schema(url)
    insert = text(
        "INSERT INTO outbox_message (id, routing_key, body, state, attempts, next_attempt_at, created_at) "
        "VALUES (:id, 'redemption.created', '{}', 'pending', 0, :due, :due)"
    ).bindparams(bindparam("due", type_=UTCDateTime()))
    wakes = Wakes()
    watcher = SqliteDataVersion(wakes, url)
    watcher.start()
    try:
        assert not wakes.event.wait(0.2), "woken while nothing committed"
        with engine.begin() as connection:  # not due yet: the relay knows when to look (or polls)
            connection.execute(insert, {"id": "later", "due": utcnow() + timedelta(minutes=5)})
        with engine.begin() as connection:  # not the outbox: the warehouse, a confirmation…
            connection.execute(text("UPDATE catalog_item SET name = name"))
            connection.execute(
                text(
                    "INSERT INTO catalog_item (sku, name, points, active, created_at, updated_at) "
                    "VALUES ('MUG', 'Mug', 1, 1, '2026-01-01', '2026-01-01')"
                )
            )
        assert not wakes.event.wait(0.2), "woken by a commit with nothing due"
        with engine.begin() as connection:
            connection.execute(insert, {"id": "now", "due": utcnow()})
        assert wakes.event.wait(5), "no wake-up after a due message was committed"
    finally:
        watcher.stop()


def test_postgres_the_listener_comes_back_after_its_connection_is_cut_and_wakes_once(db_url):
    if not db_url.startswith("postgresql"):
        pytest.skip("Postgres only")
    wakes = Wakes()
    listener = PostgresListener(wakes, db_url, timeout=0.1)
    listener.start()
    try:
        assert listener.listening.wait(10)
        database = get_engine(db_url).url.database
        with pg_admin() as admin:
            cut = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = %s",
                (database, APPLICATION_NAME),
            ).fetchone()[0]
        assert cut == 1
        # Back (after the backoff's first half second or so), it wakes the relay for what it missed.
        assert wakes.event.wait(20), "no wake-up after listening again"
        assert listener.listening.is_set()
    finally:
        listener.stop()
