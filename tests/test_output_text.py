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


def test_stored_escape_sequences_and_direction_overrides_are_shown_escaped(credex, db_url):
    """A row written before the input rules (or by hand) may hold what a terminal would act on:
    text output shows it escaped, the screen's colours and order untouched, and the JSON keeps
    the value as stored."""
    from sqlalchemy import update

    from credex.db import tables
    from credex.db.engine import get_engine

    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", "1", "--stock", "5").exit_code == 0
    assert credex("award", "grant", "u1", "50", "--reason", "r", "--ref", "g1").exit_code == 0
    assert credex("redeem", "create", "u1", "MUG", "--address", "1 Road").exit_code == 0
    stored = "line3\x1b[31mRED\x1b[0m\u202eevil\x07\nFlat 2"

    def write(address: str, name: str) -> None:
        with get_engine(db_url).begin() as connection:
            connection.execute(update(tables.redemption).values(address=address))
            connection.execute(update(tables.catalog_item).values(name=name))

    write(stored, "Mug\x1b]0;title\x07")
    try:
        _shows_them_escaped(credex, stored)
    finally:
        write("1 Road", "Mug")  # as credex wrote them: the invariants checked after the test hold


def _shows_them_escaped(credex, stored: str) -> None:
    for args in (("redeem", "show", "1"), ("redeem", "list"), ("catalog", "list")):
        shown = _ok(credex(*args))
        assert "\x1b" not in shown and "\u202e" not in shown and "\x07" not in shown, (args, shown)
    shown = _ok(credex("redeem", "show", "1"))
    assert "line3\\x1b[31mRED\\x1b[0m\\u202eevil\\x07" in shown and "Flat 2" in shown
    assert "Mug\\x1b]0;title\\x07" in _ok(credex("catalog", "list"))
    assert json.loads(_ok(credex("redeem", "show", "1", "--json")))["address"] == stored
