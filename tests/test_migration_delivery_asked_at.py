"""0015: track sync's claim moves from ``delivery_checked_at`` to ``delivery_asked_at``, and
``delivery_checked_at`` is the time of the carrier's last answer. Upgrading keeps every claim
(nothing is asked again sooner), forgets the answer time of rows that were claimed but never
answered, and moves the claim's index; downgrading puts the claim back where the older credex
reads it. On SQLite and on Postgres."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from credex.db import HEAD_REVISION
from credex.db.engine import dispose_engines, get_engine, schema_revision, session_for
from credex.db.models import utcnow
from credex.points.deliveries import due_for_check
from tests.test_migration_cheaper_lots import run
from tests.test_migration_lifecycle import empty_url, migrate  # noqa: F401 - the fixture

BEFORE = "0014_slimmer_account_indexes"
NOW = utcnow().replace(microsecond=0)
ANSWERED = NOW - timedelta(minutes=5)  # claimed and answered 5 minutes ago
CLAIMED = NOW - timedelta(minutes=3)  # claimed 3 minutes ago, no answer ever
LONG_AGO = NOW - timedelta(hours=2)  # claimed and answered long ago


def claim_indexes(url: str) -> dict[str, list[str]]:
    return {
        index["name"]: index["column_names"]
        for index in sa.inspect(get_engine(url)).get_indexes("redemption")
        if index["name"].startswith("ix_redemption_status_delivery")
    }


def columns(url: str) -> set[str]:
    return {column["name"] for column in sa.inspect(get_engine(url)).get_columns("redemption")}


def delivery(url: str) -> dict[int, tuple]:
    asked = ", delivery_asked_at" if "delivery_asked_at" in columns(url) else ""
    with get_engine(url).connect() as connection:
        rows = connection.execute(
            sa.text(f"SELECT id, delivery_status, delivery_checked_at{asked} FROM redemption ORDER BY id")
        )
        return {row[0]: tuple(None if v is None else str(v)[:19] for v in row[1:]) for row in rows}


def at(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def test_upgrading_keeps_every_claim_and_only_answers_have_an_answer_time(empty_url):  # noqa: F811
    url = empty_url
    run(url, "db", "upgrade")
    run(url, "catalog", "add", "MUG", "--name", "Mug", "--points", "10")
    run(url, "award", "grant", "u1", "100", "--reason", "welcome", "--ref", "w-1")
    for _ in range(4):
        run(url, "redeem", "create", "u1", "MUG", "--address", "1 High St")
    migrate(url, BEFORE, down=True)
    dispose_engines()
    assert schema_revision(get_engine(url)) == BEFORE and "delivery_asked_at" not in columns(url)
    assert claim_indexes(url) == {
        "ix_redemption_status_delivery_checked_at": ["status", "delivery_checked_at"]
    }
    # As the older credex left them: 1 answered lately, 2 claimed lately with no answer ever,
    # 3 answered long ago, 4 never asked.
    with get_engine(url).begin() as connection:
        for rid, status, checked in (
            (1, "in_transit", ANSWERED),
            (2, None, CLAIMED),
            (3, "in_transit", LONG_AGO),
        ):
            connection.execute(
                sa.text(
                    "UPDATE redemption SET status = 'shipping', carrier = 'sandbox', express_no = :no, "
                    "delivery_status = :status, delivery_checked_at = :checked WHERE id = :id"
                ),
                {"no": f"SIM{rid}", "status": status, "checked": checked, "id": rid},
            )
        connection.execute(
            sa.text(
                "UPDATE redemption SET status = 'shipping', carrier = 'sandbox', express_no = 'SIM4' "
                "WHERE id = 4"
            )
        )

    assert '"to": "' + HEAD_REVISION in run(url, "db", "upgrade", "--json").stdout
    dispose_engines()
    assert claim_indexes(url) == {"ix_redemption_status_delivery_asked_at": ["status", "delivery_asked_at"]}
    assert delivery(url) == {
        1: ("in_transit", at(ANSWERED), at(ANSWERED)),
        2: (None, None, at(CLAIMED)),  # a claim, but no answer: no answer time
        3: ("in_transit", at(LONG_AGO), at(LONG_AGO)),
        4: (None, None, None),
    }
    with session_for(url) as session:  # the claims hold: within 30 minutes only 3 and 4 are due
        due = due_for_check(session, limit=10, now=utcnow(), interval=timedelta(minutes=30))
    assert [row.id for row in due] == [4, 3]
    shown = run(url, "redeem", "show", "2", "--json").stdout
    assert '"delivery_checked_at": null' in shown

    # Back: the claim is where the older credex reads it, the later of the two times.
    with get_engine(url).begin() as connection:
        connection.execute(
            sa.text("UPDATE redemption SET delivery_asked_at = :now WHERE id = 1"), {"now": NOW}
        )
    migrate(url, BEFORE, down=True)
    dispose_engines()
    assert "delivery_asked_at" not in columns(url)
    assert claim_indexes(url) == {
        "ix_redemption_status_delivery_checked_at": ["status", "delivery_checked_at"]
    }
    assert delivery(url) == {
        1: ("in_transit", at(NOW)),
        2: (None, at(CLAIMED)),
        3: ("in_transit", at(LONG_AGO)),
        4: (None, None),
    }
    run(url, "db", "upgrade")
    dispose_engines()
    assert schema_revision(get_engine(url)) == HEAD_REVISION
