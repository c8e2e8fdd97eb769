"""Upgrading a warehouse that already holds shipment requests to the row state machine (0005):
waybills stay waybills, open requests stay open under the key they were asked with, and express
numbers a carrier handed out twice stop the upgrade with a message that lists them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from credex.cli import app
from credex.db.engine import dispose_engines, get_engine, schema_revision
from credex.db.models import UTCDateTime
from tests.test_migration_lifecycle import empty_url, migrate  # noqa: F401 - the fixture

EARLIER = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)

# The table as revision 0001 made it (0002 and 0003 left it alone).
shipment_0001 = sa.table(
    "shipment_request",
    sa.column("type", sa.Integer),
    sa.column("redemption_id", sa.BigInteger),
    sa.column("message_id", sa.String),
    sa.column("sku", sa.String),
    sa.column("quantity", sa.Integer),
    sa.column("address", sa.Text),
    sa.column("carrier", sa.String),
    sa.column("express_no", sa.String),
    sa.column("created_at", UTCDateTime),
    sa.column("updated_at", UTCDateTime),
)


def fill_at_0003(url: str, waybills: list[str | None]) -> None:
    """One shipment request per express number given (None: still waiting for its waybill)."""
    with get_engine(url).begin() as connection:
        connection.execute(
            sa.insert(shipment_0001),
            [
                {
                    "type": 2,
                    "redemption_id": 100 + n,
                    "message_id": f"00000000-0000-4000-8000-{n:012d}",
                    "sku": "MUG",
                    "quantity": 1,
                    "address": f"{n} High St",
                    "carrier": None if number is None else "sandbox",
                    "express_no": number,
                    "created_at": EARLIER,
                    "updated_at": EARLIER,
                }
                for n, number in enumerate(waybills, start=1)
            ],
        )


def db_upgrade(url: str):
    return CliRunner().invoke(app, ["--database-url", url, "db", "upgrade", "--json"], catch_exceptions=False)


def test_existing_requests_get_their_status_and_keep_the_key_they_were_asked_with(empty_url):  # noqa: F811
    migrate(empty_url, "0003")
    fill_at_0003(empty_url, ["SIM0000000001", None, "SIM0000000003"])

    result = db_upgrade(empty_url)
    assert result.exit_code == 0, result.stderr
    with get_engine(empty_url).connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT id, status, express_no, idempotency_key, asked_at IS NOT NULL, sku "
                "FROM shipment_request ORDER BY id"
            )
        ).all()
    assert [tuple(row) for row in rows] == [
        (1, "waybill", "SIM0000000001", "redemption-101", True, "MUG"),
        (2, "requested", None, "redemption-102", True, "MUG"),
        (3, "waybill", "SIM0000000003", "redemption-103", True, "MUG"),
    ]
    # From now on a number is unique per carrier, and a tombstone needs no sku.
    with pytest.raises(sa.exc.IntegrityError), get_engine(empty_url).begin() as connection:
        connection.execute(sa.text("UPDATE shipment_request SET express_no = 'SIM0000000001' WHERE id = 3"))
    with get_engine(empty_url).begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO shipment_request (type, redemption_id, status, created_at, updated_at) "
                "VALUES (2, 999, 'cancelled', :t, :t)"
            ),
            {"t": EARLIER.replace(tzinfo=None)},
        )


def test_duplicate_express_numbers_stop_the_upgrade_with_a_list_and_change_nothing(empty_url):  # noqa: F811
    migrate(empty_url, "0003")
    fill_at_0003(empty_url, ["SIM0000000001", "SIM0000000002", "SIM0000000001", None])

    result = db_upgrade(empty_url)
    assert result.exit_code == 1
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "conflict"
    message = error["message"]
    assert "sandbox SIM0000000001 on shipment requests 1 (redemption 101), 3 (redemption 103)" in message
    assert "SIM0000000002" not in message and "credex db upgrade" in message
    dispose_engines()
    assert schema_revision(get_engine(empty_url)) == "0003"
    with get_engine(empty_url).connect() as connection:
        columns = {c["name"] for c in sa.inspect(connection).get_columns("shipment_request")}
    assert "status" not in columns

    # Fixed as the message says, the upgrade goes through.
    with get_engine(empty_url).begin() as connection:
        connection.execute(
            sa.text("UPDATE shipment_request SET carrier = NULL, express_no = NULL WHERE id = 3")
        )
    result = db_upgrade(empty_url)
    assert result.exit_code == 0, result.stderr
    with get_engine(empty_url).connect() as connection:
        statuses = connection.execute(sa.text("SELECT status FROM shipment_request ORDER BY id")).scalars()
        assert list(statuses) == ["waybill", "waybill", "requested", "requested"]


def test_the_shipment_migration_downgrades_and_upgrades_again(empty_url):  # noqa: F811
    migrate(empty_url, "0003")
    fill_at_0003(empty_url, ["SIM0000000001", None])
    assert db_upgrade(empty_url).exit_code == 0
    migrate(empty_url, "0003", down=True)
    dispose_engines()
    assert db_upgrade(empty_url).exit_code == 0
    with get_engine(empty_url).connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM shipment_request")).scalar() == 2


@pytest.mark.rabbitmq
def test_a_waybill_from_before_the_upgrade_is_cancelled_at_the_carrier_under_its_old_key(
    empty_url,  # noqa: F811
    rabbit,
    carrier_sandbox,
):
    # Before 0005 the warehouse asked with the key redemption-<id> and kept no shipment id.
    parcel = carrier_sandbox.create_shipment("redemption-101", address="1 High St", sku="MUG")
    migrate(empty_url, "0003")
    with get_engine(empty_url).begin() as connection:
        t = {"t": EARLIER.replace(tzinfo=None) if empty_url.startswith("sqlite") else EARLIER}
        connection.execute(sa.text("INSERT INTO account VALUES ('u-1001', 0, 10, 10, :t, :t, 0, 0)"), t)
        connection.execute(
            sa.text("INSERT INTO catalog_item VALUES ('MUG', 'Mug', 10, NULL, true, :t, :t)"), t
        )
        connection.execute(
            sa.text(
                "INSERT INTO redemption (id, user_id, sku, quantity, points, balance, address, status, "
                "message_id, operator, created_at, updated_at) VALUES (101, 'u-1001', 'MUG', 1, 10, 0, "
                "'1 High St', 'pending', '00000000-0000-4000-8000-000000000001', 'old-admin', :t, :t)"
            ),
            t,
        )
    fill_at_0003(empty_url, [parcel["tracking_number"]])
    assert db_upgrade(empty_url).exit_code == 0

    from tests.warehouse_messages import answers, cancel_body, rows, send

    def warehouse_once():
        result = CliRunner().invoke(
            app,
            ["--database-url", empty_url, "warehouse", "run", "--once", "--json"],
            env={"CREDEX_LOGISTICS_URL": carrier_sandbox.url},
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    warehouse_once()  # declares the queues
    assert rows(empty_url)[101]["carrier_shipment_id"] is None
    send(rabbit, cancel_body(101))
    assert warehouse_once()["cancelled"] == 1
    ((kind, body, _),) = answers(rabbit)
    assert (kind, body["outcome"]) == ("shipment.cancelled", "cancelled")
    (after,) = carrier_sandbox.shipments()
    assert after["status"] == "cancelled" and after["create_calls"] == 2  # asked again, same waybill
    assert rows(empty_url)[101]["status"] == "cancelled"
