"""Bulk runs as real processes: killed half way and run again, running beside shoppers who
redeem and the expiry cron job, and drawing a progress bar when stderr is a terminal."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
from sqlalchemy import text

from credex.db.engine import dispose_engines, get_engine
from tests.invariants import check_points_invariants
from tests.support import ROOT, credex_command, run_process, subprocess_env, wait_for
from tests.test_lifecycle_invariants import check_lifecycle_invariants

HEADER = "user_id,points,ref,reason\n"


@pytest.fixture
def other_db_url(db_url, request, tmp_path):
    """A second fresh database on the same backend, for a clean run to compare with."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'other.db'}"
        return
    from tests.conftest import make_postgres_database

    url, drop = make_postgres_database(request.getfixturevalue("postgres_template"))
    try:
        yield url
    finally:
        drop()


def campaign(rows: int, *, users: int = 20, seed: int = 7) -> list[str]:
    """Grants and corrections (some more than the balance has at their place in the file), rows
    repeated as appending scripts do, refs reused with other points, rows that are not numbers."""
    rng = random.Random(seed)
    lines: list[str] = []
    positive: list[str] = []
    for n in range(rows):
        user = f"u{rng.randrange(users)}"
        roll = rng.random()
        if positive and roll < 0.05:
            # A grant repeated, as scripts that append do: a duplicate. (A correction repeated,
            # refused at first and applied further on, is a duplicate at both lines on a re-run:
            # the counts then differ from a single run's, the balances do not.)
            lines.append(rng.choice(positive))
            continue
        if positive and roll < 0.07:
            earlier = rng.choice(positive).split(",")
            lines.append(f"{earlier[0]},{int(earlier[1]) + 1},{earlier[2]},other points\n")  # a conflict
            continue
        if roll < 0.08:
            lines.append(f"{user},lots,c-{n},not a number\n")
            continue
        points = -rng.randint(1, 400) if roll < 0.3 else rng.randint(1, 300)
        lines.append(f"{user},{points},c-{n},row {n}\n")
        if points > 0:
            positive.append(lines[-1])
    return lines


def snapshot(db_url: str) -> dict:
    """Everything a run writes, without ids and times: equal for runs that did the same."""
    queries = {
        "accounts": "SELECT user_id, balance, debt, earned FROM account ORDER BY user_id",
        "ledger": (
            "SELECT user_id, kind, ref, points, debt, balance, detail, reason FROM ledger_entry "
            "ORDER BY user_id, id"
        ),
        "lots": (
            "SELECT p.user_id, l.ref, p.points, p.remaining, p.state FROM point_lot p "
            "JOIN ledger_entry l ON l.id = p.entry_id ORDER BY p.user_id, p.id"
        ),
        "uses": (
            "SELECT made.ref, took.ref, u.points FROM lot_use u JOIN point_lot p ON p.id = u.lot_id "
            "JOIN ledger_entry made ON made.id = p.entry_id JOIN ledger_entry took ON took.id = u.entry_id "
            "ORDER BY made.ref, took.ref"
        ),
    }
    with get_engine(db_url).connect() as connection:
        return {name: [tuple(row) for row in connection.execute(text(sql))] for name, sql in queries.items()}


def ledger_count(db_url: str) -> int:
    with get_engine(db_url).connect() as connection:
        return connection.execute(text("SELECT count(*) FROM ledger_entry")).scalar()


@pytest.mark.slow
def test_a_run_killed_half_way_and_run_again_counts_every_row_exactly_once(db_url, other_db_url, tmp_path):
    rows = campaign(1500)
    path = tmp_path / "campaign.csv"
    path.write_text(HEADER + "".join(rows))
    clean = run_process("--database-url", other_db_url, "award", "bulk", path, "--json")
    assert clean.exit_code == 3, clean.stderr  # corrections that do not fit, conflicts, not numbers
    applied = clean.json()["applied"]

    run_process("--database-url", db_url, "db", "upgrade")
    killed = subprocess.Popen(
        credex_command("--database-url", db_url, "award", "bulk", "-", "--batch-size", "25", "--json"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=subprocess_env(),
    )
    try:
        killed.stdin.write((HEADER + "".join(rows[:1000])).encode())
        killed.stdin.flush()  # the rest of the file never comes: the run is still going when killed
        wait_for(lambda: ledger_count(db_url) >= 200, timeout=60, what="some batches committed")
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()
    assert killed.returncode == -signal.SIGKILL
    part = ledger_count(db_url)
    assert 200 <= part < applied
    dispose_engines()

    again = run_process("--database-url", db_url, "award", "bulk", path, "--json")
    assert again.exit_code == 3, again.stderr
    summary = again.json()
    assert summary["applied"] == applied - part
    assert summary["duplicates"] == clean.json()["duplicates"] + part
    assert summary["rejected"] == clean.json()["rejected"]
    assert snapshot(db_url) == snapshot(other_db_url)
    check_lifecycle_invariants(db_url)
    refs = [ref for _u, _k, ref, *_ in snapshot(db_url)["ledger"]]
    assert len(refs) == len(set(refs)) == applied


@pytest.mark.slow
def test_a_bulk_run_beside_redeeming_shoppers_and_the_cron_jobs_keeps_every_rule(db_url, tmp_path):
    from tests.test_lifecycle_concurrency import USERS, fill

    run_process("--database-url", db_url, "db", "upgrade")
    run_process("--database-url", db_url, "catalog", "add", "GIFT", "--name", "Gift", "--points", "7")
    fill(db_url)  # points past their expiry date and pending points due: the cron jobs have work
    grants_before = grant_count(db_url)
    path = tmp_path / "campaign.csv"
    path.write_text(HEADER + "".join(campaign(1200, users=len(USERS) + 1, seed=11)))
    go = tmp_path / "go"
    env = subprocess_env()

    def start(command: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )

    redeemers = [
        start([sys.executable, "-m", "tests.workers.redeemer", db_url, str(go), user, "GIFT", "40"])
        for user in USERS
    ]
    bulk = start(
        credex_command("--database-url", db_url, "award", "bulk", path, "--batch-size", "50", "--json")
    )
    go.touch()
    cron = [
        start(credex_command("--database-url", db_url, "award", job, "--json"))
        for job in ("expire", "settle")
    ]

    out, err = bulk.communicate(timeout=180)
    assert bulk.returncode in (0, 3), err
    summary = json.loads(out)
    assert summary["applied"] + summary["duplicates"] + summary["rejected"] == 1200
    for job in cron:
        _out, errors = job.communicate(timeout=180)
        assert job.returncode == 0, errors
    redeemed = 0
    for redeemer in redeemers:
        lines, errors = redeemer.communicate(timeout=180)
        assert redeemer.returncode == 0, errors
        redeemed += sum(1 for line in lines.splitlines() if line.startswith("ok "))
    assert redeemed > 0
    dispose_engines()
    check_points_invariants(db_url)
    check_lifecycle_invariants(db_url)
    assert grant_count(db_url) == grants_before + summary["applied"]


def grant_count(db_url: str) -> int:
    with get_engine(db_url).connect() as connection:
        return connection.execute(text("SELECT count(*) FROM ledger_entry WHERE kind = 'grant'")).scalar()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_a_progress_bar_is_drawn_on_stderr_when_it_is_a_terminal(db_url, tmp_path):
    import pty

    path = tmp_path / "campaign.csv"
    path.write_text(HEADER + "".join(f"u{n % 7},5,p-{n},\n" for n in range(300)))
    leader, follower = pty.openpty()
    child = subprocess.Popen(
        credex_command("--database-url", db_url, "award", "bulk", path, "--json", "--batch-size", "50"),
        stdout=subprocess.PIPE,
        stderr=follower,
        cwd=ROOT,
        env=subprocess_env(TERM="xterm", COLUMNS="120"),
    )
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        drawn += chunk
    out, _ = child.communicate(timeout=60)
    os.close(leader)
    assert child.returncode == 0
    assert b"granting" in drawn and b"300 rows" in drawn and b"rows/s" in drawn
    assert out.decode().startswith('{"applied": 300,')  # stdout keeps the summary alone


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("clash", ["account", "ledger_entry"])
def test_two_runs_that_meet_at_a_unique_index_grant_each_row_once(db_url, tmp_path, clash):
    """Postgres: both runs read their accounts and refs (nothing yet) and then wait at the table a
    test transaction holds. The one let through second finds the first's accounts (new shoppers)
    or refs (the same refs for other shoppers) taken: its batch is rolled back and starts again,
    and sees them as duplicates or conflicts. Nothing is written twice and both runs end."""
    import psycopg

    from tests.support import lock_waiters

    run_process("--database-url", db_url, "db", "upgrade")
    if clash == "account":  # the same rows for shoppers nobody has seen
        files = [[f"new{n % 4},{10 + n},r-{n},welcome\n" for n in range(30)]] * 2
    else:  # the same refs for two shoppers who have accounts already
        for user in ("a", "b"):
            run_process(
                "--database-url",
                db_url,
                "award",
                "grant",
                user,
                "1",
                "--reason",
                "open",
                "--ref",
                f"o-{user}",
            )
        files = [[f"{user},{10 + n},r-{n},welcome\n" for n in range(30)] for user in ("a", "b")]
    paths = []
    for n, rows in enumerate(files):
        paths.append(tmp_path / f"run{n}.csv")
        paths[-1].write_text(HEADER + "".join(rows))
    env = subprocess_env()
    with psycopg.connect(db_url) as holder:
        holder.execute(f"LOCK TABLE {clash} IN SHARE MODE")  # lets reads and row locks through
        runs = [
            subprocess.Popen(
                credex_command("--database-url", db_url, "award", "bulk", path, "--json"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=env,
            )  # fmt: skip
            for path in paths
        ]
        wait_for(lambda: lock_waiters(db_url) >= 2, timeout=90, what=f"both runs waiting at {clash}")
    outputs = [run.communicate(timeout=120) for run in runs]
    results = [(run.returncode, out, err) for run, (out, err) in zip(runs, outputs, strict=True)]
    reports = sorted((json.loads(out) for _code, out, _err in results), key=lambda r: r["applied"])
    assert reports[1]["applied"] == 30, results
    if clash == "account":
        assert [r["duplicates"] for r in reports] == [30, 0]
        assert sorted(code for code, _out, _err in results) == [0, 0]
    else:
        assert [r["rejected"] for r in reports] == [30, 0]  # each ref was recorded for the other shopper
        assert sorted(code for code, _out, _err in results) == [0, 3]
    dispose_engines()
    check_points_invariants(db_url)
    check_lifecycle_invariants(db_url)
    assert grant_count(db_url) == 30 + (2 if clash == "ledger_entry" else 0)
    with get_engine(db_url).connect() as connection:
        accounts = connection.execute(text("SELECT count(*) FROM account")).scalar()
    assert accounts == (4 if clash == "account" else 2)
