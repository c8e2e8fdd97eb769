"""Upgrading a database that already holds accounts and a ledger to the points lifecycle (0002):
the existing balances become available points that never expire, and every rule holds."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from credex.db import HEAD_REVISION
from credex.db.engine import dispose_engines, get_engine, schema_revision, upgrade
from credex.db.migrate import alembic_config
from credex.db.models import UTCDateTime
from tests.support import pg_admin, pg_url
from tests.test_lifecycle_invariants import check_lifecycle_invariants

EARLIER = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)

# The two tables as revision 0001 left them.
account_0001 = sa.table(
    "account",
    sa.column("user_id", sa.String),
    sa.column("balance", sa.BigInteger),
    sa.column("earned", sa.BigInteger),
    sa.column("redeemed", sa.BigInteger),
    sa.column("created_at", UTCDateTime),
    sa.column("updated_at", UTCDateTime),
)
ledger_0001 = sa.table(
    "ledger_entry",
    sa.column("user_id", sa.String),
    sa.column("kind", sa.String),
    sa.column("ref", sa.String),
    sa.column("points", sa.BigInteger),
    sa.column("balance", sa.BigInteger),
    sa.column("detail", sa.String),
    sa.column("operator", sa.String),
    sa.column("reason", sa.Text),
    sa.column("created_at", UTCDateTime),
)


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema at all."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        dispose_engines()
        return
    request.getfixturevalue("postgres_template")  # skips (or fails on CI) without Postgres
    name = f"credex_mig_{uuid.uuid4().hex[:10]}"
    with pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_url(name)
    finally:
        dispose_engines()
        with pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate(url: str, revision: str, *, down: bool = False) -> None:
    with get_engine(url).execution_options(credex_write=True).begin() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


def fill_at_0001(url: str) -> None:
    """Three shoppers as the foundation recorded them: 70 left, nothing left, 25 untouched."""
    entries = [
        ("u1", "purchase", "o-1", 100, 100, "amount=100"),
        ("u1", "grant", "g-1", -30, 70, "points=-30"),
        ("u2", "grant", "g-2", 50, 50, "points=50"),
        ("u2", "grant", "g-3", -50, 0, "points=-50"),
        ("u3", "review", "rv-3", 25, 25, "photos=no"),
    ]
    with get_engine(url).begin() as connection:
        connection.execute(
            sa.insert(account_0001),
            [
                {"user_id": user, "balance": balance, "earned": earned, "redeemed": redeemed}
                | {"created_at": EARLIER, "updated_at": EARLIER}
                for user, balance, earned, redeemed in [("u1", 70, 70, 0), ("u2", 0, 0, 0), ("u3", 25, 25, 0)]
            ],
        )
        connection.execute(
            sa.insert(ledger_0001),
            [
                {"user_id": u, "kind": k, "ref": r, "points": p, "balance": b, "detail": d}
                | {"operator": "old-admin", "reason": f"{k} {r}", "created_at": EARLIER}
                for u, k, r, p, b, d in entries
            ],
        )


def test_upgrading_a_database_with_balances_keeps_them_available_and_unexpiring(empty_url, monkeypatch):
    migrate(empty_url, "0001")
    fill_at_0001(empty_url)
    assert schema_revision(get_engine(empty_url)) == "0001"

    before, after = upgrade(empty_url)
    assert (before, after) == ("0001", HEAD_REVISION)
    with get_engine(empty_url).connect() as connection:
        accounts = connection.execute(
            sa.text("SELECT user_id, balance, pending, debt FROM account ORDER BY user_id")
        ).all()
        lots = connection.execute(
            sa.text(
                "SELECT user_id, entry_id, points, remaining, state, expires_at "
                "FROM point_lot ORDER BY user_id"
            )
        ).all()
    assert [tuple(a) for a in accounts] == [("u1", 70, 0, 0), ("u2", 0, 0, 0), ("u3", 25, 0, 0)]
    assert [tuple(lot) for lot in lots] == [
        ("u1", None, 70, 70, "available", None),
        ("u3", None, 25, 25, "available", None),
    ]
    check_lifecycle_invariants(empty_url, legacy_upto=5)

    # The upgraded accounts live the lifecycle like any other.
    from typer.testing import CliRunner

    from credex.cli import app

    def credex(*args: str):
        result = CliRunner().invoke(app, ["--database-url", empty_url, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        return result

    monkeypatch.setenv("CREDEX_EXPIRY_DAYS", "30")
    shown = credex("account", "show", "u1", "--json")
    assert '"expiring": []' in shown.stdout  # carried-over points never expire
    credex("award", "grant", "u1", "40", "--reason", "new points", "--ref", "g-new")
    credex("catalog", "add", "CAP", "--name", "Cap", "--points", "80")
    credex("redeem", "create", "u1", "CAP", "--address", "1 High St")  # the 70 old ones go first
    refund = credex("award", "refund", "u1", "--order", "o-1", "--refund", "rf-1", "--json")
    assert '"clawback": 100' in refund.stdout and '"debt": 70' in refund.stdout
    history = credex("account", "history", "u1", "--json").stdout
    assert '"kind": "purchase"' in history and '"operator": "old-admin"' in history
    check_lifecycle_invariants(empty_url, legacy_upto=5)


def test_the_lifecycle_migration_downgrades_and_upgrades_again(empty_url):
    migrate(empty_url, "0001")
    fill_at_0001(empty_url)
    upgrade(empty_url)
    migrate(empty_url, "0001", down=True)
    with get_engine(empty_url).connect() as connection:
        names = sa.inspect(connection).get_table_names()
        columns = {c["name"] for c in sa.inspect(connection).get_columns("account")}
    assert "point_lot" not in names and "lot_use" not in names
    assert {"pending", "debt"}.isdisjoint(columns)
    dispose_engines()
    upgrade(empty_url)
    check_lifecycle_invariants(empty_url, legacy_upto=5)
