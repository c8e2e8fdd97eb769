"""Upgrading a database that holds lots and entries to the slimmer per-shopper indexes (0014): every
row stays as it was, each index gets its new key, and spending oldest first, `award expire` and an
account's history give the same answers on the upgraded data; downgrading puts the old keys back."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from freezegun import freeze_time

from credex.db import HEAD_REVISION
from credex.db.engine import dispose_engines, get_engine, schema_revision
from tests.invariants import check_invariants
from tests.test_migration_cheaper_lots import run, snapshot
from tests.test_migration_lifecycle import empty_url, migrate  # noqa: F401 - the fixture

START = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
BEFORE = "0013_account_fillfactor"
CHANGED = ("ix_point_lot_available", "ix_point_lot_expirable", "ix_ledger_entry_user_id_id")
PENDING_14 = {"CREDEX_PENDING_DAYS": "14"}
EXPIRY_30 = {"CREDEX_EXPIRY_DAYS": "30"}


def keys(url: str) -> dict[str, list[str]]:
    """The columns of the three indexes 0014 changes, as the database keeps them."""
    inspector = sa.inspect(get_engine(url))
    found = {}
    for table in ("point_lot", "ledger_entry"):
        for index in inspector.get_indexes(table):
            if index["name"] in CHANGED:
                found[index["name"]] = index["column_names"]
    return found


def test_upgrading_to_slimmer_indexes_keeps_every_row_and_every_answer(empty_url):  # noqa: F811
    url = empty_url
    postgres = url.startswith("postgresql")
    old = {
        "ix_point_lot_available": ["user_id", "available_at", "id"],
        "ix_point_lot_expirable": ["user_id", "expires_at"],
        "ix_ledger_entry_user_id_id": ["user_id", "id"],
    }
    new = {
        "ix_point_lot_available": ["user_id"],
        "ix_point_lot_expirable": ["expires_at", "user_id"],
        # On SQLite id is the rowid, which ends every index entry already.
        "ix_ledger_entry_user_id_id": ["user_id", "id"] if postgres else ["user_id"],
    }
    run(url, "db", "upgrade")
    assert keys(url) == new
    run(url, "catalog", "add", "MUG", "--name", "Mug", "--points", "30", "--stock", "5")
    with freeze_time(START, ignore=["_pytest"]) as clock:
        # u1's lots, oldest first: a grant, then a purchase that becomes available in 14 days,
        # then a grant made before it settles (spent before the purchase's points).
        run(url, "award", "grant", "u1", "20", "--reason", "welcome", "--ref", "w-1")
        run(url, "award", "purchase", "u1", "--order", "o-1", "--amount", "50", env=PENDING_14)
        clock.move_to(START + timedelta(days=1))
        run(url, "award", "grant", "u1", "15", "--reason", "gift", "--ref", "g-1")
        run(url, "award", "grant", "u2", "40", "--reason", "gift", "--ref", "x-2", env=EXPIRY_30)
        run(url, "award", "grant", "u2", "5", "--reason", "welcome", "--ref", "w-2")

        # Back to the schema before 0014, holding all of that.
        migrate(url, BEFORE, down=True)
        dispose_engines()
        assert schema_revision(get_engine(url)) == BEFORE
        assert keys(url) == old
        before = snapshot(url)

        assert '"to": "' + HEAD_REVISION in run(url, "db", "upgrade", "--json").stdout
        dispose_engines()
        assert keys(url) == new
        assert snapshot(url) == before

        clock.move_to(START + timedelta(days=15))
        settled = json.loads(run(url, "award", "settle", "--json").stdout)
        # 30 points: all of the first grant (20), then 10 of the second (15), not of the purchase.
        spent = json.loads(
            run(url, "redeem", "create", "u1", "MUG", "--address", "1 High St", "--json").stdout
        )
        clock.move_to(START + timedelta(days=32))
        expired = json.loads(run(url, "award", "expire", "--json").stdout)
        history = json.loads(run(url, "account", "history", "u2", "--json").stdout)
    with get_engine(url).connect() as connection:
        lots = dict(
            connection.execute(
                sa.text("SELECT entry_id, remaining FROM point_lot WHERE user_id = 'u1' ORDER BY id")
            ).all()
        )
    assert (settled["lots"], settled["points"]) == (1, 50)
    assert spent["points"] == 30
    assert list(lots.values()) == [0, 50, 5]
    assert (expired["accounts"], expired["lots"], expired["points"]) == (1, 1, 40)
    # Newest first: the expiry of x-2's lot, then the two grants in the reverse of their order.
    assert [(entry["kind"], entry["ref"]) for entry in history][1:] == [("grant", "w-2"), ("grant", "x-2")]
    assert history[0]["kind"] == "expiry" and history[0]["points"] == -40, history[0]
    assert [entry["entry_id"] for entry in history] == sorted((e["entry_id"] for e in history), reverse=True)
    check_invariants(url)

    migrate(url, BEFORE, down=True)
    dispose_engines()
    assert keys(url) == old
    assert run(url, "db", "upgrade", "--json").stdout
    dispose_engines()
    assert keys(url) == new
