"""Shoppers spend points on gifts; every redemption leaves exactly one outbox message."""

import json

import pytest


@pytest.fixture
def shop(credex):
    credex("catalog", "add", "SHAMPOO-500", "--name", "Shampoo", "--points", "20000", "--stock", "2")
    credex("award", "grant", "u-1001", "50000", "--reason", "opening balance", "--ref", "open-u-1001")
    return credex


def test_a_redemption_takes_points_and_stock_and_writes_one_outbox_message(shop):
    result = shop("redeem", "create", "u-1001", "SHAMPOO-500", "--address", "8 Long Road", "--json")
    assert result.exit_code == 0, result.stderr
    redemption = result.json()
    assert redemption["points"] == 20000 and redemption["balance"] == 30000
    assert redemption["status"] == "pending" and redemption["duplicate"] is False
    assert redemption["express_no"] is None and redemption["carrier"] is None

    assert shop("account", "show", "u-1001", "--json").json()["balance"] == 30000
    assert shop("catalog", "list", "--json").json()[0]["stock"] == 1
    messages = shop("relay", "list", "--json").json()
    assert len(messages) == 1
    assert messages[0]["message_id"] == redemption["message_id"]
    assert messages[0]["redemption_id"] == redemption["redemption_id"]
    assert messages[0]["state"] == "pending" and messages[0]["attempts"] == 0
    assert shop("relay", "status", "--json").json()["pending"] == 1
    history = shop("account", "history", "u-1001", "--json").json()
    assert history[0]["kind"] == "redemption" and history[0]["points"] == -20000


def test_the_outbox_body_follows_the_message_contract(shop, db_url):
    redemption = shop(
        "redeem", "create", "u-1001", "SHAMPOO-500", "--address", "8 Long Road", "--json"
    ).json()
    from sqlalchemy import text

    from credex.db.engine import get_engine

    with get_engine(db_url).connect() as connection:
        routing_key, body = connection.execute(text("SELECT routing_key, body FROM outbox_message")).one()
    assert routing_key == "redemption.created"
    assert json.loads(body) == {
        "message_id": redemption["message_id"],
        "redemption_id": redemption["redemption_id"],
        "user_id": "u-1001",
        "sku": "SHAMPOO-500",
        "quantity": 1,
        "points": 20000,
        "address": "8 Long Road",
        "created_at": redemption["created_at"],
    }


def test_a_redemption_that_would_overdraw_is_refused_and_changes_nothing(shop):
    result = shop("redeem", "create", "u-1001", "SHAMPOO-500", "--quantity", "3", "--address", "x", "--json")
    assert result.exit_code == 1
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "insufficient_points"
    assert "60000" in error["message"]
    assert shop("account", "show", "u-1001", "--json").json()["balance"] == 50000
    assert shop("relay", "list", "--json").json() == []
    assert shop("redeem", "list", "--json").json() == []


def test_out_of_stock_is_refused_and_the_points_stay(shop):
    shop("award", "grant", "u-1001", "50000", "--reason", "more")
    assert (
        shop("redeem", "create", "u-1001", "SHAMPOO-500", "--quantity", "2", "--address", "x").exit_code == 0
    )
    refused = shop("redeem", "create", "u-1001", "SHAMPOO-500", "--address", "x", "--json")
    assert refused.exit_code == 1 and '"out_of_stock"' in refused.stderr
    assert shop("account", "show", "u-1001", "--json").json()["balance"] == 60000
    assert len(shop("relay", "list", "--json").json()) == 1


def test_a_request_id_makes_a_redemption_idempotent(shop):
    args = ("redeem", "create", "u-1001", "SHAMPOO-500", "--address", "x", "--request-id", "req-1", "--json")
    first = shop(*args).json()
    again = shop(*args)
    assert again.exit_code == 0
    assert again.json() == {**first, "duplicate": True}
    assert shop("account", "show", "u-1001", "--json").json()["balance"] == 30000
    other = shop(
        "redeem", "create", "u-1001", "SHAMPOO-500", "--address", "elsewhere", "--request-id", "req-1"
    )
    assert other.exit_code == 1 and "req-1" in other.stderr


@pytest.mark.parametrize(
    ("args", "code", "exit_code"),
    [
        (["u-1001", "NOPE", "--address", "x"], "unknown_sku", 1),
        (["ghost", "SHAMPOO-500", "--address", "x"], "unknown_user", 1),
        (["u-1001", "SHAMPOO-500", "--address", "x", "--quantity", "0"], "invalid_input", 2),
        (["u-1001", "SHAMPOO-500", "--address", "x", "--quantity", "-1"], "invalid_input", 2),
        (["u-1001", "SHAMPOO-500", "--address", "x", "--quantity", "two"], "invalid_input", 2),
        (
            ["u-1001", "SHAMPOO-500", "--address", "x", "--quantity", "99999999999999999999"],
            "invalid_input",
            2,
        ),
        (["u-1001", "SHAMPOO-500", "--address", "  "], "invalid_input", 2),
    ],
)
def test_bad_redemptions_are_refused_with_a_clear_error(shop, args, code, exit_code):
    result = shop("redeem", "create", *args, "--json")
    assert result.exit_code == exit_code
    assert json.loads(result.stderr)["error"]["code"] == code
    assert result.stdout == ""
    assert shop("account", "show", "u-1001", "--json").json()["balance"] == 50000
    assert shop("relay", "status", "--json").json()["pending"] == 0


def test_an_inactive_gift_cannot_be_redeemed(shop):
    shop("catalog", "update", "SHAMPOO-500", "--inactive")
    result = shop("redeem", "create", "u-1001", "SHAMPOO-500", "--address", "x")
    assert result.exit_code == 1 and "inactive" in result.stderr


def test_show_and_list_find_redemptions(shop):
    shop("catalog", "add", "PEN", "--name", "Pen", "--points", "10")
    shop("award", "grant", "u-2", "100", "--reason", "r")
    a = shop("redeem", "create", "u-1001", "PEN", "--address", "x", "--json").json()
    b = shop("redeem", "create", "u-2", "PEN", "--address", "y", "--quantity", "2", "--json").json()
    shown = shop("redeem", "show", str(a["redemption_id"]), "--json").json()
    assert shown["redemption_id"] == a["redemption_id"] and shown["message_state"] == "pending"
    assert [r["redemption_id"] for r in shop("redeem", "list", "--json").json()] == [
        b["redemption_id"],
        a["redemption_id"],
    ]
    assert [r["user_id"] for r in shop("redeem", "list", "--user", "u-2", "--json").json()] == ["u-2"]
    assert shop("redeem", "list", "--status", "shipping", "--json").json() == []
    missing = shop("redeem", "show", "999", "--json")
    assert missing.exit_code == 1 and '"unknown_redemption"' in missing.stderr
    assert shop("redeem", "list", "--status", "lost").exit_code == 2
