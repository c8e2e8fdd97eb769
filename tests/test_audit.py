"""`credex audit verify`: a shop whose points, outbox and warehouse agree verifies (exit 0); every
kind of damage planted by hand is reported with the ids it concerns (exit 1), across a points
database and a separate warehouse database, on SQLite and on Postgres. It never writes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from credex.db import HEAD_REVISION
from credex.db.engine import dispose_engines, get_engine
from credex.db.models import ShipmentStatus
from credex.relay.answers import Confirmation, record_confirmations
from credex.warehouse.messages import RedemptionMessage
from credex.warehouse.shipments import move, open_requests, requests_of
from tests.conftest import make_postgres_database
from tests.invariants import check_invariants
from tests.pipeline import Pipeline, check_shipped_exactly_once
from tests.sandbox import running_sandbox

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
def warehouse_url(db_url: str, tmp_path: Path, request: pytest.FixtureRequest):
    """A warehouse database of its own, on the same kind of server as the points database."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'warehouse.db'}"
        return
    url, drop = make_postgres_database(request.getfixturevalue("postgres_template"))
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def audit(credex, warehouse_url):
    def run(*extra: str) -> tuple[int, dict]:
        done = credex("audit", "verify", "--json", "--warehouse-database-url", warehouse_url, *extra)
        assert done.stderr == "", done.stderr
        return done.exit_code, done.json()

    return run


def execute(url: str, *statements: str, **params) -> None:
    with get_engine(url).begin() as connection:
        for statement in statements:
            connection.execute(sa.text(statement), params)


def by_hand(url: str, *statements: str, **params) -> None:
    """Statements run as a DBA's script would, with foreign keys not enforced (and on Postgres
    no trigger either): sqlite3's own connection, or session_replication_role = replica."""
    if url.startswith("sqlite"):
        import sqlite3

        db = sqlite3.connect(url.removeprefix("sqlite:///"))  # foreign keys off: sqlite3's default
        with db:
            for statement in statements:
                db.execute(statement, params)
        db.close()
        return
    execute(url, "SET LOCAL session_replication_role = replica", *statements, **params)


def scalar(url: str, sql: str):
    with get_engine(url).connect() as connection:
        return connection.execute(sa.text(sql)).scalar()


def ship_by_hand(points_url: str, warehouse_url: str, redemption_ids: list[int]) -> dict[int, str]:
    """What the warehouse and the relay do for each redemption, through their own functions:
    a shipment request with a waybill, then the confirmation recorded. Returns id -> express no."""
    from credex.db.engine import session_for

    with get_engine(points_url).connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT id, message_id, user_id, sku, quantity, address FROM redemption WHERE id IN :ids"
            ).bindparams(sa.bindparam("ids", expanding=True)),
            {"ids": redemption_ids},
        ).all()
    messages = [RedemptionMessage(r.message_id, r.id, r.user_id, r.sku, r.quantity, r.address) for r in rows]
    with session_for(warehouse_url, write=True) as session:
        open_requests(session, messages, now=NOW)
        requests = requests_of(session, [m.redemption_id for m in messages])
        for rid, row in requests.items():
            assert move(
                session,
                row.id,
                from_=(ShipmentStatus.requested,),
                to=ShipmentStatus.waybill,
                now=NOW,
                carrier="sandbox",
                express_no=f"SB{rid:010d}",
            )
        session.commit()
        saved = requests_of(session, [m.redemption_id for m in messages])
    with session_for(points_url, write=True) as session:
        confirmations = [Confirmation(m.message_id, "sandbox", f"SB{m.redemption_id:010d}") for m in messages]
        record_confirmations(session, confirmations, now=NOW)
        session.commit()
    return {row.redemption_id: row.express_no for row in saved.values()}


@pytest.fixture
def shop(credex, db_url, warehouse_url):
    """Two shoppers, a gift with stock, three redemptions: the first two shipped, the third pending."""
    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "5").exit_code == 0
    for user in ("u1", "u2"):
        assert (
            credex("award", "grant", user, "100", "--reason", "welcome", "--ref", f"w-{user}").exit_code == 0
        )
    ids = [
        credex("redeem", "create", user, "MUG", "--address", "1 High St", "--json").json()["redemption_id"]
        for user in ("u1", "u1", "u2")
    ]
    ship_by_hand(db_url, warehouse_url, ids[:2])
    check_invariants(db_url, warehouse_db_url=warehouse_url, stocks={"MUG": 5})
    return ids


def found(report: dict) -> set[tuple]:
    return {(v["check"], *v["ids"]) for v in report["violations"]}


def test_a_shop_whose_records_agree_verifies_and_nothing_is_written(shop, audit, db_url, warehouse_url):
    before = [scalar(url, "SELECT count(*) FROM shipment_request") for url in (db_url, warehouse_url)]
    code, report = audit()
    assert code == 0 and report["violations"] == []
    checked = report["checked"]
    assert checked["redemptions"] == 3 and checked["shipment_requests"] == 2
    assert checked["redemptions_with_shipments"] == 2 and checked["accounts"] == 2
    assert checked["ledger_entries"] == 5 and checked["outbox_messages"] == 3
    assert report["skipped"] == []  # every check ran, the stock movements' too
    assert [scalar(url, "SELECT count(*) FROM shipment_request") for url in (db_url, warehouse_url)] == before


def test_the_table_without_json_says_every_rule_holds(shop, credex, warehouse_url):
    done = credex("audit", "verify", "--warehouse-database-url", warehouse_url)
    assert done.exit_code == 0, done.stderr
    assert "every rule holds" in done.stdout and "redemptions" in done.stdout


@pytest.mark.breaks_invariants
def test_a_ledger_entry_edited_with_the_trigger_disabled_is_found(shop, audit, db_url, backend):
    if backend == "postgres":
        execute(
            db_url,
            "ALTER TABLE ledger_entry DISABLE TRIGGER ledger_entry_append_only",
            "UPDATE ledger_entry SET points = points + 7 WHERE ref = 'w-u2'",
            "ALTER TABLE ledger_entry ENABLE TRIGGER ledger_entry_append_only",
        )
    else:  # SQLite cannot disable a trigger: drop it and put it back
        sql = scalar(db_url, "SELECT sql FROM sqlite_master WHERE name = 'ledger_entry_no_update'")
        execute(
            db_url,
            "DROP TRIGGER ledger_entry_no_update",
            "UPDATE ledger_entry SET points = points + 7 WHERE ref = 'w-u2'",
            sql,
        )
    code, report = audit()
    assert code == 1
    grant = scalar(db_url, "SELECT id FROM ledger_entry WHERE ref = 'w-u2'")
    assert report["violations"] == [
        {
            "check": "account.ledger",
            "ids": ["u2"],
            "expected": {"balance": 97, "pending": 0, "debt": 0},
            "found": {"balance": 90, "pending": 0, "debt": 0},
        },
        # The edited entry no longer leads from the balance before it (0) to the one it records.
        {"check": "ledger.running_balance", "ids": ["u2", grant], "expected": 107, "found": 100},
    ]

    # A guard left off is reported too.
    if backend == "postgres":
        execute(db_url, "ALTER TABLE ledger_entry DISABLE TRIGGER ledger_entry_append_only")
    else:
        execute(db_url, "DROP TRIGGER ledger_entry_no_delete")
    code, report = audit()
    assert found(report) == {
        ("account.ledger", "u2"),
        ("ledger.running_balance", "u2", grant),
        ("ledger.append_only", "ledger_entry"),
    }


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_the_account_trigger_disabled_is_found(shop, audit, db_url):
    """Migration 0016's trigger is what keeps an account its entries and lots name (Postgres)."""
    execute(db_url, "ALTER TABLE account DISABLE TRIGGER account_in_use")
    code, report = audit()
    assert code == 1
    assert report["violations"] == [
        {
            "check": "account.kept",
            "ids": ["account"],
            "expected": "DELETE or new key refused while entries or lots name it",
            "found": "no enabled account_in_use trigger",
        }
    ]
    execute(db_url, "ALTER TABLE account ENABLE TRIGGER account_in_use")
    assert audit()[0] == 0


@pytest.mark.breaks_invariants
def test_a_balance_changed_by_hand_disagrees_with_its_ledger_and_its_lots(shop, audit, db_url):
    execute(db_url, "UPDATE account SET balance = balance + 5 WHERE user_id = 'u1'")
    code, report = audit()
    assert code == 1
    assert found(report) == {("account.ledger", "u1"), ("account.lots", "u1")}


@pytest.mark.breaks_invariants
def test_a_lot_sum_off_is_found_on_the_account_and_the_lot(shop, audit, db_url):
    lot = scalar(db_url, "SELECT id FROM point_lot WHERE user_id = 'u2'")
    execute(db_url, "UPDATE point_lot SET remaining = remaining - 3 WHERE id = :lot", lot=lot)
    code, report = audit()
    assert code == 1
    assert found(report) == {("account.lots", "u2"), ("lot.uses", lot)}
    lots = next(v for v in report["violations"] if v["check"] == "account.lots")
    assert lots["expected"] == {"balance": 87, "pending": 0}  # what the lots hold
    assert lots["found"] == {"balance": 90, "pending": 0}  # what the account says


@pytest.mark.breaks_invariants
def test_a_pending_redemption_without_its_outbox_message_is_found(shop, audit, db_url):
    pending = shop[2]
    execute(db_url, "DELETE FROM outbox_message WHERE redemption_id = :rid", rid=pending)
    # A shipped redemption's message may be gone: `relay purge` deletes confirmed ones.
    execute(db_url, "DELETE FROM outbox_message WHERE redemption_id = :rid", rid=shop[0])
    code, report = audit()
    assert code == 1
    assert report["violations"] == [
        {"check": "redemption.message", "ids": [pending], "expected": 1, "found": 0}
    ]


def test_a_cancelled_redemption_whose_confirmed_create_was_purged_verifies(shop, audit, credex, db_url):
    """The warehouse answered a create `cancelled` (its redemption cancelled meanwhile), so the
    message was confirmed, and `relay purge` deleted it: the audit took that for a lost message."""
    cancelled = shop[2]
    assert credex("redeem", "cancel", cancelled, "--reason", "r").exit_code == 0
    execute(
        db_url,
        "UPDATE outbox_message SET state = 'confirmed', confirmed_at = :at WHERE redemption_id = :rid",
        at=(NOW - timedelta(days=1)).replace(tzinfo=None),
        rid=cancelled,
    )
    purged = credex("relay", "purge", "--confirmed-before", "1s", "--json")
    assert purged.exit_code == 0, purged.stderr
    assert scalar(db_url, f"SELECT count(*) FROM outbox_message WHERE redemption_id = {cancelled}") == 0
    code, report = audit()
    assert code == 0, report


@pytest.mark.breaks_invariants
def test_a_shipment_for_a_redemption_the_points_side_never_made_is_found(shop, audit, warehouse_url):
    execute(
        warehouse_url,
        "INSERT INTO shipment_request (type, redemption_id, message_id, sku, quantity, address, carrier, "
        "express_no, created_at, updated_at) VALUES (2, 0, 'made-up', 'MUG', 1, 'Nowhere', 'sandbox', "
        "'SB-MADE-UP', :now, :now)",
        now=NOW.replace(tzinfo=None),
    )
    shipment = scalar(warehouse_url, "SELECT id FROM shipment_request WHERE redemption_id = 0")
    code, report = audit()
    assert code == 1
    assert found(report) == {("shipment.unknown_redemption", 0, shipment)}


@pytest.mark.breaks_invariants
def test_a_second_shipment_in_the_warehouse_database_is_found(shop, audit, warehouse_url):
    # An older warehouse schema without the UNIQUE redemption id, where a replay shipped twice.
    execute(
        warehouse_url,
        "CREATE TABLE shipment_copy AS SELECT * FROM shipment_request",
        "DROP TABLE shipment_request",
        "ALTER TABLE shipment_copy RENAME TO shipment_request",
        "INSERT INTO shipment_request (id, type, redemption_id, message_id, sku, quantity, address, "
        "carrier, express_no, created_at, updated_at) SELECT id + 100, type, redemption_id, message_id, "
        "sku, quantity, address, carrier, 'SB-AGAIN', created_at, updated_at FROM shipment_request "
        "WHERE redemption_id = :rid",
        rid=shop[0],
    )
    first = scalar(warehouse_url, f"SELECT min(id) FROM shipment_request WHERE redemption_id = {shop[0]}")
    code, report = audit()
    assert code == 1
    assert found(report) == {("shipment.once", shop[0]), ("shipment.express_no", shop[0], first)}
    again = next(v for v in report["violations"] if v["check"] == "shipment.express_no")
    assert again["expected"] == f"SB{shop[0]:010d}" and set(again["found"]) == {
        f"SB{shop[0]:010d}",
        "SB-AGAIN",
    }


@pytest.mark.breaks_invariants
def test_a_confirmed_redemption_whose_shipment_is_missing_or_differs_is_found(shop, audit, warehouse_url):
    execute(warehouse_url, "DELETE FROM shipment_request WHERE redemption_id = :rid", rid=shop[0])
    execute(
        warehouse_url,
        "UPDATE shipment_request SET express_no = 'SB-OTHER' WHERE redemption_id = :rid",
        rid=shop[1],
    )
    second = scalar(warehouse_url, "SELECT id FROM shipment_request")
    code, report = audit()
    assert code == 1
    assert found(report) == {("shipment.confirmed", shop[0]), ("shipment.express_no", shop[1], second)}


@pytest.mark.breaks_invariants
def test_stock_off_its_movements_or_below_zero_is_found(shop, audit, db_url, backend):
    # The catalog and the three redemptions recorded their movements: set 5, then -1 three times.
    kinds = scalar(db_url, "SELECT count(*) FROM stock_movement WHERE sku = 'MUG' AND kind = 'redeem'")
    assert kinds == 3
    code, report = audit()
    assert (code, report["violations"], report["skipped"]) == (0, [], [])

    execute(db_url, "UPDATE catalog_item SET stock = stock + 2 WHERE sku = 'MUG'")
    code, report = audit()
    assert code == 1
    assert report["violations"] == [{"check": "stock.movements", "ids": ["MUG"], "expected": 2, "found": 4}]

    if backend == "postgres":
        execute(db_url, "ALTER TABLE catalog_item DROP CONSTRAINT ck_catalog_item_stock_nonnegative")
        execute(db_url, "UPDATE catalog_item SET stock = -1 WHERE sku = 'MUG'")
    else:
        with get_engine(db_url).connect() as connection:
            connection.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
            connection.exec_driver_sql("UPDATE catalog_item SET stock = -1 WHERE sku = 'MUG'")
            connection.commit()
            connection.exec_driver_sql("PRAGMA ignore_check_constraints = OFF")
    code, report = audit()
    assert found(report) == {("catalog.stock_nonnegative", "MUG"), ("stock.movements", "MUG")}


@pytest.mark.breaks_invariants
def test_a_cancelled_redemption_without_its_refund_and_a_refund_of_a_live_one_are_found(shop, audit, db_url):
    execute(db_url, "UPDATE redemption SET status = 'cancelled' WHERE id = :rid", rid=shop[2])
    execute(
        db_url,
        "INSERT INTO ledger_entry (user_id, kind, ref, points, balance, operator, created_at, pending, debt) "
        "VALUES ('u1', 'redemption_refund', :ref, 10, 90, 'tester', :now, 0, 0)",
        ref=str(shop[1]),
        now=NOW.replace(tzinfo=None),
    )
    code, report = audit()
    assert code == 1
    refunds = {v["ids"][0]: v for v in report["violations"] if v["check"] == "redemption.refund_once"}
    assert refunds[shop[2]]["expected"] == {"refunds": 1, "points": 10}
    assert refunds[shop[2]]["found"] == {"status": "cancelled", "refunds": 0, "points": 0}
    assert refunds[shop[1]]["expected"] == {"refunds": 0, "points": 0}
    assert refunds[shop[1]]["found"] == {"status": "shipping", "refunds": 1, "points": 10}


def test_an_unmigrated_or_missing_database_is_refused_and_left_alone(credex, db_url, tmp_path, backend):
    missing = f"sqlite:///{tmp_path / 'nowhere.db'}"
    assert credex("award", "grant", "u1", "5", "--reason", "r").exit_code == 0  # the points side exists
    done = credex("audit", "verify", "--json", "--warehouse-database-url", missing)
    assert done.exit_code == 1 and json.loads(done.stderr)["error"]["code"] == "not_migrated"
    assert not (tmp_path / "nowhere.db").exists()
    done = credex("audit", "verify", "--warehouse-database-url", "mysql://x@y/z")
    assert done.exit_code == 2 and done.stderr.startswith("error: unsupported database")


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_after_a_real_pipeline_run_to_a_separate_warehouse_everything_verifies(
    credex, db_url, warehouse_url, rabbit, tmp_path
):
    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "9").exit_code == 0
    assert credex("award", "grant", "u1", "1000", "--reason", "welcome", "--ref", "w-1").exit_code == 0
    for n in range(4):
        assert credex("redeem", "create", "u1", "MUG", "--address", f"{n} High St").exit_code == 0
    with running_sandbox() as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path, warehouse_db_url=warehouse_url)
        try:
            assert pipeline.run("db", "upgrade").returncode == 0
            relay, warehouse = pipeline.relay(), pipeline.warehouse()
            pipeline.wait_all_confirmed(4)
            assert pipeline.stop(relay)[0] == 0 and pipeline.stop(warehouse)[0] == 0
            check_shipped_exactly_once(pipeline, 4)
            done = pipeline.run("audit", "verify", "--json")
        finally:
            pipeline.close()
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["violations"] == []
    assert report["checked"]["redemptions"] == report["checked"]["redemptions_with_shipments"] == 4
    assert scalar(db_url, "SELECT count(*) FROM shipment_request") == 0  # all in the warehouse's own


@pytest.mark.breaks_invariants
def test_a_refund_recorded_twice_is_found(shop, audit, db_url, backend):
    if backend == "sqlite":
        pytest.skip("SQLite cannot drop the unique (kind, ref) that makes a second refund impossible")
    execute(
        db_url,
        "ALTER TABLE ledger_entry DROP CONSTRAINT uq_ledger_entry_kind_ref",
        "UPDATE redemption SET status = 'cancelled' WHERE id = :rid",
        *(
            "INSERT INTO ledger_entry (user_id, kind, ref, points, balance, operator, created_at, "
            f"pending, debt) VALUES ('u2', 'redemption_refund', :ref, 10, {balance}, 'tester', now(), 0, 0)"
            for balance in (100, 110)
        ),
        "UPDATE account SET balance = 110 WHERE user_id = 'u2'",
        rid=shop[2],
        ref=str(shop[2]),
    )
    code, report = audit()
    assert code == 1
    refunds = [v for v in report["violations"] if v["check"] == "redemption.refund_once"]
    assert refunds == [
        {
            "check": "redemption.refund_once",
            "ids": [shop[2]],
            "expected": {"refunds": 1, "points": 10},
            "found": {"status": "cancelled", "refunds": 2, "points": 20},
        }
    ]


@pytest.mark.breaks_invariants
def test_a_database_failing_halfway_leaves_stdout_empty_and_says_why(shop, credex, db_url, warehouse_url):
    # Violations are found on the points side first; then the warehouse's table is gone.
    execute(db_url, "UPDATE account SET balance = balance + 5 WHERE user_id = 'u1'")
    execute(warehouse_url, "ALTER TABLE shipment_request RENAME TO shipment_request_gone")
    done = credex("audit", "verify", "--json", "--warehouse-database-url", warehouse_url)
    assert done.exit_code == 1, done.stderr
    assert done.stdout == ""  # never half a document a script would try to read
    error = json.loads(done.stderr)["error"]
    assert error["code"] == "schema_mismatch" and "shipment_request" in error["message"]


@pytest.mark.breaks_invariants
def test_ledger_entries_and_lots_whose_account_was_removed_are_found(shop, audit, db_url):
    """The balance check started from the accounts: a user's ledger (and lots) without an account
    row was never compared with anything."""
    by_hand(db_url, "DELETE FROM account WHERE user_id = 'u2'")
    code, report = audit()
    assert code == 1
    assert found(report) == {("account.ledger", "u2"), ("account.lots", "u2")}
    ledger = next(v for v in report["violations"] if v["check"] == "account.ledger")
    assert ledger["expected"] == {"balance": 90, "pending": 0, "debt": 0}
    assert ledger["found"] == {"balance": None, "pending": None, "debt": None}

    by_hand(db_url, "DELETE FROM lot_use WHERE lot_id IN (SELECT id FROM point_lot WHERE user_id = 'u2')")
    by_hand(db_url, "DELETE FROM point_lot WHERE user_id = 'u2'")
    code, report = audit()
    assert code == 1 and found(report) == {("account.ledger", "u2")}


@pytest.mark.breaks_invariants
def test_stock_made_unlimited_by_hand_is_found_and_a_set_to_unlimited_verifies(shop, audit, credex, db_url):
    execute(db_url, "UPDATE catalog_item SET stock = NULL WHERE sku = 'MUG'")
    code, report = audit()
    assert code == 1
    # The last stock set was 5, three redemptions took one each since.
    assert report["violations"] == [
        {"check": "stock.movements", "ids": ["MUG"], "expected": 2, "found": None}
    ]

    execute(db_url, "UPDATE catalog_item SET stock = 2 WHERE sku = 'MUG'")
    assert credex("catalog", "update", "MUG", "--stock", "unlimited").exit_code == 0
    code, report = audit()
    assert (code, report["violations"]) == (0, [])

    execute(db_url, "UPDATE catalog_item SET stock = 7 WHERE sku = 'MUG'")
    code, report = audit()
    assert report["violations"] == [
        {"check": "stock.movements", "ids": ["MUG"], "expected": None, "found": 7}
    ]


@pytest.mark.breaks_invariants
def test_a_table_missing_at_the_newest_revision_is_a_violation_not_a_skipped_check(shop, audit, db_url):
    execute(db_url, "DROP TABLE stock_movement")
    code, report = audit()
    assert code == 1 and report["skipped"] == []
    assert report["violations"] == [
        {
            "check": "schema.table",
            "ids": ["stock_movement"],
            "expected": f"present at revision {HEAD_REVISION}",
            "found": "missing",
        }
    ]


@pytest.mark.breaks_invariants
def test_a_deleted_redemption_leaves_its_ledger_entry_and_stock_movement_which_are_found(shop, audit, db_url):
    rid = shop[2]
    entry = scalar(db_url, f"SELECT id FROM ledger_entry WHERE kind = 'redemption' AND ref = '{rid}'")
    movement = scalar(db_url, f"SELECT id FROM stock_movement WHERE kind = 'redeem' AND ref = '{rid}'")
    execute(
        db_url,
        "DELETE FROM outbox_message WHERE redemption_id = :rid",
        "DELETE FROM redemption_event WHERE redemption_id = :rid",
        "DELETE FROM redemption WHERE id = :rid",
        rid=rid,
    )
    code, report = audit()
    assert code == 1
    assert report["violations"] == [
        {
            "check": "ledger.unknown_redemption",
            "ids": [entry, "redemption", str(rid)],
            "expected": "its redemption",
            "found": None,
        },
        {
            "check": "stock.unknown_redemption",
            "ids": [movement, "redeem", str(rid)],
            "expected": "its redemption",
            "found": None,
        },
    ]


@pytest.mark.breaks_invariants
def test_a_ledger_entry_removed_with_its_lot_and_the_sums_mended_is_found(
    shop, audit, credex, db_url, backend
):
    """Every sum still agrees; only the next entry's balance-after, which counted the removed
    one, tells."""
    for ref, points in (("x-u2", 20), ("y-u2", 5)):
        assert credex("award", "grant", "u2", points, "--reason", "r", "--ref", ref).exit_code == 0
    removed = scalar(db_url, "SELECT id FROM ledger_entry WHERE ref = 'x-u2'")
    after = scalar(db_url, "SELECT id FROM ledger_entry WHERE ref = 'y-u2'")
    statements = (
        "DELETE FROM point_lot WHERE entry_id = :removed",
        "DELETE FROM ledger_entry WHERE id = :removed",
        "UPDATE account SET balance = balance - 20, earned = earned - 20 WHERE user_id = 'u2'",
    )
    if backend == "sqlite":  # the guard dropped and put back
        guard = scalar(db_url, "SELECT sql FROM sqlite_master WHERE name = 'ledger_entry_no_delete'")
        statements = ("DROP TRIGGER ledger_entry_no_delete", *statements, guard)
    by_hand(db_url, *statements, removed=removed)
    code, report = audit()
    assert code == 1
    assert report["violations"] == [
        {"check": "ledger.running_balance", "ids": ["u2", after], "expected": 95, "found": 115}
    ]


def test_a_database_a_newer_credex_migrated_is_refused_as_every_command_refuses_it(credex, db_url):
    assert credex("award", "grant", "u1", "5", "--reason", "r").exit_code == 0
    execute(db_url, "UPDATE alembic_version SET version_num = '9999_future'")
    dispose_engines()  # no schema this process checked before counts
    errors = []
    for command in (("audit", "verify"), ("account", "show", "u1")):
        done = credex(*command, "--json")
        assert done.exit_code == 1 and done.stdout == ""
        errors.append(json.loads(done.stderr)["error"])
    assert errors[0] == errors[1]
    assert errors[0]["code"] == "not_migrated" and "a newer credex migrated it" in errors[0]["message"]
    execute(db_url, f"UPDATE alembic_version SET version_num = '{HEAD_REVISION}'")


def test_a_sqlite_database_named_in_sqlite_uri_form_is_read(shop, db_url, warehouse_url, backend, tmp_path):
    if backend != "sqlite":
        pytest.skip("SQLite's URI form")
    from typer.testing import CliRunner

    from credex.cli import app

    def verify(points: str, warehouse: str):
        return CliRunner().invoke(
            app,
            ["--database-url", points, "audit", "verify", "--json", "--warehouse-database-url", warehouse],
        )

    def uri(url: str, mode: str) -> str:
        return f"sqlite:///file:{url.removeprefix('sqlite:///')}?mode={mode}&uri=true"

    done = verify(uri(db_url, "ro"), uri(warehouse_url, "ro"))
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["violations"] == []

    missing = tmp_path / "nowhere.db"
    done = verify(uri(db_url, "ro"), uri(f"sqlite:///{missing}", "rwc"))
    assert done.exit_code == 1 and json.loads(done.stderr)["error"]["code"] == "not_migrated"
    assert not missing.exists()


@pytest.mark.parametrize("name", ["credex.db", "a b#1%.db"])
def test_a_sqlite_file_is_read_without_a_byte_changed_even_its_journal_mode(
    shop, db_url, warehouse_url, backend, tmp_path, name
):
    """An auditor may read a copy kept in the older rollback-journal mode (a backup, a file
    handed over): opening it the way the other commands do would switch it to WAL."""
    if backend != "sqlite":
        pytest.skip("SQLite's journal mode")
    import hashlib
    import shutil
    import sqlite3

    from typer.testing import CliRunner

    from credex.cli import app
    from credex.db.engine import dispose_engines

    dispose_engines()  # the fixture's pooled connections leave the file as it is
    folder = tmp_path / "handed-over"
    folder.mkdir()
    files = {"points": folder / name, "warehouse": folder / f"warehouse-{name}"}
    for copy, url in zip(files.values(), (db_url, warehouse_url), strict=True):
        shutil.copyfile(url.removeprefix("sqlite:///"), copy)
        with sqlite3.connect(copy) as connection:
            assert connection.execute("PRAGMA journal_mode = DELETE").fetchone() == ("delete",)
        connection.close()

    def state() -> dict:
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}

    before = state()
    done = CliRunner().invoke(
        app,
        [
            "--database-url", f"sqlite:///{files['points']}", "audit", "verify", "--json",
            "--warehouse-database-url", f"sqlite:///{files['warehouse']}",
        ],
    )  # fmt: skip
    dispose_engines()
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["violations"] == [] and report["checked"]["redemptions"] == 3
    assert state() == before  # the same files, no -wal or -shm beside them, not a byte changed
    for copy in files.values():  # the header's write and read versions: 1 is the rollback journal, 2 WAL
        assert copy.read_bytes()[18:20] == b"\x01\x01"
