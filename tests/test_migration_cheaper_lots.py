"""Upgrading a database that holds lots to the partial lot indexes (0009): every row stays as it
was, the three full indexes give way to the partial ones, and settle, expire, spending and a
cancel's refund work on the upgraded data."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from freezegun import freeze_time
from typer.testing import CliRunner

from credex.cli import app
from credex.db import HEAD_REVISION
from credex.db.engine import dispose_engines, get_engine, schema_revision
from tests.invariants import check_invariants
from tests.test_migration_lifecycle import empty_url, migrate  # noqa: F401 - the fixture

START = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
OLD = {
    "ix_point_lot_user_id_state_available_at",
    "ix_point_lot_state_available_at",
    "ix_point_lot_state_expires_at",
}
NEW = {"ix_point_lot_available", "ix_point_lot_pending", "ix_point_lot_expirable"}
ROWS = {
    "point_lot": "SELECT id, user_id, entry_id, points, remaining, state, available_at, expires_at"
    " FROM point_lot",
    "lot_use": "SELECT lot_id, entry_id, points FROM lot_use",
    "ledger_entry": "SELECT id, user_id, kind, ref, points, pending, debt, balance FROM ledger_entry",
    "account": "SELECT user_id, balance, pending, debt, earned FROM account",
}


def run(url: str, *args: str, env: dict | None = None):
    result = CliRunner().invoke(app, ["--database-url", url, *args], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result


def indexes(url: str, table: str) -> set[str]:
    return {i["name"] for i in sa.inspect(get_engine(url)).get_indexes(table)}


def snapshot(url: str) -> dict[str, list]:
    with get_engine(url).connect() as connection:
        return {t: sorted(tuple(r) for r in connection.execute(sa.text(sql))) for t, sql in ROWS.items()}


def test_a_database_with_lots_upgrades_to_partial_indexes_and_keeps_working(empty_url):  # noqa: F811
    url = empty_url
    run(url, "db", "upgrade")
    run(url, "catalog", "add", "MUG", "--name", "Mug", "--points", "30", "--stock", "5")
    with freeze_time(START, ignore=["_pytest"]) as clock:
        run(url, "award", "grant", "u1", "100", "--reason", "welcome", "--ref", "w-1")
        run(
            url,
            "award",
            "purchase",
            "u1",
            "--order",
            "o-1",
            "--amount",
            "50",
            env={"CREDEX_PENDING_DAYS": "14"},
        )
        run(
            url,
            "award",
            "grant",
            "u2",
            "40",
            "--reason",
            "gift",
            "--ref",
            "x-2",
            env={"CREDEX_EXPIRY_DAYS": "30"},
        )
        spent = run(url, "redeem", "create", "u1", "MUG", "--address", "1 High St", "--json").stdout

        # Back to the schema before 0009, with its three full indexes, holding all of that.
        migrate(url, "0008_append_only", down=True)
        dispose_engines()
        assert schema_revision(get_engine(url)) == "0008_append_only"
        assert indexes(url, "point_lot") >= OLD and not NEW & indexes(url, "point_lot")
        before = snapshot(url)

        assert '"to": "' + HEAD_REVISION in run(url, "db", "upgrade", "--json").stdout
        dispose_engines()
        assert indexes(url, "point_lot") >= NEW and not OLD & indexes(url, "point_lot")
        assert "ix_lot_use_entry_id" in indexes(url, "lot_use")
        assert snapshot(url) == before

        # The upgraded lots are found through the new indexes.
        run(url, "redeem", "cancel", str(json.loads(spent)["redemption_id"]), "--reason", "mistake")
        clock.move_to(START + timedelta(days=15))
        settled = json.loads(run(url, "award", "settle", "--json").stdout)
        clock.move_to(START + timedelta(days=31))
        expired = json.loads(run(url, "award", "expire", "--json").stdout)
        shown = {u: json.loads(run(url, "account", "show", u, "--json").stdout) for u in ("u1", "u2")}
    assert (settled["lots"], settled["points"]) == (1, 50)
    assert (expired["lots"], expired["points"]) == (1, 40)
    assert (shown["u1"]["balance"], shown["u1"]["pending"], shown["u2"]["balance"]) == (150, 0, 0)
    check_invariants(url)


def source_index(url: str) -> str:
    """The definition of ix_ledger_entry_source_id as the database keeps it."""
    with get_engine(url).connect() as connection:
        if url.startswith("sqlite"):
            sql = "SELECT sql FROM sqlite_master WHERE name = 'ix_ledger_entry_source_id'"
        else:
            sql = "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_ledger_entry_source_id'"
        return connection.execute(sa.text(sql)).scalar_one()


def test_the_source_index_keeps_only_entries_that_have_a_source_after_upgrading(empty_url):  # noqa: F811
    url = empty_url
    run(url, "db", "upgrade")
    run(url, "award", "grant", "u1", "100", "--reason", "welcome", "--ref", "w-1")
    run(url, "award", "purchase", "u1", "--order", "o-1", "--amount", "50")
    run(url, "award", "refund", "u1", "--order", "o-1", "--refund", "rf-1", "--amount", "10")
    migrate(url, "0010_delivery_checkpoints", down=True)
    dispose_engines()
    assert "WHERE" not in source_index(url).upper()
    before = snapshot(url)

    run(url, "db", "upgrade")
    dispose_engines()
    assert schema_revision(get_engine(url)) == HEAD_REVISION
    assert re.search(r"WHERE \(?source_id IS NOT NULL\)?", source_index(url), re.IGNORECASE)
    assert snapshot(url) == before
    # The purchase's earlier refund is still found through it: a second refund takes the rest only.
    second = run(url, "award", "refund", "u1", "--order", "o-1", "--refund", "rf-2", "--json").stdout
    assert json.loads(second)["points"] == -40
    check_invariants(url)
