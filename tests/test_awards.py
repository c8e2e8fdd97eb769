"""Shoppers earn points by buying and reviewing; support staff grant points by hand."""

import pytest


def test_a_purchase_earns_floor_of_amount_times_rate(credex):
    result = credex("award", "purchase", "u-1001", "--order", "o-1", "--amount", "129.90", "--json")
    assert result.exit_code == 0, result.stderr
    entry = result.json()
    assert entry["points"] == 129 and entry["balance"] == 129 and entry["kind"] == "purchase"
    assert entry["ref"] == "o-1" and entry["duplicate"] is False
    assert entry["created_at"].endswith("+00:00")


def test_the_purchase_rate_comes_from_the_environment(credex):
    result = credex(
        "award",
        "purchase",
        "u1",
        "--order",
        "o-1",
        "--amount",
        "10.55",
        "--json",
        env={"CREDEX_PURCHASE_RATE": "2.5"},
    )
    assert result.json()["points"] == 26  # floor(26.375)


def test_a_repeated_order_counts_once_and_returns_the_original(credex):
    first = credex("award", "purchase", "u1", "--order", "o-1", "--amount", "50", "--json").json()
    again = credex("award", "purchase", "u1", "--order", "o-1", "--amount", "50.00", "--json")
    assert again.exit_code == 0
    assert again.json() == {**first, "duplicate": True}
    assert credex("account", "show", "u1", "--json").json()["balance"] == 50


def test_an_order_reused_with_other_content_is_a_conflict(credex):
    credex("award", "purchase", "u1", "--order", "o-1", "--amount", "50")
    other_amount = credex("award", "purchase", "u1", "--order", "o-1", "--amount", "60", "--json")
    other_user = credex("award", "purchase", "u2", "--order", "o-1", "--amount", "50", "--json")
    assert other_amount.exit_code == 1 and other_user.exit_code == 1
    assert '"code": "conflict"' in other_amount.stderr
    assert credex("account", "show", "u1", "--json").json()["balance"] == 50
    assert credex("account", "show", "u2").exit_code == 1


def test_reviews_earn_more_with_photos(credex):
    plain = credex("award", "review", "u1", "--review", "r-1", "--json").json()
    photos = credex("award", "review", "u1", "--review", "r-2", "--photos", "--json").json()
    assert (plain["points"], photos["points"]) == (10, 20)
    assert photos["balance"] == 30
    conflict = credex("award", "review", "u1", "--review", "r-1", "--photos")
    assert conflict.exit_code == 1


def test_a_negative_grant_never_takes_a_balance_below_zero(credex):
    credex("award", "grant", "u1", "100", "--reason", "welcome", "--ref", "g-1")
    refused = credex("award", "grant", "u1", "-101", "--reason", "correction", "--json")
    assert refused.exit_code == 1
    assert '"insufficient_points"' in refused.stderr
    taken = credex("award", "grant", "u1", "-100", "--reason", "correction", "--json")
    assert taken.exit_code == 0 and taken.json()["balance"] == 0
    history = credex("account", "history", "u1", "--json").json()
    assert [e["points"] for e in history] == [-100, 100]


def test_a_grant_ref_is_idempotent(credex):
    first = credex("award", "grant", "u1", "25", "--reason", "campaign", "--ref", "c-7", "--json").json()
    again = credex("award", "grant", "u1", "25", "--reason", "campaign", "--ref", "c-7", "--json").json()
    assert again["duplicate"] is True and again["entry_id"] == first["entry_id"]
    assert credex("award", "grant", "u1", "26", "--reason", "campaign", "--ref", "c-7").exit_code == 1


def test_every_change_records_its_operator_and_reason(credex):
    credex("award", "grant", "u1", "5", "--reason", "goodwill", "--operator", "alice")
    credex("award", "grant", "u1", "6", "--reason", "env operator")
    history = credex("account", "history", "u1", "--json").json()
    assert [(e["operator"], e["reason"]) for e in history] == [
        ("tester", "env operator"),
        ("alice", "goodwill"),
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["purchase", "u1", "--order", "o", "--amount", "-5"],
        ["purchase", "u1", "--order", "o", "--amount", "abc"],
        ["purchase", "u1", "--order", "o", "--amount", "NaN"],
        ["purchase", "u1", "--order", "", "--amount", "5"],
        ["grant", "u1", "1.5", "--reason", "x"],
        ["grant", "u1", "0", "--reason", "x"],
        ["grant", "u1", "9223372036854775808", "--reason", "x"],
        ["grant", "u1", "10", "--reason", " "],
        ["grant", " ", "10", "--reason", "x"],
    ],
)
def test_bad_award_input_exits_2_with_one_line_and_writes_nothing(credex, args):
    result = credex("award", *args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert credex("account", "show", "u1").exit_code == 1  # no account was created


def test_a_balance_cannot_overflow_64_bits(credex):
    assert credex("award", "grant", "u1", str(2**63 - 1), "--reason", "max").exit_code == 0
    result = credex("award", "grant", "u1", "1", "--reason", "one more")
    assert result.exit_code == 2
    assert credex("account", "show", "u1", "--json").json()["balance"] == 2**63 - 1
