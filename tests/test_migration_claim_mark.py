"""0012: a Postgres relay's claim is one durable mark (outbox_claim_mark) instead of a
``first_claimed_at`` written on every fresh message before publishing. Upgrading starts the mark
before every message; a claim moves it to its batch's newest fresh message and writes nothing on
the messages; downgrading writes ``first_claimed_at`` on the messages the mark covers, which is
what the older relays and `redeem cancel` read."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from credex.db.engine import ensure_schema, get_engine, upgrade
from credex.db.models import utcnow
from tests.test_migration_lifecycle import empty_url, migrate  # noqa: F401 - a fixture

T0 = utcnow().replace(microsecond=0) - timedelta(hours=1)


def add_messages(url: str, *created_minutes: int) -> None:
    with get_engine(url).begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO outbox_message (id, routing_key, body, state, attempts, next_attempt_at, "
                "created_at) VALUES (:id, 'redemption.created', '{}', 'pending', 0, :at, :at)"
            ),
            [{"id": f"m{minutes}", "at": T0 + timedelta(minutes=minutes)} for minutes in created_minutes],
        )


def first_claims(url: str) -> dict[str, bool]:
    with get_engine(url).connect() as connection:
        rows = connection.execute(sa.text("SELECT id, first_claimed_at FROM outbox_message ORDER BY id"))
        return {row.id: row.first_claimed_at is not None for row in rows}


def indexes(url: str) -> set[str]:
    return {index["name"] for index in sa.inspect(get_engine(url)).get_indexes("outbox_message")}


def test_the_mark_starts_before_every_message_and_downgrading_writes_what_it_covers(empty_url):  # noqa: F811
    migrate(empty_url, "0011_partial_source_index")
    add_messages(empty_url, 1, 2, 3)
    upgrade(empty_url)
    with get_engine(empty_url).connect() as connection:
        (through,) = connection.execute(sa.text("SELECT through FROM outbox_claim_mark WHERE id = 1")).one()
    assert str(through) < str(T0)  # before every message: each may still be withdrawn
    with get_engine(empty_url).begin() as connection:  # as a relay that published up to m2 does
        connection.execute(
            sa.text("UPDATE outbox_claim_mark SET through = :t"), {"t": T0 + timedelta(minutes=2)}
        )
    assert "ix_outbox_message_fresh" not in indexes(empty_url)  # it served the per-message mark only
    migrate(empty_url, "0011_partial_source_index", down=True)
    assert first_claims(empty_url) == {"m1": True, "m2": True, "m3": False}
    assert "ix_outbox_message_fresh" in indexes(empty_url)
    migrate(empty_url, "head")
    assert first_claims(empty_url) == {"m1": True, "m2": True, "m3": False}


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_postgres_claim_writes_one_mark_and_nothing_on_its_messages(db_url) -> None:
    from credex.relay.claims import claim_strategy
    from credex.relay.outbox import RedeliveryPolicy

    upgrade(db_url)
    add_messages(db_url, 1, 2, 30)
    with get_engine(db_url).begin() as connection:  # m30 is not due yet
        connection.execute(
            sa.text("UPDATE outbox_message SET next_attempt_at = :later WHERE id = 'm30'"),
            {"later": utcnow() + timedelta(hours=1)},
        )
    claims = claim_strategy(ensure_schema(db_url).dialect, db_url, RedeliveryPolicy(), relay_id="r", lease=60)
    claim = claims.claim(10, now=utcnow())
    try:
        assert [m.id for m in claim.messages] == ["m1", "m2"]
        with get_engine(db_url).connect() as connection:  # seen from outside, while it publishes
            (through,) = connection.execute(sa.text("SELECT through FROM outbox_claim_mark")).one()
        assert through == T0 + timedelta(minutes=2)
        assert first_claims(db_url) == {"m1": False, "m2": False, "m30": False}
    finally:
        claims.release(claim)
    second = claims.claim(10, now=utcnow())  # the same batch again: the mark never moves back
    claims.record(second, {"m1": None, "m2": "nacked"}, now=utcnow())
    assert first_claims(db_url) == {"m1": True, "m2": True, "m30": False}
    with get_engine(db_url).begin() as connection:
        assert connection.execute(sa.text("SELECT through FROM outbox_claim_mark")).scalar() == through
        connection.execute(sa.text("DELETE FROM outbox_message"))  # messages of no redemption: gone
