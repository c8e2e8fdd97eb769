"""Upgrading a database that already holds outbox messages and shipment requests to 0006: nothing
held changes, and on Postgres a message that becomes due now wakes whoever LISTENs, at commit."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from credex.db import HEAD_REVISION
from credex.db.engine import get_engine, schema_revision, upgrade
from credex.db.models import utcnow
from tests.test_migration_lifecycle import empty_url, migrate  # noqa: F401 - a fixture

CHANNEL = "credex_outbox"


def fill_at_0003(url: str) -> None:
    """A confirmed message, one waiting for its confirmation, and the warehouse's shipment."""
    now = utcnow()
    with get_engine(url).begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO outbox_message (id, routing_key, body, state, attempts, next_attempt_at, "
                "created_at, confirmed_at) VALUES (:id, 'redemption.created', '{}', :state, 1, :due, "
                ":created, :confirmed)"
            ),
            [
                {"id": "m-confirmed", "state": "confirmed", "due": now, "created": now, "confirmed": now},
                {
                    "id": "m-sent",
                    "state": "sent",
                    "due": now + timedelta(minutes=1),
                    "created": now,
                    "confirmed": None,
                },
            ],
        )
        connection.execute(
            sa.text(
                "INSERT INTO shipment_request (type, redemption_id, message_id, sku, quantity, address, "
                "carrier, express_no, created_at, updated_at) VALUES (2, 7, 'm-confirmed', 'MUG', 1, "
                "'1 High St', 'sandbox', 'SIM7', :now, :now)"
            ),
            {"now": now},
        )


def held(url: str) -> list[tuple]:
    with get_engine(url).connect() as connection:
        messages = connection.execute(
            sa.text("SELECT id, state, attempts FROM outbox_message ORDER BY id")
        ).all()
        shipments = connection.execute(
            sa.text("SELECT redemption_id, express_no FROM shipment_request")
        ).all()
    return [tuple(row) for row in messages + shipments]


def test_upgrading_keeps_the_outbox_and_the_shipments(empty_url):  # noqa: F811
    migrate(empty_url, "0003")
    fill_at_0003(empty_url)
    before = held(empty_url)
    assert before == [("m-confirmed", "confirmed", 1), ("m-sent", "sent", 1), (7, "SIM7")]

    assert upgrade(empty_url) == ("0003", HEAD_REVISION)
    assert schema_revision(get_engine(empty_url)) == HEAD_REVISION
    assert held(empty_url) == before
    # Down and up again: the revision is reversible and repeatable.
    migrate(empty_url, "0003", down=True)
    migrate(empty_url, "head")
    assert held(empty_url) == before


def test_on_postgres_a_message_that_becomes_due_notifies_at_commit(empty_url):  # noqa: F811
    if not empty_url.startswith("postgresql"):
        pytest.skip("SQLite has no NOTIFY: its relay watches the file (tests/test_relay_wakeups.py)")
    import psycopg

    migrate(empty_url, "0003")
    fill_at_0003(empty_url)
    upgrade(empty_url)
    libpq = sa.make_url(empty_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")

        def heard() -> int:
            return len(list(listener.notifies(timeout=0.5, stop_after=10)))

        engine = get_engine(empty_url)
        with engine.begin() as connection:  # later than now: nobody is woken for it
            connection.execute(
                sa.text("UPDATE outbox_message SET next_attempt_at = :due WHERE id = 'm-sent'"),
                {"due": utcnow() + timedelta(minutes=5)},
            )
        assert heard() == 0
        with engine.begin() as connection:  # `relay retry`: due now, one notification at commit
            connection.execute(
                sa.text("UPDATE outbox_message SET next_attempt_at = :due WHERE id = 'm-sent'"),
                {"due": utcnow()},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO outbox_message (id, routing_key, body, state, attempts, next_attempt_at, "
                    "created_at) VALUES ('m-new', 'redemption.created', '{}', 'pending', 0, :now, :now)"
                ),
                {"now": utcnow()},
            )
            assert heard() == 0  # not before the commit
        assert heard() == 1  # the two rows of one transaction: one notification
        with engine.begin() as connection:  # confirmed: nothing to wake for
            connection.execute(sa.text("UPDATE outbox_message SET state = 'confirmed' WHERE id = 'm-new'"))
        assert heard() == 0
