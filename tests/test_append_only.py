"""Ledger entries are append-only (migration 0008): the database refuses to change or remove one,
on SQLite and on Postgres, on a new database and on one upgraded with its entries in it; a user
who runs into the refusal gets one clear line and exit 1, never an internal error."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from credex.db import HEAD_REVISION
from credex.db.engine import get_engine, schema_revision, upgrade
from credex.db.failures import translate_db_error
from credex.db.models import UTCDateTime
from credex.errors import AppendOnly
from tests.invariants import check_invariants
from tests.test_lifecycle_invariants import check_lifecycle_invariants
from tests.test_migration_lifecycle import (  # noqa: F401 (empty_url: a fixture)
    EARLIER,
    empty_url,
    fill_at_0001,
    migrate,
)

CHANGES = (
    "UPDATE ledger_entry SET points = points + 1000, balance = balance + 1000",
    "UPDATE ledger_entry SET reason = 'edited' WHERE id = 1",
    "DELETE FROM ledger_entry WHERE id = 1",
    "DELETE FROM ledger_entry",
)


def ledger(url: str) -> list[tuple]:
    with get_engine(url).connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                sa.text(
                    "SELECT id, user_id, kind, ref, points, balance, reason FROM ledger_entry ORDER BY id"
                )
            )
        ]


def refused(url: str, statement: str) -> AppendOnly:
    """Run ``statement`` in a transaction of its own; the error credex shows for its refusal."""
    with pytest.raises(DBAPIError) as raised, get_engine(url).begin() as connection:
        connection.execute(sa.text(statement))
    shown = translate_db_error(raised.value)
    assert isinstance(shown, AppendOnly), f"{statement}: {raised.value}"
    return shown


def test_an_entry_cannot_be_changed_or_removed_and_a_correction_is_a_new_entry(db_url, credex, backend):
    assert credex("award", "grant", "u1", "100", "--reason", "welcome", "--ref", "w-1").exit_code == 0
    assert credex("award", "grant", "u1", "-30", "--reason", "typo", "--ref", "t-1").exit_code == 0
    before = ledger(db_url)

    for statement in CHANGES:
        error = refused(db_url, statement)
        assert error.exit_code == 1 and error.to_json()["error"]["code"] == "append_only"
        assert "\n" not in error.message
        assert "ledger_entry is append-only: record a correction as a new entry" in error.message
    if backend == "postgres":  # TRUNCATE skips row triggers: it has its own
        refused(db_url, "TRUNCATE ledger_entry CASCADE")
    assert ledger(db_url) == before

    # The correction of a wrong grant is another grant.
    assert credex("award", "grant", "u1", "30", "--reason", "undo typo", "--ref", "t-1-undo").exit_code == 0
    shown = credex("account", "show", "u1", "--json").json()
    assert shown["balance"] == 100
    assert len(ledger(db_url)) == 3


def ship_one_at_0003(url: str) -> None:
    """u3 redeemed a 10-point cup, the warehouse shipped it and the relay recorded it, as revision
    0003 recorded all that (its ledger entry is entry 6, after fill_at_0001's five)."""
    at = {"created_at": EARLIER, "updated_at": EARLIER}
    gift = {"sku": "CUP", "quantity": 1, "address": "1 High St"}
    waybill = {"carrier": "sandbox", "express_no": "SB0000000001"}
    body = {"message_id": "m-1", "redemption_id": 1, "user_id": "u3", "points": 10, **gift}
    with get_engine(url).begin() as connection:

        def add(table: str, **values) -> None:
            columns = [sa.column(name, UTCDateTime() if name.endswith("_at") else None) for name in values]
            connection.execute(sa.insert(sa.table(table, *columns)).values(**values))

        add("catalog_item", sku="CUP", name="Cup", points=10, stock=4, active=True, **at)
        add(
            "redemption",  # the first: id 1
            user_id="u3",
            points=10,
            balance=15,
            status="shipping",
            message_id="m-1",
            operator="old-admin",
            **gift,
            **waybill,
            **at,
        )
        add(
            "ledger_entry",
            user_id="u3",
            kind="redemption",
            ref="1",
            points=-10,
            balance=15,
            operator="old-admin",
            created_at=EARLIER,
        )
        lot = connection.execute(sa.text("SELECT id FROM point_lot WHERE user_id = 'u3'")).scalar()
        add("lot_use", lot_id=lot, entry_id=6, points=10)
        connection.execute(sa.text("UPDATE point_lot SET remaining = 15 WHERE id = :lot"), {"lot": lot})
        connection.execute(sa.text("UPDATE account SET balance = 15, redeemed = 10 WHERE user_id = 'u3'"))
        add(
            "outbox_message",
            id="m-1",
            redemption_id=1,
            routing_key="redemption.created",
            body=json.dumps(body),
            state="confirmed",
            attempts=1,
            next_attempt_at=EARLIER,
            created_at=EARLIER,
        )
        add("shipment_request", type=2, redemption_id=1, message_id="m-1", **gift, **waybill, **at)


def test_upgrading_a_database_with_entries_installs_the_guard_and_keeps_them(empty_url, credex_app):  # noqa: F811
    migrate(empty_url, "0001")
    fill_at_0001(empty_url)
    migrate(empty_url, "0003")
    ship_one_at_0003(empty_url)
    before = ledger(empty_url)
    with get_engine(empty_url).begin() as connection:  # still editable before the upgrade
        connection.execute(sa.text("UPDATE ledger_entry SET reason = reason WHERE id = 1"))

    assert upgrade(empty_url) == ("0003", HEAD_REVISION)
    assert schema_revision(get_engine(empty_url)) == HEAD_REVISION
    assert ledger(empty_url) == before
    check_invariants(empty_url, legacy_upto=5, stocks={"CUP": 5}, shipped=True)
    verified = credex_app(empty_url, "audit", "verify", "--json")
    assert json.loads(verified.stdout)["checked"]["redemptions_with_shipments"] == 1
    for statement in CHANGES:
        refused(empty_url, statement)
    assert ledger(empty_url) == before

    # Awards, redemptions and clawbacks still only add entries.
    credex_app(empty_url, "award", "grant", "u1", "40", "--reason", "new points", "--ref", "g-new")
    credex_app(empty_url, "catalog", "add", "CAP", "--name", "Cap", "--points", "80")
    credex_app(empty_url, "redeem", "create", "u1", "CAP", "--address", "1 High St")
    credex_app(empty_url, "award", "refund", "u1", "--order", "o-1", "--refund", "rf-1")
    assert ledger(empty_url)[: len(before)] == before
    assert len(ledger(empty_url)) == len(before) + 3
    check_lifecycle_invariants(empty_url, legacy_upto=5)


def test_downgrading_removes_the_guard_and_upgrading_puts_it_back(empty_url):  # noqa: F811
    migrate(empty_url, "0001")
    fill_at_0001(empty_url)
    upgrade(empty_url)
    migrate(empty_url, "0003", down=True)
    with get_engine(empty_url).begin() as connection:
        connection.execute(sa.text("UPDATE ledger_entry SET reason = reason WHERE id = 1"))
    upgrade(empty_url)
    refused(empty_url, "UPDATE ledger_entry SET reason = reason WHERE id = 1")


@pytest.fixture
def credex_app():
    from typer.testing import CliRunner

    from credex.cli import app

    def run(url: str, *args: str):
        result = CliRunner().invoke(app, ["--database-url", url, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.stdout + result.stderr
        return result

    return run
