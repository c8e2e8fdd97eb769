"""Upgrading a database that already holds redemptions (revision 0003) to the redemption
lifecycle (0004): every existing redemption gets its events, every limited gift its stock
movements, every message that may have left its claim; and the old redemptions can be cancelled
like new ones. On SQLite and on Postgres."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from typer.testing import CliRunner

from credex.cli import app
from credex.db import HEAD_REVISION
from credex.db.engine import dispose_engines, get_engine, schema_revision, upgrade
from tests.invariants import check_invariants
from tests.test_migration_lifecycle import empty_url, migrate  # noqa: F401 - the fixture

EARLIER = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)

# u1: granted 100, redeemed 2 x MUG (40, pending, never published) and 1 x MUG (20, shipping).
FILL_0003 = [
    "INSERT INTO account (user_id, balance, earned, redeemed, pending, debt, created_at, updated_at) "
    "VALUES ('u1', 40, 100, 60, 0, 0, :at, :at)",
    "INSERT INTO catalog_item (sku, name, points, stock, active, created_at, updated_at) "
    "VALUES ('MUG', 'Mug', 20, 5, :true, :at, :at)",
    "INSERT INTO catalog_item (sku, name, points, stock, active, created_at, updated_at) "
    "VALUES ('PEN', 'Pen', 5, NULL, :true, :at, :at)",
    "INSERT INTO ledger_entry (id, user_id, kind, ref, points, balance, detail, operator, reason, "
    "created_at, pending, debt) "
    "VALUES (1, 'u1', 'grant', 'g-1', 100, 100, NULL, 'old-admin', 'opening', :at, 0, 0)",
    "INSERT INTO point_lot (id, user_id, entry_id, points, remaining, state, available_at, created_at) "
    "VALUES (1, 'u1', 1, 100, 40, 'available', :at, :at)",
    "INSERT INTO redemption (id, user_id, sku, quantity, points, balance, address, status, message_id, "
    "operator, created_at, updated_at) VALUES (1, 'u1', 'MUG', 2, 40, 60, '1 High St', 'pending', "
    "'00000000-0000-4000-8000-000000000001', 'old-admin', :at, :at)",
    "INSERT INTO redemption (id, user_id, sku, quantity, points, balance, address, status, message_id, "
    "operator, carrier, express_no, created_at, updated_at) VALUES (2, 'u1', 'MUG', 1, 20, 40, '1 High St', "
    "'shipping', '00000000-0000-4000-8000-000000000002', 'old-admin', 'sandbox', 'SIM2', :at, :at)",
    "INSERT INTO ledger_entry (id, user_id, kind, ref, points, balance, detail, operator, reason, "
    "created_at, pending, debt) "
    "VALUES (2, 'u1', 'redemption', '1', -40, 60, 'MUG x2', 'old-admin', 'r1', :at, 0, 0)",
    "INSERT INTO ledger_entry (id, user_id, kind, ref, points, balance, detail, operator, reason, "
    "created_at, pending, debt) "
    "VALUES (3, 'u1', 'redemption', '2', -20, 40, 'MUG x1', 'old-admin', 'r2', :at, 0, 0)",
    "INSERT INTO lot_use (lot_id, entry_id, points) VALUES (1, 2, 40)",
    "INSERT INTO lot_use (lot_id, entry_id, points) VALUES (1, 3, 20)",
    "INSERT INTO outbox_message (id, redemption_id, routing_key, body, state, attempts, next_attempt_at, "
    "created_at) VALUES ('00000000-0000-4000-8000-000000000001', 1, 'redemption.created', :body1, 'pending', "
    "0, :at, :at)",
    "INSERT INTO outbox_message (id, redemption_id, routing_key, body, state, attempts, next_attempt_at, "
    "sent_at, confirmed_at, created_at) VALUES ('00000000-0000-4000-8000-000000000002', 2, "
    "'redemption.created', :body2, 'confirmed', 1, :at, :at, :at, :at)",
]


def body(n: int, quantity: int, points: int) -> str:
    import json

    return json.dumps(
        {"message_id": f"00000000-0000-4000-8000-00000000000{n}", "redemption_id": n, "user_id": "u1",
         "sku": "MUG", "quantity": quantity, "points": points, "address": "1 High St",
         "created_at": EARLIER.isoformat()}
    )  # fmt: skip


def fill_at_0003(url: str) -> None:
    params = {"at": EARLIER, "true": True, "body1": body(1, 2, 40), "body2": body(2, 1, 20)}
    with get_engine(url).begin() as connection:
        for statement in FILL_0003:
            connection.execute(sa.text(statement), {k: v for k, v in params.items() if f":{k}" in statement})
        if connection.dialect.name == "postgresql":  # explicit ids: move the sequences on
            for table in ("ledger_entry", "point_lot", "redemption"):
                connection.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 10)"))


def test_upgrading_a_database_with_redemptions_keeps_every_rule_and_they_can_be_cancelled(empty_url):  # noqa: F811
    migrate(empty_url, "0003")
    fill_at_0003(empty_url)
    before, after = upgrade(empty_url)
    assert (before, after) == ("0003", HEAD_REVISION) and schema_revision(
        get_engine(empty_url)
    ) == HEAD_REVISION

    with get_engine(empty_url).connect() as connection:
        movements = connection.execute(
            sa.text("SELECT sku, kind, delta, stock_after, ref FROM stock_movement ORDER BY id")
        ).all()
        events = connection.execute(
            sa.text("SELECT redemption_id, status, source FROM redemption_event ORDER BY id")
        ).all()
        claimed = dict(
            connection.execute(sa.text("SELECT redemption_id, first_claimed_at FROM outbox_message")).all()
        )
    # The stock before the two redemptions took theirs, then what each took: 8 - 2 - 1 = 5.
    assert [tuple(m) for m in movements] == [
        ("MUG", "set", 8, 8, None),
        ("MUG", "redeem", -2, 6, "1"),
        ("MUG", "redeem", -1, 5, "2"),
    ]
    assert [tuple(e) for e in events] == [
        (1, "pending", "create"),
        (2, "pending", "create"),
        (2, "shipping", "relay"),
    ]
    assert claimed[1] is None and claimed[2] is not None  # the confirmed one left long ago
    check_invariants(empty_url, stocks={"MUG": 8}, legacy_upto=0)

    def credex(*args: str):
        result = CliRunner().invoke(app, ["--database-url", empty_url, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        return result

    import json

    withdrawn = json.loads(credex("redeem", "cancel", "1", "--reason", "old order", "--json").stdout)
    assert (withdrawn["status"], withdrawn["cancel"]) == ("cancelled", "withdrawn")
    requested = json.loads(credex("redeem", "cancel", "2", "--reason", "old order", "--json").stdout)
    assert (requested["status"], requested["cancel"]) == ("cancelling", "requested")
    account = json.loads(credex("account", "show", "u1", "--json").stdout)
    assert (account["balance"], account["redeemed"]) == (80, 20)
    assert json.loads(credex("catalog", "list", "--json").stdout)[0]["stock"] == 7
    shown = json.loads(credex("redeem", "show", "2", "--json").stdout)
    assert [e["status"] for e in shown["events"]] == ["cancelling", "shipping", "pending"]
    credex("catalog", "update", "PEN", "--stock", "3")
    check_invariants(empty_url, legacy_upto=0)
    dispose_engines()
