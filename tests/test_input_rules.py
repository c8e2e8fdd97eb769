"""The input rules of cli.md, as a user meets them: every command that takes input refuses a bad
value with exit 2, one line naming the field (JSON `invalid_input` under --json) and writes
nothing, the same on SQLite and Postgres; whatever text is thrown at the parsers, commands and
bulk files, the answer is a clean refusal or a value that reads back as it was given, never exit 70.

(Over 400 lines on purpose: one table of refusals for every command, the one place to look when a
rule changes, beside the generated inputs that run the same commands.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from credex.errors import InvalidInput
from credex.points import rules

NUL, ESC, DEL, C1, RLO, LRI, LSEP = "\x00", "\x1b", "\x7f", "\x85", "\u202e", "\u2066", "\u2028"
SURROGATE = "\ud800"
FORGED = "u1\nerror: all points were lost"


def dump(url: str) -> dict:
    """Every row of every table, in a stable order: what "nothing was written" is checked on."""
    from sqlalchemy import select

    from credex.db import tables
    from credex.db.engine import get_engine

    with get_engine(url).connect() as connection:
        return {
            table.name: sorted(map(repr, connection.execute(select(table)).all()))
            for table in tables.metadata.sorted_tables
        }


@pytest.fixture
def shop(db_url, credex):
    """A gift, a shopper with points, a redemption and its outbox message."""
    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "5").exit_code == 0
    assert credex("award", "grant", "u1", "100", "--reason", "opening", "--ref", "open-u1").exit_code == 0
    assert credex("award", "purchase", "u1", "--order", "o-1", "--amount", "30").exit_code == 0
    created = credex("redeem", "create", "u1", "MUG", "--address", "1 High St", "--json")
    assert created.exit_code == 0, created.stderr
    return db_url


def grant(user="u1", points="5", reason="r", ref="g-new"):
    return ("award", "grant", user, points, "--reason", reason, "--ref", ref)


def purchase(user="u1", order="o-new", amount="12.50"):
    return ("award", "purchase", user, "--order", order, "--amount", amount)


def review(user="u1", review_id="rv-new"):
    return ("award", "review", user, "--review", review_id)


def refund(user="u1", order="o-1", refund_id="rf-new", amount="10"):
    return ("award", "refund", user, "--order", order, "--refund", refund_id, "--amount", amount)


def redeem(user="u1", sku="MUG", address="2 Low Rd", quantity="1", request_id="rq-new"):
    return (
        "redeem",
        "create",
        user,
        sku,
        "--address",
        address,
        "--quantity",
        quantity,
        "--request-id",
        request_id,
    )


def add(sku="CAP", name="Cap", points="3", stock="4"):
    return ("catalog", "add", sku, "--name", name, "--points", points, "--stock", stock)


def update(sku="MUG", name="Big mug", points="12", stock="6"):
    return ("catalog", "update", sku, "--name", name, "--points", points, "--stock", stock)


# (the command line, the words the one-line message must hold)
CASES = [
    # identifiers: controls, NUL, DEL, C1, bidi overrides and isolates, separators, surrogates, length
    (grant(user="u" + NUL + "1"), "user id"),
    (grant(user=FORGED), "user id"),
    (grant(user="u1" + ESC + "[2J"), "user id"),
    (grant(user="u" + DEL), "user id"),
    (grant(user="u" + C1 + "1"), "user id"),
    (grant(user="u" + RLO + "1"), "user id"),
    (grant(user="u" + LRI + "1"), "user id"),
    (grant(user="u" + LSEP + "1"), "user id"),
    (grant(user="u" + SURROGATE), "user id"),
    (grant(user="x" * (rules.USER_ID_MAX + 1)), f"longer than {rules.USER_ID_MAX}"),
    (grant(user="   "), "user id must not be empty"),
    (grant(ref="g" + NUL), "ref"),
    (grant(ref="g" * (rules.REF_MAX + 1)), f"ref is longer than {rules.REF_MAX}"),
    (grant(reason="why" + NUL), "reason"),
    (grant(reason="why" + ESC), "reason"),
    (grant(reason="x" * (rules.REASON_MAX + 1)), "reason is longer"),
    # free text: no field of the contract takes a line break, so none holds one (nor a tab)
    (grant(reason=FORGED), "reason must be printable text"),
    (grant(reason="a\tb"), "reason must be printable text"),
    (grant(reason="a" + LSEP + "b"), "reason"),
    (redeem(address="1 High St\r\n2nd floor"), "address must be printable text"),
    (add(name="Cap\nerror: x"), "name must be printable text"),
    (update(name="Big\tmug"), "name"),
    (("redeem", "cancel", "1", "--reason", "no\nmore"), "reason"),
    (purchase(user="u\t1"), "user id"),
    (purchase(order="o" + RLO), "order id"),
    (purchase(order="o" * (rules.REF_MAX + 1)), "order id is longer"),
    (review(user="u" + NUL), "user id"),
    (review(review_id="r" + "\r"), "review id"),
    (refund(refund_id="rf" + NUL), "refund id"),
    (refund(order="o-1" + DEL), "order id"),
    (redeem(user="u1" + NUL), "user id"),
    (redeem(sku="MUG" + NUL), "sku"),
    (redeem(sku="M" * (rules.SKU_MAX + 1)), f"sku is longer than {rules.SKU_MAX}"),
    (redeem(address="1 High St" + NUL), "address"),
    (redeem(address="1 High St" + RLO), "address"),
    (redeem(address="x" * (rules.ADDRESS_MAX + 1)), "address is longer"),
    (redeem(request_id="rq" + NUL), "request id"),
    (redeem(request_id="q" * (rules.REQUEST_ID_MAX + 1)), "request id is longer"),
    (add(sku="CAP" + NUL), "sku"),
    (add(sku="C" * (rules.SKU_MAX + 1)), "sku is longer"),
    (add(name="Cap" + NUL), "name"),
    (add(name="C" * (rules.NAME_MAX + 1)), f"name is longer than {rules.NAME_MAX}"),
    (update(sku="MUG" + NUL), "sku"),
    (update(name="Mug" + ESC), "name"),
    (("--operator", "op" + NUL, *grant()), "operator"),
    ((*grant(), "--operator", "o" * (rules.OPERATOR_MAX + 1)), "operator is longer"),
    (("--operator", "op" + RLO, *redeem()), "operator"),
    (("account", "show", "u" + NUL), "user id"),
    (("account", "history", "x" * (rules.USER_ID_MAX + 1)), "user id is longer"),
    (("redeem", "list", "--user", "u" + NUL), "--user"),
    (("relay", "retry", "m" + NUL), "message id"),
    (("relay", "retry", "m" * (rules.MESSAGE_ID_MAX + 1)), "message id is longer"),
    # numbers: ASCII only, no exponent, no underscores, no NaN or infinity, within 64 bits
    (grant(points="１２"), "points must be a whole number"),
    (grant(points="1e3"), "points"),
    (grant(points="1_000"), "points"),
    (grant(points="NaN"), "points"),
    (grant(points="9223372036854775808"), "points is too large"),
    (
        grant(points="-9223372036854775808"),
        "points is too large: -9223372036854775808 is below -9223372036854775807",
    ),
    (grant(points="9" * 5000), "points is too large"),
    (grant(points="0x10"), "points"),
    (purchase(amount="1e3"), "--amount"),
    (purchase(amount="1_000"), "--amount"),
    (purchase(amount="１２"), "--amount"),
    (purchase(amount="NaN"), "--amount"),
    (purchase(amount="inf"), "--amount"),
    (purchase(amount="-5"), "--amount"),
    (purchase(amount="12.505"), "--amount"),
    (purchase(amount="0"), "--amount"),
    (purchase(amount="0.50"), "--amount 0.50 earns no points"),
    (purchase(amount="9" * 16), "--amount is too large"),
    (refund(amount="1e1"), "--amount"),
    (redeem(quantity="１"), "quantity"),
    (redeem(quantity="2147483648"), "quantity is too large"),
    (redeem(quantity="0"), "quantity must be at least 1"),
    (add(points="1e3"), "points"),
    (add(points="0"), "points must be at least 1"),
    (add(stock="-1"), "stock must be at least 0"),
    (add(stock="９"), "stock"),
    (update(stock="1_0"), "stock"),
    (update(points="9223372036854775808"), "points is too large"),
    (("redeem", "show", "１"), "redemption id"),
    (("redeem", "show", "1" + NUL), "redemption id"),
    (("relay", "purge", "--confirmed-before", "３0d"), "--confirmed-before"),
    (("track", "１"), "redemption id"),
]


def _case_id(case) -> str:
    args, _words = case
    return " ".join(args[:2])


def test_every_command_refuses_bad_input_in_one_line_naming_the_field_and_writes_nothing(shop, credex):
    failures = []
    for args, words in CASES:
        before = dump(shop)
        as_json = credex(*args, "--json")
        plain = credex(*args)
        after = dump(shop)
        problems = []
        if as_json.exit_code != 2 or plain.exit_code != 2:
            problems.append(f"exit {as_json.exit_code}/{plain.exit_code}")
        if as_json.stdout or plain.stdout:
            problems.append(f"stdout {as_json.stdout!r}")
        try:
            error = json.loads(as_json.stderr)["error"]
        except (ValueError, KeyError, TypeError):
            error = {}
            problems.append(f"not one JSON error: {as_json.stderr!r}")
        if error and (error.get("code") != "invalid_input" or words not in error.get("message", "")):
            problems.append(f"JSON error {error}")
        lines = plain.stderr.split("\n")
        if len(lines) != 2 or lines[1] or not lines[0].startswith("error: ") or words not in lines[0]:
            problems.append(f"stderr {plain.stderr!r}")
        if after != before:
            problems.append("the database changed")
        if problems:
            failures.append(f"{args!r}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)


# Whole-number options parsed by the command line itself: a usage error (click's usage text
# without --json, one JSON document with it), by the same rules.
OPTION_CASES = [
    ("redeem", "list", "--limit", "1_000"),
    ("account", "history", "u1", "--limit", "１０"),
    ("relay", "list", "--limit", "99999999999999999999"),
    ("warehouse", "list", "--limit", "1e3"),
    ("award", "bulk", "-", "--batch-size", "1_0"),
    ("relay", "run", "--once", "--max-attempts", "-1"),
    ("relay", "run", "--once", "--confirm-timeout", "nan"),
    ("relay", "run", "--once", "--lease", "inf"),
    ("warehouse", "run", "--once", "--prefetch", "２"),
]


def test_whole_number_options_follow_the_same_rules(shop, credex):
    for args in OPTION_CASES:
        before = dump(shop)
        result = credex(*args, "--json")
        assert result.exit_code == 2, (args, result.stderr)
        error = json.loads(result.stderr)["error"]
        assert error["code"] == "invalid_input" and args[-2] in error["message"], (args, error)
        assert dump(shop) == before


def test_an_echoed_value_cannot_forge_a_second_error_line(shop, credex):
    for args in (grant(user=FORGED), ("redeem", "list", "--status", FORGED), ("redeem", "show", FORGED)):
        result = credex(*args)
        assert result.exit_code == 2, result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "\nerror:" not in result.stderr and "lost\n" not in result.stderr[:-1]


def test_unicode_that_follows_the_rules_is_stored_and_read_back_as_given(shop, credex):
    user, ref, reason = "用户-Zoë 👩‍💻", "ref-über-№1", "a note · über «zwei» Zeilen"
    granted = credex(*grant(user=user, ref=ref, reason=reason, points="+7"), "--json")
    assert granted.exit_code == 0, granted.stderr
    assert granted.json()["user_id"] == user and granted.json()["points"] == 7
    entry = credex("account", "history", user, "--json").json()[0]
    assert (entry["ref"], entry["reason"]) == (ref, reason)
    redeemed = credex(*redeem(user="u1", address="北京市 1号 2nd floor", request_id="请求-1"), "--json")
    assert redeemed.exit_code == 0, redeemed.stderr
    shown = credex("redeem", "show", str(redeemed.json()["redemption_id"]), "--json").json()
    assert shown["address"] == "北京市 1号 2nd floor"


def test_values_at_their_column_length_fit_on_both_backends(shop, credex):
    user, ref = "u" * rules.USER_ID_MAX, "r" * rules.REF_MAX
    operator = "o" * rules.OPERATOR_MAX
    granted = credex("--operator", operator, *grant(user=user, ref=ref, points="20"), "--json")
    assert granted.exit_code == 0, granted.stderr
    sku, name = "S" * rules.SKU_MAX, "N" * rules.NAME_MAX
    assert credex(*add(sku=sku, name=name), "--json").exit_code == 0
    redeemed = credex(*redeem(user=user, sku=sku, request_id="q" * rules.REQUEST_ID_MAX), "--json")
    assert redeemed.exit_code == 0, redeemed.stderr
    assert credex("account", "show", user, "--json").json()["balance"] == 20 - 3


# --- bulk: good rows applied, bad rows rejected with their line numbers ------------------------


def test_a_bulk_file_with_nul_and_over_long_fields_applies_every_good_row(db_url, credex, tmp_path: Path):
    long_user, long_ref = "x" * (rules.USER_ID_MAX + 1), "r" * (rules.REF_MAX + 1)
    rows = [
        ("u1", "10", "b-1", "ok"),  # line 2
        ("u" + NUL + "2", "10", "b-2", ""),  # 3
        ("u2", "20", "b-3", "fine"),  # 4
        (long_user, "10", "b-4", ""),  # 5
        ("u3", "30", long_ref, ""),  # 6
        ("u3", "5", "b-6" + NUL, ""),  # 7
        ("u1" + RLO, "5", "b-7", ""),  # 8
        ("u3", "３", "b-8", ""),  # 9
        ("u3", "7", "b-9", "why" + NUL),  # 10
        ("u3", "3", "b-10", "two\nlines"),  # 11 (quoted: a CSV cell may span lines, a reason may not)
        ("u4", "1e3", "b-11", ""),  # 12 (the quoted line break above makes this line 13)
        ("u3", "3", "b-12", "one line"),  # 14
    ]
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["user_id", "points", "ref", "reason"])
    writer.writerows(rows)
    path = tmp_path / "grants.csv"
    path.write_text(text.getvalue(), encoding="utf-8")
    rejects = tmp_path / "rejects.csv"

    result = credex("award", "bulk", path, "--rejects", rejects, "--json")
    assert result.exit_code == 3, result.stderr
    assert result.json()["applied"] == 3 and result.json()["rejected"] == 9
    assert result.json()["points_awarded"] == 10 + 20 + 3
    shown = [line.split(":")[0] for line in result.stderr.splitlines()]
    assert shown == [f"line {n}" for n in (3, 5, 6, 7, 8, 9, 10, 11, 13)], result.stderr
    assert "user_id must be printable text" in result.stderr
    assert f"user_id is longer than {rules.USER_ID_MAX}" in result.stderr
    assert f"ref is longer than {rules.REF_MAX}" in result.stderr
    assert NUL not in result.stderr and RLO not in result.stderr
    balances = {u: credex("account", "show", u, "--json") for u in ("u1", "u2", "u3", "u4")}
    assert [balances[u].json()["balance"] for u in ("u1", "u2", "u3")] == [10, 20, 3]
    assert balances["u4"].exit_code == 1  # its only row was rejected: no account
    assert credex("account", "history", "u3", "--json").json()[0]["reason"] == "one line"
    with open(rejects, newline="", encoding="utf-8") as handle:
        kept = list(csv.reader(handle))[1:]
    assert [row[4] for row in kept] == ["3", "5", "6", "7", "8", "9", "10", "11", "13"]

    again = credex("award", "bulk", path, "--json")  # the same file twice applies nothing
    assert again.exit_code == 3 and again.json()["applied"] == 0 and again.json()["duplicates"] == 3


def test_a_json_lines_bulk_file_with_nul_surrogates_and_long_fields_applies_every_good_row(
    db_url, credex, tmp_path: Path
):
    rows = [
        {"user_id": "u1", "points": 10, "ref": "j-1"},
        {"user_id": "u\x002", "points": 10, "ref": "j-2"},
        {"user_id": "u2", "points": "15", "ref": "j-3", "reason": "one line"},
        {"user_id": "u2", "points": "15", "ref": "j-3b", "reason": "line\nbreak"},
        {"user_id": "u\ud8003", "points": 10, "ref": "j-4"},
        {"user_id": "u3", "points": 10, "ref": "j" * (rules.REF_MAX + 1)},
        {"user_id": "u3", "points": 10, "ref": "j-6", "reason": "bad\x07bell"},
        {"user_id": "u3", "points": 4, "ref": "j-7"},
    ]
    path = tmp_path / "grants.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    result = credex("award", "bulk", path, "--json")
    assert result.exit_code == 3, result.stderr
    assert (result.json()["applied"], result.json()["rejected"]) == (3, 5)
    assert [line.split(":")[0] for line in result.stderr.splitlines()] == [
        "line 2",
        "line 4",
        "line 5",
        "line 6",
        "line 7",
    ]
    assert [credex("account", "show", u, "--json").json()["balance"] for u in ("u1", "u2", "u3")] == [
        10,
        15,
        4,
    ]


# --- hypothesis: arbitrary text, in-process and through real commands -------------------------

HOSTILE = st.sampled_from(
    [
        NUL,
        ESC,
        DEL,
        C1,
        RLO,
        LRI,
        LSEP,
        SURROGATE,
        "\n",
        "\t",
        "\r",
        " ",
        "１",
        "٣",
        "e",
        "_",
        ".",
        "-",
        "+",
        "0",
        "9",
    ]
)
ANY_TEXT = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),  # surrogates included
    st.lists(HOSTILE | st.characters(), max_size=20).map("".join),
    st.text(st.characters(), min_size=120, max_size=400),
    st.from_regex(r"[+-]?[0-9]{1,25}", fullmatch=True),
    st.from_regex(r"[0-9]{1,18}(\.[0-9]{1,3})?", fullmatch=True),
)


def _clean_refusal(error: InvalidInput) -> None:
    assert error.exit_code == 2 and error.code == "invalid_input"
    from credex.errors import one_line

    assert "\n" not in one_line(error.message) and error.message


@settings(max_examples=400, deadline=None)
@given(ANY_TEXT)
def test_the_identifier_and_free_text_parsers_refuse_cleanly_or_keep_the_text(value):
    for check, limit, around in (
        (rules.check_user_id, rules.USER_ID_MAX, " "),
        (rules.check_ref, rules.REF_MAX, " "),
        (rules.check_address, rules.ADDRESS_MAX, " \t\r\n"),
    ):
        try:
            kept = check(value)
        except InvalidInput as error:
            _clean_refusal(error)
            continue
        assert kept == value.strip(around) and 0 < len(kept) <= limit
        assert kept.encode("utf-8").decode("utf-8") == kept  # storable as it is on both backends
        assert NUL not in kept and RLO not in kept and ESC not in kept


@settings(max_examples=400, deadline=None)
@given(ANY_TEXT)
def test_the_number_parsers_take_ascii_numbers_only(value):
    import re
    from decimal import Decimal

    try:
        number = rules.parse_int(value, "points")
    except InvalidInput as error:
        _clean_refusal(error)
    else:
        assert re.fullmatch(r"[+-]?[0-9]+", value.strip(" ")) and number == int(value.strip(" "))
        assert abs(number) <= rules.INT64_MAX
    try:
        amount = rules.parse_amount(value)
    except InvalidInput as error:
        _clean_refusal(error)
    else:
        assert re.fullmatch(r"[0-9]+(\.[0-9]{1,2})?", value.strip(" ")) and amount == Decimal(
            value.strip(" ")
        )
        assert amount > 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=ANY_TEXT, ref=ANY_TEXT, reason=ANY_TEXT, points=ANY_TEXT)
def test_a_grant_of_arbitrary_text_is_refused_cleanly_or_reads_back_as_given(
    db_url, credex, user, ref, reason, points
):
    # After "--" any text is an argument, whatever it looks like ("--", "-4"): as a careful script passes it.
    result = credex("award", "grant", "--reason", reason, "--ref", ref, "--json", "--", user, points)
    assert result.exit_code in (0, 1, 2), result.stderr
    if result.exit_code:
        assert result.stderr.startswith("{"), (result.exit_code, result.stderr)
        assert json.loads(result.stderr)["error"]["code"] in (
            "invalid_input",
            "conflict",
            "insufficient_points",
        )
        return
    entry = result.json()
    if entry["duplicate"]:
        return
    assert (entry["user_id"], entry["ref"]) == (user.strip(" "), ref.strip(" "))
    history = credex("account", "history", entry["user_id"], "--json").json()
    stored = next(e for e in history if e["ref"] == entry["ref"])
    assert stored["reason"] == reason.strip(" \t\r\n") and stored["points"] == int(points.strip(" "))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sku=ANY_TEXT,
    name=ANY_TEXT,
    address=ANY_TEXT,
    request_id=ANY_TEXT,
    quantity=st.sampled_from(["1", " 1 ", "+1", "2"]) | ANY_TEXT,
)
def test_a_gift_and_a_redemption_of_arbitrary_text_are_refused_cleanly_or_read_back_as_given(
    shop, credex, sku, name, address, request_id, quantity
):
    added = credex("catalog", "add", "--name", name, "--points", "1", "--json", "--", sku)
    assert added.exit_code in (0, 1, 2), added.stderr
    if added.exit_code == 0:
        assert (added.json()["sku"], added.json()["name"]) == (sku.strip(" "), name.strip(" \t\r\n"))
    elif added.exit_code == 1:
        assert json.loads(added.stderr)["error"]["code"] == "conflict"  # the same sku twice
    redeemed = credex(
        "redeem",
        "create",
        "u1",
        "MUG",
        "--address",
        address,
        "--request-id",
        request_id,
        "--quantity",
        quantity,
        "--json",
    )
    assert redeemed.exit_code in (0, 1, 2), redeemed.stderr
    if redeemed.exit_code:
        code = json.loads(redeemed.stderr)["error"]["code"]
        assert code in ("invalid_input", "conflict", "insufficient_points", "out_of_stock"), code
        return
    shown = credex("redeem", "show", str(redeemed.json()["redemption_id"]), "--json").json()
    if not redeemed.json()["duplicate"]:
        assert shown["address"] == address.strip(" \t\r\n")
        assert shown["quantity"] == int(quantity.strip(" "))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.tuples(ANY_TEXT, ANY_TEXT | st.integers(-5, 50), ANY_TEXT, ANY_TEXT), min_size=1, max_size=6
    )
)
def test_bulk_rows_of_arbitrary_text_are_applied_as_given_or_rejected_never_70(
    db_url, credex, tmp_path, rows
):
    objects = [{"user_id": u, "points": p, "ref": r, "reason": why} for u, p, r, why in rows]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in objects), encoding="utf-8")
    assert credex("db", "upgrade").exit_code == 0  # SQLite: created by the first command
    before = set(_grants(db_url))  # the database outlives one example
    result = credex("award", "bulk", path, "--json")
    assert result.exit_code in (0, 3), result.stderr
    summary = result.json()
    assert summary["applied"] + summary["duplicates"] + summary["rejected"] == len(rows)
    # Every grant stored reads back as one of the rows that gave it, character for character.
    from credex.points.bulk_batch import DEFAULT_REASON
    from credex.points.bulk_files import Grant, check_row

    given_rows = {}
    for line, (user, points, ref, why) in enumerate(rows, 1):
        checked = check_row(line, user, points, ref, why, None)
        if isinstance(checked, Grant):
            given_rows.setdefault(checked.ref, set()).add(
                (checked.user_id, checked.points, checked.reason or DEFAULT_REASON)
            )
    stored = set(_grants(db_url)) - before
    assert len(stored) == summary["applied"]
    for ref, user, points, reason in stored:
        assert (user, points, reason) in given_rows[ref]


def _grants(url: str) -> list[tuple]:
    from sqlalchemy import select

    from credex.db import tables
    from credex.db.engine import get_engine

    ledger = tables.ledger_entry
    with get_engine(url).connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                select(ledger.c.ref, ledger.c.user_id, ledger.c.points, ledger.c.reason).where(
                    ledger.c.kind == "grant"
                )
            )
        ]


@pytest.mark.breaks_invariants
def test_the_invariant_checker_notices_a_stored_value_that_breaks_the_input_rules(shop, credex):
    """What a script writing straight to the database could leave: the checker says so."""
    from sqlalchemy import text

    from credex.db.engine import get_engine
    from tests.invariants import InvariantsBroken, check_invariants

    with get_engine(shop).begin() as connection:
        connection.execute(text("UPDATE redemption SET address = :a"), {"a": "1 High St" + ESC + "[2J"})
        # (ledger entries are append-only: a bad operator can only come with a redemption row)
        connection.execute(text("UPDATE redemption SET operator = :o"), {"o": "op" + RLO})
    with pytest.raises(InvariantsBroken) as broken:
        check_invariants(shop)
    found = str(broken.value)
    assert "redemption address" in found or "address" in found
    assert "redemption operator" in found


# Every command that takes input, each value replaceable by arbitrary text.
TEMPLATES = [
    ("catalog", "add", "{CAP}", "--name", "{Cap}", "--points", "{3}", "--stock", "{4}"),
    ("catalog", "update", "{MUG}", "--name", "{Mug}", "--points", "{10}", "--stock", "{5}"),
    ("award", "purchase", "{u1}", "--order", "{o-2}", "--amount", "{12.50}"),
    ("award", "review", "{u1}", "--review", "{rv-1}"),
    ("award", "grant", "--reason", "{why}", "--ref", "{g-1}", "--", "{u1}", "{5}"),
    ("award", "refund", "{u1}", "--order", "{o-1}", "--refund", "{rf-1}", "--amount", "{10}"),
    ("account", "show", "--", "{u1}"),
    ("account", "history", "--limit", "{3}", "--", "{u1}"),
    (
        "redeem",
        "create",
        "--address",
        "{1 High St}",
        "--quantity",
        "{1}",
        "--request-id",
        "{rq-1}",
        "--",
        "{u1}",
        "{MUG}",
    ),
    ("redeem", "show", "--", "{1}"),
    ("redeem", "list", "--user", "{u1}", "--status", "{pending}", "--limit", "{5}"),
    ("relay", "list", "--state", "{pending}", "--limit", "{5}"),
    ("relay", "retry", "--", "{00000000-0000-0000-0000-000000000000}"),
    ("relay", "purge", "--confirmed-before", "{30d}", "--dry-run"),
    ("warehouse", "list", "--limit", "{5}"),
    ("--operator", "{alice}", "award", "grant", "--reason", "{why}", "--", "{u1}", "{1}"),
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    template=st.sampled_from(TEMPLATES),
    values=st.lists(st.none() | ANY_TEXT, min_size=9, max_size=9),
)
def test_no_command_answers_arbitrary_values_with_exit_70(shop, credex, template, values):
    """Each {slot} keeps its ordinary value (None) or takes arbitrary text; the answer is a code of
    the contract and one line (or one JSON document) on stderr, never exit 70."""
    replacements = iter(values)
    args = []
    for word in template:
        if word.startswith("{") and word.endswith("}"):
            chosen = next(replacements)
            args.append(word[1:-1] if chosen is None else chosen)
        else:
            args.append(word)
    if "--" in args:
        at = args.index("--")
        args[at:at] = ["--json"]
    else:
        args.append("--json")
    result = credex(*args)
    assert result.exit_code in (0, 1, 2, 3, 69), (args, result.stderr)
    if result.exit_code:
        error = json.loads(result.stderr)["error"]
        assert error["code"] != "internal" and "\n" not in error["message"], error
