"""Bulk grants from a CSV file: `credex award bulk` against a bare-driver script doing the same
work, in one run, on fresh databases.

    python bench/bulk.py --backend sqlite --rows 1000000
    python bench/bulk.py --backend postgres --rows 1000000
    python bench/bulk.py --rows 100000 --runs 1          # a quick look while developing

The file is a campaign: --rows positive grants with unique refs over --users shoppers (about one
row in fifty gives the same shopper a second grant in the same batch). Both sides run as child
processes, from interpreter start to exit, on a fresh database at credex's newest schema each,
and alternate for --runs rounds; the medians are compared. The load average is printed with them:
the machine is shared.

- credex: the real command line, `credex award bulk FILE --json` (`--jobs` passes its own; by
  default credex's default: on Postgres, writer processes beside the run's). Reported: the peak
  RSS of its largest process (ru_maxrss of the child), and the peak memory of all its processes
  together (PSS, which counts a page shared between them once), which the memory goal is judged
  on.
- bare: the same rows and rules with the driver alone, written the way a DBA would load them:
  parse the CSV, check every field (non-empty ids within their lengths, points a non-zero whole
  number within 64 bits, the row's width), skip refs already recorded or seen earlier in the file,
  keep the balances in a dict, and in one transaction per batch of --batch-size rows write the
  same ledger entries (with each one's balance after it), the same lots, new accounts and the new
  balances: one executemany (SQLite) or one binary COPY (Postgres) per table, the balances of
  existing accounts with one executemany UPDATE. SQLite gets the same connection settings as credex's bulk
  connection (credex.points.bulk.BULK_PRAGMAS): the comparison is of the two programs on one
  schema, not of their settings. A campaign has no negative grants and a fresh database no debt,
  so the bare side needs neither lot spending nor debt payment; credex still runs its general
  path.

Goals: at least 60,000 rows/s on each backend, credex at most 1.5x the bare time, credex's peak
memory (its processes together) under 200 MiB.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from databases import drop_database, fresh_database  # noqa: E402

INT64_MAX = 2**63 - 1
GOAL_RATIO = 1.5
GOAL_ROWS_PER_S = 60_000
GOAL_MIB = 200


# --- the bare side (runs in a child process: python bench/bulk.py --bare URL FILE BATCH) --------------


def _checked_rows(path: str):
    """(user_id, points, ref, reason) of each valid row, as the bulk rules check them."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader)]
        width = len(header)
        user_at, points_at, ref_at = header.index("user_id"), header.index("points"), header.index("ref")
        reason_at = header.index("reason") if "reason" in header else None
        for fields in reader:
            if len(fields) != width:
                continue
            user, text, ref = fields[user_at].strip(), fields[points_at].strip(), fields[ref_at].strip()
            digits = text[1:] if text[:1] in "+-" else text
            if not (user and ref and len(user) <= 128 and len(ref) <= 255):
                continue
            if not (digits.isdigit() and digits.isascii() and len(digits) <= 19):
                continue
            points = int(text)
            if points == 0 or abs(points) > INT64_MAX:
                continue
            reason = fields[reason_at].strip() if reason_at is not None else ""
            yield user, points, ref, reason or "bulk grant"


def _batches(path: str, size: int):
    batch = []
    for row in _checked_rows(path):
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def bare_sqlite(url: str, path: str, batch_size: int) -> None:
    import json
    import sqlite3
    from datetime import UTC, datetime

    from credex.points.bulk import BULK_PRAGMAS

    db = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    engine = ("busy_timeout = 30000", "journal_mode = WAL", "synchronous = NORMAL", "foreign_keys = ON")
    for pragma in (*engine, *BULK_PRAGMAS):
        db.execute(f"PRAGMA {pragma}")
    for batch in _batches(path, batch_size):
        stamp = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        db.execute("BEGIN IMMEDIATE")
        refs = json.dumps([ref for _u, _p, ref, _r in batch])
        seen = {
            ref: (user, detail)
            for ref, user, detail in db.execute(
                "SELECT ref, user_id, detail FROM ledger_entry WHERE kind = 'grant' "
                "AND ref IN (SELECT value FROM json_each(?))",
                (refs,),
            )
        }
        users = json.dumps(sorted({user for user, _p, _r, _s in batch}))
        accounts = {
            user: [balance, earned]
            for user, balance, earned in db.execute(
                "SELECT user_id, balance, earned FROM account "
                "WHERE user_id IN (SELECT value FROM json_each(?))",
                (users,),
            )
        }
        (entry_id,) = db.execute("SELECT coalesce(max(id), 0) FROM ledger_entry").fetchone()
        (lot_id,) = db.execute("SELECT coalesce(max(id), 0) FROM point_lot").fetchone()
        new, changed, entries, lots = [], {}, [], []
        for user, points, ref, reason in batch:
            detail = f"points={points}"
            if ref in seen:
                continue
            seen[ref] = (user, detail)
            account = changed.get(user) or accounts.get(user)
            if account is None:
                account = [0, 0]
                new.append(user)
            balance = account[0] + points
            changed[user] = [balance, account[1] + points]
            entry_id += 1
            lot_id += 1
            entries.append((entry_id, user, ref, points, balance, detail, "bench", reason, stamp))
            lots.append((lot_id, user, entry_id, points, points, "available", stamp, None, stamp))
        db.executemany(
            "INSERT INTO account (user_id, balance, earned, redeemed, pending, debt, created_at, updated_at) "
            "VALUES (?, ?, ?, 0, 0, 0, ?, ?)",
            [(user, *changed[user], stamp, stamp) for user in sorted(new)],
        )
        db.executemany(
            "INSERT INTO ledger_entry (id, user_id, kind, ref, points, pending, debt, balance, detail, "
            "operator, reason, created_at) VALUES (?, ?, 'grant', ?, ?, 0, 0, ?, ?, ?, ?, ?)",
            entries,
        )
        db.executemany(
            "INSERT INTO point_lot (id, user_id, entry_id, points, remaining, state, available_at, "
            "expires_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            lots,
        )
        fresh = set(new)
        db.executemany(
            "UPDATE account SET balance = ?, earned = ?, updated_at = ? WHERE user_id = ?",
            [(b, e, stamp, u) for u, (b, e) in changed.items() if u not in fresh],
        )
        db.execute("COMMIT")


def bare_postgres(url: str, path: str, batch_size: int) -> None:
    from datetime import UTC, datetime

    import psycopg

    def next_ids(cursor, sequence: str, count: int) -> list[int]:
        rows = cursor.execute("SELECT nextval(%s::regclass) FROM generate_series(1, %s)", (sequence, count))
        return sorted(row[0] for row in rows)

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as db:
        cursor = db.cursor()
        entry_seq = cursor.execute("SELECT pg_get_serial_sequence('ledger_entry', 'id')").fetchone()[0]
        lot_seq = cursor.execute("SELECT pg_get_serial_sequence('point_lot', 'id')").fetchone()[0]
        for batch in _batches(path, batch_size):
            now = datetime.now(UTC)
            seen = {
                ref
                for (ref,) in cursor.execute(
                    "SELECT ref FROM ledger_entry WHERE kind = 'grant' AND ref = ANY(%s)",
                    ([ref for _u, _p, ref, _r in batch],),
                )
            }
            users = sorted({user for user, _p, _r, _s in batch})
            accounts = {
                user: [balance, earned]
                for user, balance, earned in cursor.execute(
                    "SELECT user_id, balance, earned FROM account WHERE user_id = ANY(%s) "
                    "ORDER BY user_id FOR UPDATE",
                    (users,),
                )
            }
            new, changed, entries = [], {}, []
            for user, points, ref, reason in batch:
                if ref in seen:
                    continue
                seen.add(ref)
                account = changed.get(user) or accounts.get(user)
                if account is None:
                    account = [0, 0]
                    new.append(user)
                balance = account[0] + points
                changed[user] = [balance, account[1] + points]
                entries.append((user, ref, points, balance, reason))
            entry_ids = next_ids(cursor, entry_seq, len(entries))
            lot_ids = next_ids(cursor, lot_seq, len(entries))
            with cursor.copy(
                "COPY account (user_id, balance, earned, redeemed, pending, debt, created_at, updated_at) "
                "FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["varchar", *["int8"] * 5, "timestamptz", "timestamptz"])
                for user in sorted(new):
                    copy.write_row((user, *changed[user], 0, 0, 0, now, now))
            with cursor.copy(
                "COPY ledger_entry (id, user_id, kind, ref, points, pending, debt, balance, detail, "
                "operator, reason, created_at) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(
                    ["int8", "varchar", "varchar", "varchar", *["int8"] * 4, "varchar", "varchar", "text"]
                    + ["timestamptz"]
                )
                for n, (user, ref, points, balance, reason) in enumerate(entries):
                    row = (entry_ids[n], user, "grant", ref, points, 0, 0, balance, f"points={points}")
                    copy.write_row((*row, "bench", reason, now))
            with cursor.copy(
                "COPY point_lot (id, user_id, entry_id, points, remaining, state, available_at, "
                "expires_at, created_at) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int8", "varchar", "int8", "int8", "int8", "varchar", *["timestamptz"] * 3])
                for n, (user, _ref, points, _balance, _reason) in enumerate(entries):
                    copy.write_row(
                        (lot_ids[n], user, entry_ids[n], points, points, "available", now, None, now)
                    )
            fresh = set(new)
            cursor.executemany(
                "UPDATE account SET balance = %s, earned = %s, updated_at = %s WHERE user_id = %s",
                [(b, e, now, u) for u, (b, e) in changed.items() if u not in fresh],
            )
            db.commit()


# --- set-up and measurement -----------------------------------------------------------------------------


def make_file(path: Path, rows: int, users: int) -> int:
    """The campaign file; returns the points it grants."""
    rng = random.Random(20261125)
    total = 0
    with open(path, "w", encoding="utf-8", newline="") as handle:
        out = csv.writer(handle, lineterminator="\n")
        out.writerow(["user_id", "points", "ref", "reason"])
        for n in range(rows):
            user = n % users if rng.random() < 0.98 else (n - 1) % users  # now and then a second grant
            points = rng.randint(1, 500)
            total += points
            out.writerow([f"u-{user:07d}", points, f"spring-2026-{n:08d}", "spring campaign"])
    return total


def totals(url: str) -> tuple[int, int, int, int]:
    """(entries, lots, sum of balances, sum of the entries' balance-after): equal on both sides."""
    from sqlalchemy import text

    from credex.db.engine import dispose_engines, get_engine

    with get_engine(url).connect() as connection:
        row = connection.execute(
            text(
                "SELECT (SELECT count(*) FROM ledger_entry), (SELECT count(*) FROM point_lot), "
                "(SELECT coalesce(sum(balance), 0) FROM account), "
                "(SELECT coalesce(sum(balance), 0) FROM ledger_entry)"
            )
        ).one()
    dispose_engines()
    return tuple(int(value) for value in row)


def _tree_pss(pid: int) -> int:
    """KiB of proportional memory (PSS: shared pages split between their users) of ``pid`` and
    its children (a run's writer processes)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    total = 0
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def run_child(command: list[str]) -> tuple[float, float, float]:
    """Seconds from start to exit, the peak RSS of its largest process (the child or one of its
    own children) and the peak PSS of all of them together, in MiB (sampled every 0.25 s)."""
    env = {**os.environ, "CREDEX_OPERATOR": "bench", "PYTHONPATH": str(ROOT)}
    began = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    together = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            together[0] = max(together[0], _tree_pss(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = child.stdout.read()
    err = child.stderr.read()
    _pid, status, usage = os.wait4(child.pid, 0)
    done.set()
    sampler.join()
    elapsed = time.perf_counter() - began
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(
            f"{command[2:5]} failed ({child.returncode}): {err.decode()[-2000:]} {out.decode()[-500:]}"
        )
    return elapsed, usage.ru_maxrss / 1024, together[0] / 1024


def run(
    backend: str, path: Path, rows: int, runs: int, batch_size: int, workdir: Path, jobs: int | None
) -> bool:
    times: dict[str, list[float]] = {"bare": [], "credex": []}
    peaks: list[float] = []
    togethers: list[float] = []
    seen_totals = set()
    for _ in range(runs):
        for side in ("bare", "credex"):
            url = fresh_database(backend, workdir)
            try:
                if side == "credex":
                    command = [
                        sys.executable,
                        "-m",
                        "credex",
                        "--database-url",
                        url,
                        "award",
                        "bulk",
                        str(path),
                    ]
                    command += ["--json", "--batch-size", str(batch_size)]
                    command += [] if jobs is None else ["--jobs", str(jobs)]
                else:
                    command = [sys.executable, __file__, "--bare", url, str(path), str(batch_size)]
                elapsed, peak, together = run_child(command)
                times[side].append(elapsed)
                if side == "credex":
                    peaks.append(peak)
                    togethers.append(together)
                seen_totals.add(totals(url))
            finally:
                drop_database(url)
    if len(seen_totals) != 1:
        raise SystemExit(f"the two sides wrote different things: {sorted(seen_totals)}")
    entries, lots, _balances, _after = seen_totals.pop()
    if entries != rows or lots != rows:
        raise SystemExit(f"expected {rows} entries and lots, found {entries} and {lots}")
    bare, credex = statistics.median(times["bare"]), statistics.median(times["credex"])
    ratio = credex / bare
    peak = max(peaks)
    together = max(togethers)
    bare_name = "bare sqlite3 executemany" if backend == "sqlite" else "bare psycopg COPY"
    print(f"{backend}: {rows:,} rows, batches of {batch_size}, {runs} run(s) each side")
    print(
        f"  {bare_name:28}: median {bare:7.2f} s  ({rows / bare:9,.0f} rows/s)  runs {_list(times['bare'])}"
    )
    name = "credex award bulk" + ("" if jobs is None else f" --jobs {jobs}")
    print(
        f"  {name:28}: median {credex:7.2f} s  ({rows / credex:9,.0f} rows/s)  runs {_list(times['credex'])}"
    )
    ok_ratio, ok_memory = ratio <= GOAL_RATIO, together < GOAL_MIB
    ok_speed = rows / credex >= GOAL_ROWS_PER_S
    verdict = "OK" if ok_speed else "BELOW GOAL"
    print(f"  credex rows/s: {rows / credex:,.0f} (goal >= {GOAL_ROWS_PER_S:,})  {verdict}")
    print(f"  ratio credex/bare: {ratio:.2f} (goal <= {GOAL_RATIO})  {'OK' if ok_ratio else 'ABOVE GOAL'}")
    print(f"  credex peak RSS of its largest process: {peak:.0f} MiB")
    print(
        f"  credex peak memory, its processes together (PSS): {together:.0f} MiB (goal < {GOAL_MIB})  "
        f"{'OK' if ok_memory else 'ABOVE GOAL'}"
    )
    print("  load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return ok_speed and ok_ratio and ok_memory


def _list(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        url, path, batch_size = sys.argv[2], sys.argv[3], int(sys.argv[4])
        (bare_sqlite if url.startswith("sqlite") else bare_postgres)(url, path, batch_size)
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--jobs", type=int, help="credex's --jobs (default: credex's own)")
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path = workdir / "campaign.csv"
        make_file(path, args.rows, args.users)
        print(f"file: {path.stat().st_size / 2**20:.0f} MiB, {args.rows:,} rows, {args.users:,} shoppers")
        print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        for backend in ["sqlite", "postgres"] if args.backend == "both" else [args.backend]:
            ok &= run(backend, path, args.rows, args.runs, args.batch_size, workdir, args.jobs)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
