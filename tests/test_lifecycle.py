"""The points lifecycle as shoppers and support staff meet it: return windows, refunds that
take points back (and leave debt when the points are gone), and points that expire."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time

from tests.test_lifecycle_invariants import check_lifecycle_invariants

START = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)


@pytest.fixture
def clock():
    """A frozen clock; ``clock.day(n)`` moves it to n days after START."""
    with freeze_time(START, ignore=["_pytest"]) as frozen:

        def day(n: float) -> None:
            frozen.move_to(START + timedelta(days=n))

        frozen.day = day
        yield frozen


@pytest.fixture
def shop(credex):
    """credex with a gift to spend points on; every call must succeed unless told otherwise."""

    def run(*args, ok: bool = True):
        result = credex(*args)
        if ok:
            assert result.exit_code == 0, result.stderr
        return result

    run("catalog", "add", "MUG", "--name", "Mug", "--points", "60")
    return run


def account(shop, user="u1") -> dict:
    return shop("account", "show", user, "--json").json()


def history(shop, user="u1") -> list[dict]:
    return shop("account", "history", user, "--json").json()


def test_buy_earn_spend_refund_leaves_debt_that_the_next_review_pays_first(shop, clock, db_url):
    shop("award", "purchase", "u1", "--order", "o-1", "--amount", "100", "--json")
    shop("redeem", "create", "u1", "MUG", "--address", "1 High St")
    clock.day(3)
    refund = shop("award", "refund", "u1", "--order", "o-1", "--refund", "rf-1", "--json").json()
    assert (refund["clawback"], refund["points"], refund["debt"], refund["balance"]) == (100, -40, 60, 0)
    assert {k: account(shop)[k] for k in ("balance", "pending", "debt")} == {
        "balance": 0,
        "pending": 0,
        "debt": 60,
    }
    refused = shop("redeem", "create", "u1", "MUG", "--address", "1 High St", "--json", ok=False)
    assert refused.exit_code == 1 and '"insufficient_points"' in refused.stderr

    clock.day(5)
    review = shop("award", "review", "u1", "--review", "rv-1", "--photos", "--json").json()
    assert (review["points"], review["debt"], review["balance"]) == (0, -20, 0)
    grant = shop("award", "grant", "u1", "100", "--reason", "apology", "--ref", "g-1", "--json").json()
    assert (grant["points"], grant["debt"], grant["balance"]) == (60, -40, 60)
    assert {k: account(shop)[k] for k in ("balance", "debt")} == {"balance": 60, "debt": 0}

    entries = history(shop)
    assert [(e["kind"], e["points"], e.get("debt")) for e in entries] == [
        ("grant", 60, -40),
        ("review", 0, -20),
        ("refund", -40, 60),
        ("redemption", -60, None),
        ("purchase", 100, None),
    ]
    check_lifecycle_invariants(db_url)


def test_a_refund_during_the_return_window_takes_only_pending_points(shop, clock, db_url, monkeypatch):
    monkeypatch.setenv("CREDEX_PENDING_DAYS", "14")
    shop("award", "grant", "u1", "50", "--reason", "welcome", "--ref", "g-1")
    bought = shop("award", "purchase", "u1", "--order", "o-1", "--amount", "100", "--json").json()
    assert (bought["points"], bought["pending"], bought["balance"]) == (0, 100, 50)

    clock.day(3)
    refund = shop("award", "refund", "u1", "--order", "o-1", "--refund", "rf-1", "--json").json()
    assert (refund["clawback"], refund["pending"], refund["points"], refund["debt"]) == (100, -100, 0, 0)
    assert {k: account(shop)[k] for k in ("balance", "pending", "debt")} == {
        "balance": 50,
        "pending": 0,
        "debt": 0,
    }
    clock.day(15)
    settled = shop("award", "settle", "--json").json()
    assert settled["points"] == 0
    assert account(shop)["balance"] == 50
    check_lifecycle_invariants(db_url)


def test_pending_points_cannot_be_spent_until_the_window_has_passed(shop, clock, db_url, monkeypatch):
    monkeypatch.setenv("CREDEX_PENDING_DAYS", "14")
    shop("award", "purchase", "u1", "--order", "o-1", "--amount", "100")
    refused = shop("redeem", "create", "u1", "MUG", "--address", "1 High St", "--json", ok=False)
    assert refused.exit_code == 1 and '"insufficient_points"' in refused.stderr

    clock.day(13)
    assert shop("award", "settle", "--json").json()["lots"] == 0  # the window is not over yet
    clock.day(14)
    settled = shop("award", "settle", "--json").json()
    assert {k: settled[k] for k in ("accounts", "lots", "points", "debt_paid")} == {
        "accounts": 1,
        "lots": 1,
        "points": 100,
        "debt_paid": 0,
    }
    assert {k: account(shop)[k] for k in ("balance", "pending")} == {"balance": 100, "pending": 0}
    assert shop("redeem", "create", "u1", "MUG", "--address", "1 High St", "--json").json()["balance"] == 40
    assert [(e["kind"], e["points"], e.get("pending")) for e in history(shop)][:2] == [
        ("redemption", -60, None),
        ("settle", 100, -100),
    ]
    check_lifecycle_invariants(db_url)


def test_a_partial_refund_in_the_window_leaves_the_rest_to_settle(shop, clock, db_url, monkeypatch):
    monkeypatch.setenv("CREDEX_PENDING_DAYS", "14")
    shop("award", "purchase", "u1", "--order", "o-1", "--amount", "100")
    clock.day(2)
    partial = shop(
        "award", "refund", "u1", "--order", "o-1", "--refund", "rf-1", "--amount", "30", "--json"
    ).json()
    assert (partial["clawback"], partial["pending"]) == (30, -30)
    clock.day(20)
    assert shop("award", "settle", "--json").json()["points"] == 70
    assert {k: account(shop)[k] for k in ("balance", "pending")} == {"balance": 70, "pending": 0}
    check_lifecycle_invariants(db_url)


def test_settling_pays_the_debt_before_points_reach_the_balance(shop, clock, db_url, monkeypatch):
    monkeypatch.setenv("CREDEX_PENDING_DAYS", "0")
    shop("award", "purchase", "u1", "--order", "o-1", "--amount", "60")
    shop("redeem", "create", "u1", "MUG", "--address", "1 High St")
    monkeypatch.setenv("CREDEX_PENDING_DAYS", "14")
    shop("award", "purchase", "u1", "--order", "o-2", "--amount", "100")  # pending
    shop("award", "refund", "u1", "--order", "o-1", "--refund", "rf-1")  # balance 0: all debt
    assert {k: account(shop)[k] for k in ("balance", "pending", "debt")} == {
        "balance": 0,
        "pending": 100,
        "debt": 60,
    }
    clock.day(14)
    settled = shop("award", "settle", "--json").json()
    assert (settled["points"], settled["debt_paid"]) == (100, 60)
    assert {k: account(shop)[k] for k in ("balance", "pending", "debt")} == {
        "balance": 40,
        "pending": 0,
        "debt": 0,
    }
    assert history(shop)[0] | {"created_at": None, "entry_id": None} == {
        "entry_id": None,
        "kind": "settle",
        "ref": history(shop)[0]["ref"],
        "points": 40,
        "pending": -100,
        "debt": -60,
        "balance": 40,
        "operator": "tester",
        "reason": "order o-2: return window over",
        "created_at": None,
    }
    check_lifecycle_invariants(db_url)


def test_partial_refunds_never_take_back_more_than_the_order_earned(shop, db_url, monkeypatch):
    monkeypatch.setenv("CREDEX_PURCHASE_RATE", "2")
    shop("award", "purchase", "u1", "--order", "o-1", "--amount", "50")  # 100 points
    shop("award", "grant", "u1", "500", "--reason", "other points", "--ref", "g-1")
    taken = []
    for refund_id, amount in [("rf-1", "15"), ("rf-2", "25.99"), ("rf-3", "30"), ("rf-4", "5")]:
        refund = shop(
            "award", "refund", "u1", "--order", "o-1", "--refund", refund_id, "--amount", amount, "--json"
        ).json()
        taken.append(refund["clawback"])
    assert taken == [30, 51, 19, 0]  # 60 and 10 asked for after 81 of the 100 were taken back
    full = shop("award", "refund", "u1", "--order", "o-1", "--refund", "rf-5", "--json").json()
    assert full["clawback"] == 0
    assert account(shop)["balance"] == 600 - 100
    check_lifecycle_invariants(db_url)


def test_a_refund_is_idempotent_on_its_id_and_refuses_unknown_orders(shop, db_url):
    shop("award", "purchase", "u1", "--order", "o-1", "--amount", "100")
    shop("award", "purchase", "u2", "--order", "o-2", "--amount", "100")
    first = shop("award", "refund", "u1", "--order", "o-1", "--refund", "rf-1", "--amount", "40", "--json")
    again = shop("award", "refund", "u1", "--order", "o-1", "--refund", "rf-1", "--amount", "40.00", "--json")
    assert again.json() == {**first.json(), "duplicate": True}

    other_amount = shop(
        "award", "refund", "u1", "--order", "o-1", "--refund", "rf-1", "--amount", "41", "--json", ok=False
    )
    assert other_amount.exit_code == 1 and '"code": "conflict"' in other_amount.stderr
    unknown = shop("award", "refund", "u1", "--order", "o-404", "--refund", "rf-2", "--json", ok=False)
    someone_elses = shop("award", "refund", "u1", "--order", "o-2", "--refund", "rf-3", ok=False)
    assert unknown.exit_code == 1 and '"code": "unknown_order"' in unknown.stderr
    assert someone_elses.exit_code == 1 and someone_elses.stderr.startswith("error: u1 has no purchase")
    bad = shop("award", "refund", "u1", "--order", "o-1", "--refund", "rf-4", "--amount", "-3", ok=False)
    assert bad.exit_code == 2
    assert account(shop)["balance"] == 60 and account(shop, "u2")["balance"] == 100
    check_lifecycle_invariants(db_url)


def test_points_earned_400_days_ago_expire_while_newer_ones_do_not(shop, clock, db_url, monkeypatch):
    monkeypatch.setenv("CREDEX_EXPIRY_DAYS", "365")
    shop("award", "grant", "u1", "100", "--reason", "welcome", "--ref", "g-old")
    clock.day(200)
    shop("award", "review", "u1", "--review", "rv-1")
    clock.day(400)
    expired = shop("award", "expire", "--json").json()
    assert (expired["accounts"], expired["lots"], expired["points"]) == (1, 1, 100)
    shown = account(shop)
    assert shown["balance"] == 10
    assert shown["expiring"] == [{"points": 10, "on": "2026-07-25"}]  # day 200 + 365
    newest = history(shop)[0]
    assert (newest["kind"], newest["points"], newest["balance"]) == ("expiry", -100, 10)
    assert newest["reason"] == "grant g-old: expired, available since 2025-01-06"
    check_lifecycle_invariants(db_url)


def test_a_redemption_uses_the_oldest_points_first_so_fewer_expire(shop, clock, db_url, monkeypatch):
    monkeypatch.setenv("CREDEX_EXPIRY_DAYS", "365")
    shop("award", "grant", "u1", "100", "--reason", "first", "--ref", "g-1")
    clock.day(100)
    shop("award", "grant", "u1", "100", "--reason", "second", "--ref", "g-2")
    assert account(shop)["expiring"] == [
        {"points": 100, "on": "2026-01-06"},
        {"points": 100, "on": "2026-04-16"},
    ]
    clock.day(200)
    shop("redeem", "create", "u1", "MUG", "--address", "1 High St")
    assert [e["points"] for e in account(shop)["expiring"]] == [40, 100]
    clock.day(370)
    assert shop("award", "expire", "--json").json()["points"] == 40
    assert account(shop)["balance"] == 100
    check_lifecycle_invariants(db_url)


def test_expire_and_settle_run_twice_change_nothing_the_second_time(shop, clock, db_url, monkeypatch):
    monkeypatch.setenv("CREDEX_EXPIRY_DAYS", "30")
    monkeypatch.setenv("CREDEX_PENDING_DAYS", "7")
    for user in ("u1", "u2"):
        shop("award", "purchase", user, "--order", f"o-{user}", "--amount", "80")
        shop("award", "review", user, "--review", f"rv-{user}")
    clock.day(10)
    first_settle = shop("award", "settle", "--json").json()
    second_settle = shop("award", "settle", "--json").json()
    assert (first_settle["lots"], first_settle["points"]) == (2, 160)
    assert (second_settle["accounts"], second_settle["lots"], second_settle["points"]) == (0, 0, 0)
    clock.day(31)  # the reviews (available on day 0) have lapsed, the purchases (day 7) not yet
    first_expire = shop("award", "expire", "--json").json()
    entries = len(history(shop, "u1")) + len(history(shop, "u2"))
    second_expire = shop("award", "expire", "--json").json()
    assert (first_expire["lots"], first_expire["points"]) == (2, 20)
    assert (second_expire["lots"], second_expire["points"]) == (0, 0)
    assert len(history(shop, "u1")) + len(history(shop, "u2")) == entries
    assert account(shop)["balance"] == 80
    human = shop("award", "expire")
    assert "points" in human.stdout and "0" in human.stdout
    check_lifecycle_invariants(db_url)


def test_account_show_and_history_read_well_without_json(shop, clock, monkeypatch):
    monkeypatch.setenv("CREDEX_EXPIRY_DAYS", "365")
    shop("award", "purchase", "u1", "--order", "o-1", "--amount", "100")
    shop("redeem", "create", "u1", "MUG", "--address", "1 High St")
    shop("award", "refund", "u1", "--order", "o-1", "--refund", "rf-1")
    shown = shop("account", "show", "u1").stdout
    assert "debt" in shown and "60" in shown and "pending" in shown
    table = shop("account", "history", "u1").stdout
    assert "refund" in table and "debt" in table
    refund = shop("award", "refund", "u1", "--order", "o-1", "--refund", "rf-1").stdout
    assert "already recorded" in refund
