"""Marketing scripts grant points from files: `credex award bulk` applies each row once, refuses
the bad ones with their line numbers, and leaves every account as if each row had been granted
by hand, one by one, in file order. Every scenario runs on SQLite and on Postgres.

(Over 400 lines on purpose: one file is one command's behaviour, its scenarios sharing the file
builders and the check that bulk and one-by-one grants end in the same state.)"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from credex.db.engine import get_engine
from tests.test_lifecycle_invariants import check_lifecycle_invariants

HEADER = "user_id,points,ref,reason\n"


def write(tmp_path, text_: str, name: str = "grants.csv"):
    path = tmp_path / name
    path.write_text(text_, encoding="utf-8")
    return path


def csv_file(tmp_path, *rows: str, name: str = "grants.csv", header: str = HEADER):
    return write(tmp_path, header + "".join(row + "\n" for row in rows), name)


def bulk(credex, *args, input: str | None = None, env: dict | None = None):
    return credex("award", "bulk", *args, input=input, env=env)


def balance(credex, user: str) -> int:
    return credex("account", "show", user, "--json").json()["balance"]


def rows_of(db_url: str, sql: str, **params) -> list:
    with get_engine(db_url).connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql), params)]


def ledger(db_url: str) -> list[tuple]:
    return rows_of(db_url, "SELECT user_id, ref, points, debt, balance FROM ledger_entry ORDER BY id")


# --- a campaign --------------------------------------------------------------------------------


def test_a_campaign_file_grants_each_row_and_a_second_run_applies_nothing(credex, db_url, tmp_path):
    path = csv_file(
        tmp_path,
        "u1,100,spring-u1,spring campaign",
        "u2,250,spring-u2,spring campaign",
        "u1,40,apology-u1,late parcel",
        "u3,5,spring-u3,",
    )
    first = bulk(credex, path, "--json")
    assert first.exit_code == 0, first.stderr
    assert first.json() == {
        "applied": 4,
        "duplicates": 0,
        "rejected": 0,
        "points_awarded": 395,
        "rows": 4,
        "dry_run": False,
        "rejects_file": None,
    }
    assert first.stderr == ""
    assert (balance(credex, "u1"), balance(credex, "u2"), balance(credex, "u3")) == (140, 250, 5)
    history = credex("account", "history", "u1", "--json").json()
    assert [(e["ref"], e["points"], e["balance"], e["kind"]) for e in history] == [
        ("apology-u1", 40, 140, "grant"),
        ("spring-u1", 100, 100, "grant"),
    ]
    assert {e["operator"] for e in history} == {"tester"}
    assert [e["reason"] for e in history] == ["late parcel", "spring campaign"]
    assert credex("account", "history", "u3", "--json").json()[0]["reason"] == "bulk grant"

    again = bulk(credex, path, "--json")
    assert again.exit_code == 0
    assert (again.json()["applied"], again.json()["duplicates"], again.json()["points_awarded"]) == (0, 4, 0)
    assert (balance(credex, "u1"), balance(credex, "u2")) == (140, 250)
    assert len(ledger(db_url)) == 4
    check_lifecycle_invariants(db_url)


def test_the_human_summary_is_a_table_and_the_operator_option_is_recorded(credex, db_url, tmp_path):
    path = csv_file(tmp_path, "u1,100,c-1,welcome")
    result = bulk(credex, path, "--operator", "campaigns")
    assert result.exit_code == 0, result.stderr
    assert "bulk grant from" in result.stdout and "applied" in result.stdout
    assert "points_awarded    100" in result.stdout
    assert credex("account", "history", "u1", "--json").json()[0]["operator"] == "campaigns"


def test_a_bulk_row_and_award_grant_share_one_namespace_of_refs(credex, db_url, tmp_path):
    credex("award", "grant", "u1", "100", "--reason", "by hand", "--ref", "g-1")
    credex("award", "grant", "u2", "30", "--reason", "by hand", "--ref", "g-2")
    path = csv_file(tmp_path, "u1,100,g-1,same as by hand", "u2,31,g-2,other points", "u9,30,g-3,new")
    result = bulk(credex, path, "--json")
    assert result.exit_code == 3
    assert (result.json()["applied"], result.json()["duplicates"], result.json()["rejected"]) == (1, 1, 1)
    assert "line 3: ref g-2 was already used for u2 (points=30) with other content" in result.stderr
    # and the other way round: a bulk ref repeated by hand is the original entry
    again = credex("award", "grant", "u9", "30", "--reason", "by hand", "--ref", "g-3", "--json")
    assert again.exit_code == 0 and again.json()["duplicate"] is True
    conflict = credex("award", "grant", "u9", "31", "--reason", "by hand", "--ref", "g-3")
    assert conflict.exit_code == 1
    assert (balance(credex, "u1"), balance(credex, "u2"), balance(credex, "u9")) == (100, 30, 30)
    check_lifecycle_invariants(db_url)


# --- the rejection rules, one by one --------------------------------------------------------------

RULES = {
    "a missing field": ("u1,10", "ref is missing (the row has 2 of 4 fields)"),
    "an empty user id": (",10,bad-row,", "user_id must not be empty"),
    "empty points": ("u1,,bad-row,", "points must not be empty"),
    "an empty ref": ("u1,10,,", "ref must not be empty"),
    "points with decimals": ("u1,12.5,bad-row,", "points must be a whole number, got '12.5'"),
    "points that are not a number": ("u1,ten,bad-row,", "points must be a whole number, got 'ten'"),
    "points beyond 64 bits": (
        "u1,9223372036854775808,bad-row,",
        "points is too large: 9223372036854775808 is beyond 9223372036854775807",
    ),
    "zero points": ("u1,0,bad-row,", "points must not be zero"),
    "a negative grant beyond the balance": (
        "u1,-151,bad-row,",
        "u1 has 150 points; taking 151 would go below zero",
    ),
    "a negative grant for a new account": ("u7,-1,bad-row,", "u7 has 0 points; taking 1 would go below zero"),
    "too many fields": ("u1,10,bad-row,a,b", "the row has 5 fields, the header 4 (an unquoted comma?)"),
    "a user id longer than 128": ("x" * 129 + ",10,bad-row,", "user_id is longer than 128 characters"),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_a_row_that_breaks_a_rule_is_rejected_with_its_line_and_the_others_are_applied(
    rule, credex, db_url, tmp_path
):
    bad, reason = RULES[rule]
    path = csv_file(tmp_path, "u1,150,before,", bad, "u1,50,after,")
    result = bulk(credex, path, "--json")
    assert result.exit_code == 3
    assert {k: result.json()[k] for k in ("applied", "duplicates", "rejected", "points_awarded")} == {
        "applied": 2,
        "duplicates": 0,
        "rejected": 1,
        "points_awarded": 200,
    }
    assert result.stderr == f"line 3: {reason}\n"
    assert [(user, ref) for user, ref, *_ in ledger(db_url)] == [("u1", "before"), ("u1", "after")]
    assert rows_of(db_url, "SELECT user_id FROM account ORDER BY user_id") == [("u1",)]
    check_lifecycle_invariants(db_url)


def test_a_negative_row_is_judged_on_the_balance_left_by_the_rows_before_it(credex, db_url, tmp_path):
    credex("award", "grant", "u1", "50", "--reason", "start", "--ref", "start")
    path = csv_file(
        tmp_path,
        "u1,-80,too-early,takes more than the 50 there",
        "u1,100,top-up,",
        "u1,-80,now-affordable,150 there now",
        "u1,-80,too-late,70 left",
        "u2,30,new,",
        "u2,-30,all-of-it,",
    )
    result = bulk(credex, path, "--json", "--batch-size", "2")  # the balance also carries across batches
    assert result.exit_code == 3
    assert (result.json()["applied"], result.json()["rejected"], result.json()["points_awarded"]) == (
        4,
        2,
        20,
    )
    assert result.stderr.splitlines() == [
        "line 2: u1 has 50 points; taking 80 would go below zero",
        "line 5: u1 has 70 points; taking 80 would go below zero",
    ]
    assert ledger(db_url) == [
        ("u1", "start", 50, 0, 50),
        ("u1", "top-up", 100, 0, 150),
        ("u1", "now-affordable", -80, 0, 70),
        ("u2", "new", 30, 0, 30),
        ("u2", "all-of-it", -30, 0, 0),
    ]
    # the oldest points go first: all of "start", then 30 of "top-up"
    assert rows_of(
        db_url,
        "SELECT l.ref, p.points, p.remaining, p.state FROM point_lot p "
        "JOIN ledger_entry l ON l.id = p.entry_id ORDER BY p.id",
    ) == [("start", 50, 0, "used"), ("top-up", 100, 70, "available"), ("new", 30, 0, "used")]
    check_lifecycle_invariants(db_url)

    # Run again: the refused corrections are judged where they stand in the file, on the balance
    # the first run's entries recorded there, so they are refused again and nothing changes.
    again = bulk(credex, path, "--json", "--batch-size", "2")
    assert (again.json()["applied"], again.json()["duplicates"], again.json()["rejected"]) == (0, 4, 2)
    assert again.stderr == result.stderr
    assert len(ledger(db_url)) == 5


def test_a_refused_correction_stays_refused_when_the_first_run_applied_rows_only_beyond_its_batch(
    credex, db_url, tmp_path
):
    """Run again in smaller batches, the correction's batch held no row the first run applied:
    the file looked new, and the correction was judged on the balance the later rows had
    left (it applied). The rest of the file is read once to find where the first run stood."""
    path = csv_file(tmp_path, "u1,-10,early-fix,", "u1,100,top-up,", "u2,5,other,")
    first = bulk(credex, path, "--json")
    assert (first.json()["applied"], first.json()["rejected"]) == (2, 1)
    for batch_size in ("1", "2"):
        again = bulk(credex, path, "--json", "--batch-size", batch_size)
        assert again.exit_code == 3, again.stderr
        assert (again.json()["applied"], again.json()["duplicates"], again.json()["rejected"]) == (0, 2, 1)
        assert again.stderr == first.stderr == "line 2: u1 has 0 points; taking 10 would go below zero\n"
        dry = bulk(credex, path, "--json", "--batch-size", batch_size, "--dry-run")
        assert (dry.json()["applied"], dry.json()["rejected"]) == (0, 1)
    assert balance(credex, "u1") == 100 and len(ledger(db_url)) == 2
    check_lifecycle_invariants(db_url)


def test_a_correction_is_judged_on_the_balance_now_when_the_file_was_not_run_before(credex, db_url, tmp_path):
    path = csv_file(tmp_path, "u1,-80,fix,", "u1,100,more,")
    assert bulk(credex, path, "--json").json()["rejected"] == 1
    credex("award", "grant", "u1", "300", "--reason", "by hand", "--ref", "hand")
    other = csv_file(tmp_path, "u1,-80,fix,", name="later.csv")  # a new file: nothing of it was applied
    assert bulk(credex, other, "--json").json()["applied"] == 1
    assert balance(credex, "u1") == 320
    check_lifecycle_invariants(db_url)


def test_the_same_ref_twice_in_a_file_is_a_duplicate_or_a_conflict(credex, db_url, tmp_path):
    path = csv_file(
        tmp_path,
        "u1,10,r-1,first",
        "u1,10,r-1,same user and points: a repeat",
        "u1,11,r-1,other points",
        "u2,10,r-1,other user",
        "u2,-5,r-2,unaffordable: nothing recorded",
        "u1,5,r-2,so the ref is still free",
    )
    for batch_size in ("1000", "1"):  # within one batch, and across batches
        result = bulk(credex, path, "--json", "--batch-size", batch_size)
        assert result.exit_code == 3
    first_run = bulk(credex, path, "--json")
    assert (first_run.json()["applied"], first_run.json()["duplicates"], first_run.json()["rejected"]) == (
        0,
        3,
        3,
    )
    assert [(user, ref, points) for user, ref, points, *_ in ledger(db_url)] == [
        ("u1", "r-1", 10),
        ("u1", "r-2", 5),
    ]
    check_lifecycle_invariants(db_url)


def test_a_repeat_in_one_run_is_reported_as_in_a_later_run(credex, db_url, tmp_path):
    path = csv_file(tmp_path, "u1,10,r-1,", "u1,10,r-1,", "u1,11,r-1,", "u2,-5,r-2,", "u1,5,r-2,")
    result = bulk(credex, path, "--json")
    assert (result.json()["applied"], result.json()["duplicates"], result.json()["rejected"]) == (2, 1, 2)
    assert result.stderr.splitlines() == [
        "line 4: ref r-1 was already used for u1 (points=10) with other content",
        "line 5: u2 has 0 points; taking 5 would go below zero",
    ]


def test_more_than_twenty_rejected_rows_are_summed_up_on_stderr(credex, db_url, tmp_path):
    path = csv_file(tmp_path, *(f"u1,x{n},bad-{n}," for n in range(25)), "u1,1,good,")
    result = bulk(credex, path, "--json")
    assert result.exit_code == 3 and result.json()["rejected"] == 25
    lines = result.stderr.splitlines()
    assert len(lines) == 21
    assert lines[0] == "line 2: points must be a whole number, got 'x0'"
    assert lines[-1] == "… and 5 more rejected (use --rejects FILE to keep them all)"
    json.loads(result.stdout)  # stdout is the summary alone


# --- the lifecycle: debt, expiry, oldest points first -----------------------------------------------


def test_a_bulk_grant_pays_the_debt_first(credex, db_url, tmp_path):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "60")
    credex("award", "purchase", "u1", "--order", "o-1", "--amount", "100")
    credex("redeem", "create", "u1", "MUG", "--address", "1 High St")
    credex("award", "refund", "u1", "--order", "o-1", "--refund", "rf-1")  # 60 of the 100 were spent
    assert credex("account", "show", "u1", "--json").json()["debt"] == 60
    path = csv_file(tmp_path, "u1,25,part,", "u1,100,rest,", "u1,-30,take,")
    result = bulk(credex, path, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["points_awarded"] == 95
    entries = rows_of(
        db_url, "SELECT ref, points, debt, balance FROM ledger_entry WHERE kind = 'grant' ORDER BY id"
    )
    assert entries == [("part", 0, -25, 0), ("rest", 65, -35, 65), ("take", -30, 0, 35)]
    account = credex("account", "show", "u1", "--json").json()
    assert (account["balance"], account["debt"]) == (35, 0)
    paid = rows_of(
        db_url,
        "SELECT l.ref, u.points FROM lot_use u JOIN point_lot p ON p.id = u.lot_id "
        "JOIN ledger_entry l ON l.id = p.entry_id WHERE u.entry_id = p.entry_id ORDER BY p.id",
    )
    assert paid == [("part", 25), ("rest", 35)]  # the part paid to debt, used up on arrival
    check_lifecycle_invariants(db_url)


def test_bulk_lots_expire_after_credex_expiry_days(credex, db_url, tmp_path):
    path = csv_file(tmp_path, "u1,100,c-1,")
    result = bulk(credex, path, "--json", env={"CREDEX_EXPIRY_DAYS": "30"})
    assert result.exit_code == 0, result.stderr
    expiring = credex("account", "show", "u1", "--json").json()["expiring"]
    assert expiring[0]["points"] == 100
    on = expiring[0]["on"]
    made = credex("account", "history", "u1", "--json").json()[0]["created_at"]
    assert date.fromisoformat(on) == (datetime.fromisoformat(made) + timedelta(days=30)).date()
    check_lifecycle_invariants(db_url)


# --- input: stdin, JSON lines, dry runs, the rejects file ------------------------------------------


def test_rows_can_come_from_stdin(credex, db_url):
    result = bulk(credex, "-", "--json", input=HEADER + "u1,10,s-1,\nu2,20,s-2,\n")
    assert result.exit_code == 0, result.stderr
    assert result.json()["applied"] == 2
    jsonl = bulk(credex, "-", "--json", input='{"user_id": "u1", "points": 5, "ref": "s-3"}\n')
    assert jsonl.json()["applied"] == 1  # JSON lines recognised by their first character
    assert balance(credex, "u1") == 15
    check_lifecycle_invariants(db_url)


def test_json_lines_are_read_by_name_or_by_option(credex, db_url, tmp_path):
    lines = [
        {"user_id": "u1", "points": 100, "ref": "j-1", "reason": "welcome", "campaign": "ignored"},
        {"user_id": 42, "points": "20", "ref": "j-2"},
        {"user_id": "u1", "points": -30, "ref": "j-3"},
    ]
    path = write(tmp_path, "".join(json.dumps(line) + "\n" for line in lines), "grants.jsonl")
    result = bulk(credex, path, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["applied"] == 3 and result.json()["points_awarded"] == 90
    assert (balance(credex, "u1"), balance(credex, "42")) == (70, 20)
    other_name = write(tmp_path, path.read_text(), "grants.txt")
    assert bulk(credex, other_name, "--format", "jsonl", "--json").json()["duplicates"] == 3
    check_lifecycle_invariants(db_url)


def test_a_bad_json_line_is_a_rejected_row_with_its_line_number(credex, db_url, tmp_path):
    path = write(
        tmp_path,
        '{"user_id": "u1", "points": 10, "ref": "j-1"}\n'
        "\n"
        '{"user_id": "u1", "points": 10, "ref": \n'
        '["u1", 10, "j-3"]\n'
        '{"user_id": "u1", "points": 1.5, "ref": "j-4"}\n'
        '{"user_id": "u1", "points": true, "ref": "j-5"}\n'
        '{"user_id": "u1", "ref": "j-6"}\n'
        '{"user_id": "u1", "points": 10, "ref": "j-7"}\n',
        "grants.jsonl",
    )
    result = bulk(credex, path, "--json")
    assert result.exit_code == 3
    assert (result.json()["applied"], result.json()["rejected"]) == (2, 5)
    assert result.stderr.splitlines() == [
        "line 3: not a JSON object: Expecting value at character 41",
        "line 4: not a JSON object: list",
        "line 5: points must be a whole number, got 1.5",
        "line 6: points must be a whole number, got true",
        "line 7: points is missing",
    ]
    check_lifecycle_invariants(db_url)


def test_a_json_line_nested_deeper_than_the_parser_goes_is_a_rejected_row(credex, db_url, tmp_path):
    path = write(
        tmp_path,
        '{"user_id": "u1", "points": 10, "ref": "n-1"}\n'
        + "[" * 100_000
        + "]" * 100_000
        + "\n"
        + '{"user_id": "u1", "points": 10, "ref": "n-3"}\n',
        "grants.jsonl",
    )
    result = bulk(credex, path, "--json")
    assert result.exit_code == 3, result.stderr
    assert (result.json()["applied"], result.json()["rejected"]) == (2, 1)
    assert result.stderr.splitlines() == ["line 2: not a JSON object: JSON nested too deeply to read"]
    check_lifecycle_invariants(db_url)


def test_a_dry_run_writes_nothing_and_reports_what_a_real_run_does(credex, db_url, tmp_path):
    credex("award", "grant", "u1", "20", "--reason", "start", "--ref", "start")
    path = csv_file(
        tmp_path,
        "u1,-30,early,",
        "u1,100,top-up,",
        "u1,-30,later,",
        "u2,5,new,",
        "u2,5,new,",
        "u2,6,new,",
        "u1,20,start,",
        "u3,x,bad,",
        "u2,-10,too-much,",
    )
    dry = bulk(credex, path, "--json", "--dry-run", "--batch-size", "2", "--rejects", tmp_path / "dry.csv")
    assert dry.exit_code == 3
    assert len(ledger(db_url)) == 1 and rows_of(db_url, "SELECT count(*) FROM account") == [(1,)]
    real = bulk(credex, path, "--json", "--batch-size", "2", "--rejects", tmp_path / "real.csv")
    assert real.exit_code == 3
    assert {**dry.json(), "dry_run": False, "rejects_file": None} == {**real.json(), "rejects_file": None}
    assert dry.json()["dry_run"] is True and dry.json()["applied"] == 3
    assert dry.stderr == real.stderr
    assert (tmp_path / "dry.csv").read_text() == (tmp_path / "real.csv").read_text()
    human = bulk(credex, path, "--dry-run")
    assert "dry run: nothing written" in human.stdout
    check_lifecycle_invariants(db_url)


def test_the_rejects_file_keeps_each_refused_row_with_its_line_and_reason(credex, db_url, tmp_path):
    path = write(
        tmp_path,
        'user_id,points,ref,reason,campaign\nu1,10,ok,fine,spring\nu1,1.5,bad,"half, a point",spring\n'
        "u2,-3,poor,,spring\n",
    )
    rejects = tmp_path / "rejects.csv"
    result = bulk(credex, path, "--rejects", rejects, "--json")
    assert result.exit_code == 3 and result.json()["rejects_file"] == str(rejects)
    assert rejects.read_text() == (
        "user_id,points,ref,reason,campaign,line,error\n"
        'u1,1.5,bad,"half, a point",spring,3,"points must be a whole number, got \'1.5\'"\n'
        "u2,-3,poor,,spring,4,u2 has 0 points; taking 3 would go below zero\n"
    )
    no_reason = csv_file(tmp_path, "u1,x,r,", header="user_id,points,ref\n", name="plain.csv")
    bulk(credex, no_reason, "--rejects", rejects)
    assert rejects.read_text().splitlines()[0] == "user_id,points,ref,line,reason"

    jsonl = write(tmp_path, '{"user_id": "u1", "points": 0, "ref": "z"}\nnot json\n', "grants.jsonl")
    bulk(credex, jsonl, "--rejects", rejects)
    assert [json.loads(line) for line in rejects.read_text().splitlines()] == [
        {"user_id": "u1", "points": 0, "ref": "z", "line": 1, "error": "points must not be zero"},
        {
            "line": 2,
            "error": "not a JSON object: Expecting value at character 1",
            "text": "not json",
        },
    ]
    # fixed, the rejects file is a bulk file again: its extra columns are ignored
    fixed = write(
        tmp_path, "user_id,points,ref,line,reason\nu1,7,r,2,points must be a whole number\n", "fixed.csv"
    )
    assert bulk(credex, fixed, "--json").json()["applied"] == 1


def test_rows_of_the_wrong_width_keep_their_line_and_reason_in_place_and_are_refused_again(
    credex, db_url, tmp_path
):
    """A short row's line number used to land in its ref column, so the rejects file fed back
    as it was granted the row."""
    path = write(tmp_path, "user_id,points,ref,reason\nb3,5\nb3,5,br7,x,extra\nb4,6,ok\n")
    rejects = tmp_path / "rejects.csv"
    assert bulk(credex, path, "--rejects", rejects, "--json").json()["applied"] == 1
    assert rejects.read_text() == (
        "user_id,points,ref,reason,line,error\n"
        "b3,5,,,2,ref is missing (the row has 2 of 4 fields)\n"
        'b3,5,br7,x,3,"the row has 5 fields, the header 4 (an unquoted comma?)",extra\n'
    )
    again = bulk(credex, rejects, "--json")
    assert again.exit_code == 3
    assert again.json() | {"rejects_file": None} == {
        "applied": 0,
        "duplicates": 0,
        "rejected": 2,
        "points_awarded": 0,
        "rows": 2,
        "dry_run": False,
        "rejects_file": None,
    }
    assert balance(credex, "b4") == 6 and credex("account", "show", "b3", "--json").exit_code == 1


def test_a_rejects_file_that_is_the_input_or_the_database_is_refused_before_anything_is_written(
    credex, db_url, tmp_path
):
    """Opening the rejects file empties it: pointed at the SQLite database, a dry run erased
    every account."""
    assert credex("award", "grant", "w1", "5", "--reason", "x").exit_code == 0
    path = csv_file(tmp_path, "v1,x,vr1")
    targets = {"the file being read": [path]}
    if db_url.startswith("sqlite"):
        database = Path(db_url.removeprefix("sqlite:///"))
        link = tmp_path / "link.db"
        link.symlink_to(database)
        targets["the database"] = [database, link, Path(f"{database}-wal")]
    for what, paths in targets.items():
        for target in paths:
            before = target.read_bytes() if target.exists() else None
            for dry in ([], ["--dry-run"]):
                result = bulk(credex, path, "--rejects", target, "--json", *dry)
                assert result.exit_code == 2, (target, result.stdout, result.stderr)
                error = json.loads(result.stderr)["error"]
                assert (
                    error["code"] == "invalid_input" and f"--rejects must not be {what}" in error["message"]
                )
            if before is not None and target.name != "link.db":
                assert target.read_bytes() == before
    assert balance(credex, "w1") == 5


def test_a_line_longer_than_the_limit_is_skipped_unread_a_rejected_row_in_json_lines(
    credex, db_url, tmp_path
):
    """A 200 MB line was read whole (650 MB of memory) before being refused."""
    from credex.points.bulk_files import LINE_MAX

    huge = '{"user_id": "a", "points": 1, "ref": "' + "x" * (LINE_MAX + 10) + '"}'
    rows = ['{"user_id": "a", "points": 1, "ref": "j1"}', huge, '{"user_id": "a", "points": 2, "ref": "j3"}']
    jsonl = write(tmp_path, "\n".join(rows) + "\n", "grants.jsonl")
    rejects = tmp_path / "rejects.jsonl"
    result = bulk(credex, jsonl, "--json", "--rejects", rejects)
    assert result.exit_code == 3
    assert (result.json()["applied"], result.json()["rejected"]) == (2, 1)
    assert result.stderr == "line 2: the line is longer than 1 MiB\n"
    assert json.loads(rejects.read_text()) == {
        "line": 2,
        "error": "the line is longer than 1 MiB",
        "text": "",
    }

    csv_path = write(
        tmp_path, f"user_id,points,ref\nb,1,c1\nb,1,{'y' * (LINE_MAX + 10)}\nb,2,c3\n", "long.csv"
    )
    stopped = bulk(credex, csv_path, "--json")
    assert stopped.exit_code == 2
    assert "long.csv, line 3: longer than 1 MiB" in json.loads(stopped.stderr)["error"]["message"]
    assert balance(credex, "a") == 3 and balance(credex, "b") == 1


def test_a_rejected_json_row_holding_a_lone_surrogate_is_written_back_as_its_escape(credex, db_url, tmp_path):
    """Valid JSON, not UTF-8 text: writing it to the rejects file failed the run half way (exit 2
    after the rows before it were applied, no summary, an empty rejects file)."""
    lines = [
        '{"user_id": "u1", "points": 5, "ref": "s0"}',
        '{"user_id": "u-\\ud800", "points": 5, "ref": "s1"}',
        '{"user_id": "u1", "points": 7, "ref": "s2"}',
    ]
    path = write(tmp_path, "\n".join(lines) + "\n", "grants.jsonl")
    rejects = tmp_path / "rejects.jsonl"
    result = bulk(credex, path, "--rejects", rejects, "--json")
    assert result.exit_code == 3, result.stderr
    assert result.json() | {"rejects_file": None} == {
        "applied": 2,
        "duplicates": 0,
        "rejected": 1,
        "points_awarded": 12,
        "rows": 3,
        "dry_run": False,
        "rejects_file": None,
    }
    [line] = rejects.read_text(encoding="utf-8").splitlines()
    assert line.startswith('{"user_id": "u-\\ud800", "points": 5, "ref": "s1", "line": 2, "error": ')
    assert json.loads(line)["user_id"] == "u-\ud800"  # the row as it came in
    assert balance(credex, "u1") == 12


def test_columns_may_come_in_any_order_and_extra_columns_are_ignored(credex, db_url, tmp_path):
    path = csv_file(tmp_path, "spring,c-1,25,u1", header="Campaign, REF ,Points,user_id\n")
    result = bulk(credex, path, "--json")
    assert result.exit_code == 0, result.stderr
    assert balance(credex, "u1") == 25


# --- files that are not the format ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("", "empty.csv", "is empty: expected a header user_id,points,ref[,reason]"),
        ("name,amount\nu1,10\n", "other.csv", "has no user_id,points,ref[,reason] header"),
        ('{"user_id": "u1", "points": 1, "ref": "a"}\n', "lines.csv", "(JSON lines? use --format jsonl)"),
        ("user_id;points;ref\nu1;10;a\n", "semicolons.csv", "has no user_id,points,ref[,reason] header"),
        ("user_id,points,ref\n", "lines.jsonl", "is not JSON lines: line 1 is not a JSON object"),
        ("\x89PNG\r\n\x1a\n\x00\x00", "picture.csv", "has no user_id,points,ref[,reason] header"),
        ("user_id,points,ref,ref\nu1,1,a,a\n", "twice.csv", "the header names ref more than once"),
    ],
)
def test_a_file_that_is_not_the_format_exits_2_and_changes_nothing(
    credex, db_url, tmp_path, content, name, message
):
    path = write(tmp_path, content, name)
    result = bulk(credex, path, "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "invalid_input" and message in error["message"]
    plain = bulk(credex, path)
    assert plain.stderr.startswith("error: ") and len(plain.stderr.splitlines()) == 1


def test_a_missing_file_exits_2(credex, tmp_path):
    result = bulk(credex, tmp_path / "nowhere.csv")
    assert result.exit_code == 2
    assert result.stderr == f"error: cannot read {tmp_path / 'nowhere.csv'}: No such file or directory\n"


def test_a_line_that_is_not_utf8_stops_the_run_after_the_rows_before_it(credex, db_url, tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(HEADER.encode() + b"u1,10,a,\nu1,10,b,caf\xe9\nu1,10,c,\n")
    result = bulk(credex, path)
    assert result.exit_code == 2
    assert "line 3: not UTF-8 text" in result.stderr
    assert "the row before it was read (1 applied" in result.stderr
    assert [ref for _u, ref, *_ in ledger(db_url)] == ["a"]


def test_an_unreachable_database_exits_69(tmp_path):
    from tests.support import run_process

    path = csv_file(tmp_path, "u1,10,a,")
    result = run_process(
        "--database-url", "postgresql://postgres@127.0.0.1:1/credex", "award", "bulk", path, "--json"
    )
    assert result.exit_code == 69, result.stderr
    assert json.loads(result.stderr)["error"]["code"] == "unavailable" and result.stdout == ""
