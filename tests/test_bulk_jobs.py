"""award bulk --jobs on Postgres: batches written by several processes at once end exactly as one
process would have written them (the same rows, ids in file order, the same rejects), and a run
whose process or one of its writers is killed while batches wait for their turn leaves whole
batches of a prefix of the file, which the next run completes. A batch waiting for its turn to
commit lets go when an earlier batch waits for a lock through another transaction."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import psycopg
import pytest

from credex.db.engine import dispose_engines
from tests.invariants import check_points_invariants
from tests.support import ROOT, credex_command, holding_accounts, run_process, subprocess_env, wait_for
from tests.test_bulk_processes import HEADER, campaign, snapshot
from tests.test_lifecycle_invariants import check_lifecycle_invariants

pytestmark = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


@pytest.fixture
def other_db_url(request):
    from tests.conftest import make_postgres_database

    url, drop = make_postgres_database(request.getfixturevalue("postgres_template"))
    try:
        yield url
    finally:
        drop()


def in_id_order(db_url: str) -> list[tuple]:
    """Every entry in the order of its id (ids themselves differ between databases)."""
    with psycopg.connect(db_url) as connection:
        return connection.execute(
            "SELECT user_id, ref, points, balance FROM ledger_entry ORDER BY id"
        ).fetchall()


def bulk(db_url: str, path: Path, *args: object):
    return run_process("--database-url", db_url, "award", "bulk", path, "--json", *args, timeout=180)


def grants_only(rows: int, *, users: int, seed: int) -> list[str]:
    """The campaign's rows without its corrections: every batch goes to a writer process."""
    return [line for line in campaign(rows, users=users, seed=seed) if ",-" not in line]


@pytest.mark.slow
@pytest.mark.parametrize(
    "rows",
    [
        pytest.param(lambda: grants_only(600, users=15, seed=3), id="few-shoppers"),
        pytest.param(lambda: grants_only(600, users=5000, seed=4), id="many-shoppers"),
        pytest.param(lambda: campaign(600, users=40, seed=5), id="with-corrections"),
    ],
)
def test_writer_processes_end_as_one_process_would(db_url, other_db_url, tmp_path, rows):
    path = tmp_path / "campaign.csv"
    path.write_text(HEADER + "".join(rows()))
    alone = bulk(other_db_url, path, "--batch-size", "20", "--jobs", "1", "--rejects", tmp_path / "alone.csv")
    many = bulk(db_url, path, "--batch-size", "20", "--jobs", "3", "--rejects", tmp_path / "many.csv")
    assert alone.exit_code == many.exit_code == 3, (alone.stderr, many.stderr)  # conflicts, not numbers
    assert {**many.json(), "rejects_file": None} == {**alone.json(), "rejects_file": None}
    assert (tmp_path / "many.csv").read_text() == (tmp_path / "alone.csv").read_text()
    assert many.stderr.replace("many.csv", "alone.csv") == alone.stderr  # the first rejects, in order
    dispose_engines()
    assert snapshot(db_url) == snapshot(other_db_url)
    assert in_id_order(db_url) == in_id_order(other_db_url)  # ids grow in file order
    check_points_invariants(db_url)
    check_lifecycle_invariants(db_url)

    again = bulk(db_url, path, "--batch-size", "20", "--jobs", "3")
    assert again.json()["applied"] == 0
    assert again.json()["duplicates"] == alone.json()["applied"] + alone.json()["duplicates"]


def test_a_line_that_cannot_be_read_stops_the_run_after_every_row_before_it(db_url, tmp_path):
    rows = [f"u{n % 37},{n + 1},r-{n},x\n" for n in range(300)]
    path = tmp_path / "broken.csv"
    path.write_bytes((HEADER + "".join(rows)).encode() + b"u1,5,r-x,\xff\n" + b"u2,5,r-y,after\n")
    outcome = bulk(db_url, path, "--batch-size", "20", "--jobs", "3")
    assert outcome.exit_code == 2, outcome.stderr
    assert "line 302: not UTF-8 text; the 300 rows before it were read (300 applied" in outcome.stderr
    dispose_engines()
    assert [ref for _user, ref, _points, _balance in in_id_order(db_url)] == [f"r-{n}" for n in range(300)]


def test_jobs_out_of_range_is_a_usage_error_that_changes_nothing(db_url, tmp_path):
    from typer.testing import CliRunner

    from credex.cli import app

    path = tmp_path / "one.csv"
    path.write_text(HEADER + "u1,5,r-1,x\n")
    for jobs in ("0", "17", "-1", "two"):
        arguments = ["--database-url", db_url, "award", "bulk", str(path), "--jobs", jobs]
        outcome = CliRunner().invoke(app, arguments)
        assert outcome.exit_code == 2, outcome.output
        assert "--jobs" in outcome.stderr
    dispose_engines()
    assert in_id_order(db_url) == []


# --- killed at an awkward moment ------------------------------------------------------------------

BATCH = 10
HELD_BATCH = 6  # holds the shopper whose account the test keeps locked
BATCHES = 12


def held_file(tmp_path: Path) -> Path:
    """Twelve batches of ten shoppers each, no shopper in two batches; batch 6 grants to ``held``."""
    rows = []
    for batch in range(BATCHES):
        for n in range(BATCH):
            user = "held" if (batch, n) == (HELD_BATCH, 0) else f"b{batch}-{n}"
            rows.append(f"{user},{batch + 1},r-{batch}-{n},batch {batch}\n")
    path = tmp_path / "held.csv"
    path.write_text(HEADER + "".join(rows))
    return path


def sessions(db_url: str, state: str | None = None) -> int:
    """The other sessions on this database (in ``state``)."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        return connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
            "AND (%s::text IS NULL OR state = %s::text)",
            (state, state),
        ).fetchone()[0]


def grants_of_batches(db_url: str) -> set[int]:
    with psycopg.connect(db_url) as connection:
        refs = connection.execute("SELECT ref FROM ledger_entry WHERE ref LIKE 'r-%%'").fetchall()
    batches = [int(ref.split("-")[1]) for (ref,) in refs]
    return {batch for batch in batches if batches.count(batch) == BATCH}


def writers_of(pid: int) -> list[int]:
    """The writer processes a run forked (the only children it has)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append(int(entry.name))
    return found


def kill_leftovers(run: subprocess.Popen | None, writers: list[int]) -> None:
    """A failed test leaves no process behind (a writer is a fork of the run: its command line)."""
    if run is not None:
        command = " ".join(map(str, run.args)).encode()
        for pid in writers:
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip() == command:
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        if run.poll() is None:
            run.kill()
            run.wait()


def start_held_run(db_url: str, path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        credex_command(
            "--database-url", db_url, "award", "bulk", path, "--json", "--batch-size", BATCH, "--jobs", 3
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
        start_new_session=True,  # a group of its own, for Ctrl-C
        preexec_fn=interruptible,
    )


def interruptible() -> None:
    """In the run, before it starts: Ctrl-C's default action, as from a terminal. A shell starts
    a job in the background with SIGINT ignored, and a program keeps that (Python then installs no
    KeyboardInterrupt), so a suite started that way would otherwise send Ctrl-C into the void."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ids_drawn(db_url: str) -> int:
    with psycopg.connect(db_url) as connection:
        return connection.execute("SELECT last_value FROM ledger_entry_id_seq").fetchone()[0]


def wait_for_batches_in_flight(db_url: str, run: subprocess.Popen) -> None:
    """Batches 0-5 committed; batch 6 waits for the held account; the two after it drew their
    ids, were written and wait for their turn to commit (no statement of theirs runs)."""
    wait_for(lambda: grants_of_batches(db_url) == set(range(HELD_BATCH)), timeout=90, what="batches 0-5")
    wait_for(lambda: ids_drawn(db_url) >= 1 + (HELD_BATCH + 3) * BATCH, timeout=30, what="batches 7, 8 dealt")
    wait_for(lambda: sessions(db_url, "active") == 1, timeout=30, what="only batch 6 busy, waiting")
    assert run.poll() is None


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim", ["the run", "a writer", "ctrl-c"])
def test_a_run_killed_while_batches_wait_for_their_turn_keeps_a_prefix(
    db_url, other_db_url, tmp_path, victim
):
    """Killed (the run, or one writer) or interrupted while batch 6 waits for an account another
    program holds and batches 7-8 wait for their turn: batches 0-5 stay, nothing after them."""
    path = held_file(tmp_path)
    for url in (db_url, other_db_url):
        run_process("--database-url", url, "award", "grant", "held", "1", "--ref", "open", "--reason", "open")
    clean = bulk(other_db_url, path, "--jobs", "1")
    assert clean.exit_code == 0, clean.stderr

    writers: list[int] = []
    run = None
    try:
        with holding_accounts(db_url, "held"):
            run = start_held_run(db_url, path)
            wait_for_batches_in_flight(db_url, run)
            writers = writers_of(run.pid)
            assert len(writers) == 3
            if victim == "the run":
                run.send_signal(signal.SIGKILL)
                run.wait(timeout=30)
            elif victim == "ctrl-c":  # the whole group, as a terminal sends it
                os.killpg(run.pid, signal.SIGINT)
                out, err = run.communicate(timeout=20)  # at once, though batch 6 still waits
                assert run.returncode == 130, (out, err)
                assert "interrupted" in err and "Traceback" not in err
            else:
                os.kill(writers[0], signal.SIGKILL)
        # The held account is free again: the batch that waited for it goes on, and must not commit.
        if victim == "a writer":
            out, err = run.communicate(timeout=120)
            assert run.returncode == 69, (out, err)
            assert "a writer process of this run ended unexpectedly" in err
            assert "Traceback" not in err
        elif victim == "the run":
            assert run.returncode == -signal.SIGKILL
        wait_for(lambda: sessions(db_url) == 0, timeout=60, what="every writer gone from the database")
        alive = [Path(f"/proc/{pid}") for pid in writers]
        wait_for(lambda: not any(path.exists() for path in alive), timeout=30, what="writers ended")
    finally:
        kill_leftovers(run, writers)
    assert grants_of_batches(db_url) == set(range(HELD_BATCH))  # whole batches of a prefix
    dispose_engines()
    check_points_invariants(db_url)

    again = bulk(db_url, path, "--batch-size", BATCH, "--jobs", "3")
    assert again.exit_code == 0, again.stderr
    assert again.json()["duplicates"] == HELD_BATCH * BATCH
    assert snapshot(db_url) == snapshot(other_db_url)
    assert in_id_order(db_url) == in_id_order(other_db_url)
    check_lifecycle_invariants(db_url)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_batch_lets_go_when_an_earlier_one_waits_through_another_transaction(
    db_url, other_db_url, tmp_path
):
    """Another program holds A and then asks for B. Batch 1 (A) waits for it; batch 2 (B) is
    written and waits for batch 1 to commit first. Were batch 2 to keep B, the program would wait
    for batch 2, batch 2 for batch 1 and batch 1 for the program, a wait the server cannot see
    whole: batch 2 lets go of B, and everyone finishes."""
    for url in (db_url, other_db_url):
        for user in ("A", "B"):
            run_process(
                "--database-url",
                url,
                "award",
                "grant",
                user,
                "1",
                "--ref",
                f"open-{user}",
                "--reason",
                "open",
            )
    path = tmp_path / "ab.csv"
    path.write_text(HEADER + "Z,5,r-0,first\nA,6,r-1,second\nB,7,r-2,third\n")
    clean = bulk(other_db_url, path, "--batch-size", "1", "--jobs", "1")
    assert clean.exit_code == 0, clean.stderr

    program = psycopg.connect(db_url)
    program.execute("SET statement_timeout = '60s'")  # a wait nobody ends fails the test, not hangs it
    program.execute("SELECT 1 FROM account WHERE user_id = 'A' FOR UPDATE")
    run = subprocess.Popen(
        credex_command(
            "--database-url", db_url, "award", "bulk", path, "--json", "--batch-size", 1, "--jobs", 2
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
    )
    got_b: list[object] = []
    try:
        from tests.support import lock_waiters

        wait_for(lambda: lock_waiters(db_url) >= 1, timeout=90, what="batch 1 waiting for A")

        def take_b() -> None:
            try:
                program.execute("SELECT 1 FROM account WHERE user_id = 'B' FOR UPDATE")
                got_b.append(True)
            except psycopg.Error as error:
                got_b.append(error)

        taker = threading.Thread(target=take_b)
        taker.start()
        taker.join(timeout=90)
        assert got_b == [True]  # batch 2 let go of B
        program.commit()
        out, err = run.communicate(timeout=120)
    finally:
        program.close()
        kill_leftovers(run, writers_of(run.pid))
    assert run.returncode == 0, (out, err)
    assert json.loads(out)["applied"] == 3
    dispose_engines()
    assert in_id_order(db_url) == in_id_order(other_db_url)
    assert snapshot(db_url) == snapshot(other_db_url)
