"""Text output shows stored values as they are: a user id, a name, an address or a reason may
hold square brackets, which the table library would otherwise read as its markup (a closing tag
it never opened fails the command after its change is committed; a valid tag hides text)."""

from __future__ import annotations

import json

USER = "u[/b]"
SKU = "S[/b]"
NAME = "N[/x]"
ADDRESS = "[conceal]HIDDEN[/conceal]12 Real St [link=http://example.invalid]here[/link]"
REASON = "oops [/red] [bold]late[/bold]"


def _ok(outcome) -> str:
    assert outcome.exit_code == 0, (outcome.exit_code, outcome.stdout, outcome.stderr)
    return outcome.stdout


def test_bracketed_values_print_literally_in_every_table_and_panel(credex):
    assert SKU in _ok(credex("catalog", "add", SKU, "--name", NAME, "--points", "1", "--stock", "5"))
    assert USER in _ok(credex("award", "grant", USER, "50", "--reason", REASON, "--ref", "g1"))
    created = _ok(credex("redeem", "create", USER, SKU, "--address", ADDRESS, "--request-id", "rq1"))
    assert ADDRESS in created and USER in created
    redemption = json.loads(_ok(credex("redeem", "show", "1", "--json")))
    assert redemption["address"] == ADDRESS  # stored as given: the screen showed all of it

    cancelled = _ok(credex("redeem", "cancel", "1", "--reason", REASON))
    assert ADDRESS in cancelled and REASON in cancelled
    shown = _ok(credex("redeem", "show", "1"))
    assert ADDRESS in shown and REASON in shown
    listed = _ok(credex("redeem", "list"))
    assert USER in listed and SKU in listed
    catalog = _ok(credex("catalog", "list"))
    assert SKU in catalog and NAME in catalog
    history = _ok(credex("account", "history", USER))
    assert f"history of {USER}" in history and REASON in history
    account = _ok(credex("account", "show", USER))
    assert f"account {USER}" in account
    assert json.loads(_ok(credex("account", "show", USER, "--json")))["balance"] == 50
