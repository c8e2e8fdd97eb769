"""Support staff look at balances and their history."""


def test_account_show_sums_what_was_earned_and_redeemed(credex):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "30")
    credex("award", "purchase", "u1", "--order", "o-1", "--amount", "100")
    credex("redeem", "create", "u1", "MUG", "--address", "1 High St")
    account = credex("account", "show", "u1", "--json").json()
    assert {k: account[k] for k in ("user_id", "balance", "earned", "redeemed")} == {
        "user_id": "u1",
        "balance": 70,
        "earned": 100,
        "redeemed": 30,
    }
    assert account["updated_at"].endswith("+00:00")


def test_history_is_newest_first_and_limited(credex):
    for n in range(5):
        credex("award", "grant", "u1", str(n + 1), "--reason", f"r{n}", "--ref", f"g{n}")
    entries = credex("account", "history", "u1", "--limit", "3", "--json").json()
    assert [e["ref"] for e in entries] == ["g4", "g3", "g2"]
    assert [e["balance"] for e in entries] == [15, 10, 6]
    assert set(entries[0]) == {
        "entry_id",
        "kind",
        "ref",
        "points",
        "balance",
        "operator",
        "reason",
        "created_at",
    }


def test_an_unknown_user_is_refused(credex):
    result = credex("account", "show", "ghost", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert '"code": "unknown_user"' in result.stderr
    assert credex("account", "history", "ghost").exit_code == 1


def test_human_output_is_readable(credex):
    credex("award", "grant", "u1", "42", "--reason", "hello")
    shown = credex("account", "show", "u1")
    assert shown.exit_code == 0
    assert "balance" in shown.stdout and "42" in shown.stdout
