"""Redemptions per second: credex's own service function against the bare driver running the
same statements, in one run, on fresh databases.

    python bench/redeem.py --backend postgres --workers 8
    python bench/redeem.py --backend sqlite --workers 1

Each worker is an OS process redeeming for its own shopper (with a limited-stock gift of its
own), so the numbers show the per-redemption cost rather than one hot row. The two sides
alternate for --runs rounds and the medians are compared. Goals: Postgres with 8 workers at
least 0.7 of the bare driver, SQLite with one worker at least 0.5.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from databases import drop_database, fresh_database  # noqa: E402

BALANCE = 10**12


# --- the two sides ------------------------------------------------------------------------------


def credex_worker(url: str, user: str, sku: str, count: int, start, done) -> None:
    from credex.db.engine import session_for
    from credex.points.redemptions import redeem

    # One session for the worker, as a script redeeming in a loop holds one (the bare side holds
    # its connection): every redeem() is its own transaction, committed before it returns.
    with session_for(url, write=True) as session:
        session.connection()  # connect and check the schema before the clock starts
        session.commit()
        start.wait()
        cpu = time.process_time()
        for _ in range(count):
            redeem(session, user, sku, address="1 Bench Road", operator="bench")
    done.put((count, time.process_time() - cpu))


BARE_SQL = {
    "item": "SELECT points, stock, active FROM catalog_item WHERE sku = {p}",
    "take_points": (
        "UPDATE account SET balance = balance - {p}, updated_at = {p}, redeemed = redeemed + {p} "
        "WHERE user_id = {p} AND balance >= {p} RETURNING balance"
    ),
    "take_stock": (
        "UPDATE catalog_item SET stock = stock - {p}, updated_at = {p} WHERE sku = {p} AND stock >= {p} "
        "RETURNING stock"
    ),
    # a redemption leaves a line in the stock's history and the first event of its own history
    "movement": (
        "INSERT INTO stock_movement (sku, kind, delta, stock_after, ref, operator, at) "
        "VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})"
    ),
    "event": (
        "INSERT INTO redemption_event (redemption_id, at, status, source, detail) "
        "VALUES ({p}, {p}, {p}, {p}, {p})"
    ),
    "redemption": (
        "INSERT INTO redemption (request_id, user_id, sku, quantity, points, balance, address, status, "
        "message_id, operator, created_at, updated_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, "
        "{p}, {p}, {p}) RETURNING id"
    ),
    "ledger": (
        "INSERT INTO ledger_entry (user_id, kind, ref, points, balance, detail, operator, reason, "
        "created_at, pending, debt) "
        "VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}) RETURNING id"
    ),
    # the points come out of the oldest lot (one lot covers them here, as in most redemptions)
    "take_lot": (
        "UPDATE point_lot SET remaining = remaining - {p}, "
        "state = CASE WHEN remaining = {p} THEN {p} ELSE state END "
        "WHERE id = (SELECT id FROM point_lot WHERE user_id = {p} AND state = {p} "
        "ORDER BY available_at, id LIMIT 1) AND remaining >= {p} RETURNING id"
    ),
    "lot_use": "INSERT INTO lot_use (lot_id, entry_id, points) VALUES ({p}, {p}, {p})",
    "outbox": (
        "INSERT INTO outbox_message (id, redemption_id, routing_key, body, state, attempts, next_attempt_at, "
        "created_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})"
    ),
}


def _bare_redeem(cursor, sql, user: str, sku: str, bind_time) -> None:
    cursor.execute(sql["item"], (sku,))
    points, stock, _active = cursor.fetchone()
    moment = datetime.now(UTC)
    now = bind_time(moment)
    cursor.execute(sql["take_points"], (points, now, points, user, points))
    (balance,) = cursor.fetchone()
    stock_left = None
    if stock is not None:
        cursor.execute(sql["take_stock"], (1, now, sku, 1))
        (stock_left,) = cursor.fetchone()
    message_id = str(uuid.uuid4())
    cursor.execute(
        sql["redemption"],
        (None, user, sku, 1, points, balance, "1 Bench Road", "pending", message_id, "bench", now, now),
    )
    (redemption_id,) = cursor.fetchone()
    cursor.execute(
        sql["ledger"],
        (
            user,
            "redemption",
            str(redemption_id),
            -points,
            balance,
            f"{sku} x1",
            "bench",
            f"redemption {redemption_id}: 1 x {sku}",
            now,
            0,
            0,
        ),
    )
    (entry_id,) = cursor.fetchone()
    cursor.execute(sql["take_lot"], (points, points, "used", user, "available", points))
    (lot_id,) = cursor.fetchone()
    cursor.execute(sql["lot_use"], (lot_id, entry_id, points))
    if stock_left is not None:
        cursor.execute(sql["movement"], (sku, "redeem", -1, stock_left, str(redemption_id), "bench", now))
    cursor.execute(sql["event"], (redemption_id, now, "pending", "create", None))
    body = json.dumps(
        {
            "message_id": message_id,
            "redemption_id": redemption_id,
            "user_id": user,
            "sku": sku,
            "quantity": 1,
            "points": points,
            "address": "1 Bench Road",
            "created_at": moment.isoformat(),
        }
    )
    cursor.execute(
        sql["outbox"], (message_id, redemption_id, "redemption.created", body, "pending", 0, now, now)
    )


def bare_worker(url: str, user: str, sku: str, count: int, start, done) -> None:
    if url.startswith("sqlite"):
        import sqlite3

        connection = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
        connection.execute("PRAGMA busy_timeout = 30000")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA foreign_keys = ON")
        sql = {k: v.format(p="?") for k, v in BARE_SQL.items()}

        def stamp(moment):  # stored as SQLAlchemy stores it on SQLite: naive UTC text
            return moment.replace(tzinfo=None).isoformat(sep=" ")

        start.wait()
        cpu = time.process_time()
        cursor = connection.cursor()
        for _ in range(count):
            cursor.execute("BEGIN IMMEDIATE")
            _bare_redeem(cursor, sql, user, sku, stamp)
            cursor.execute("COMMIT")
    else:
        import psycopg

        connection = psycopg.connect(url.replace("postgresql+psycopg", "postgresql"))
        sql = {k: v.format(p="%s") for k, v in BARE_SQL.items()}

        def stamp(moment):
            return moment

        start.wait()
        cpu = time.process_time()
        cursor = connection.cursor()
        for _ in range(count):
            _bare_redeem(cursor, sql, user, sku, stamp)
            connection.commit()
    done.put((count, time.process_time() - cpu))


# --- set-up and measurement ---------------------------------------------------------------------


def seed(url: str, workers: int, count: int) -> None:
    from credex.db.engine import dispose_engines, session_for
    from credex.points.awards import award_grant
    from credex.points.catalog import add_item

    with session_for(url, write=True) as session:
        for n in range(workers):
            add_item(session, f"GIFT-{n}", name=f"Gift {n}", points=100, stock=count + 10)
            award_grant(session, f"bench-{n}", BALANCE, reason="bench", ref=f"bench-{n}", operator="bench")
    dispose_engines()


def measure(side, url: str, workers: int, count: int) -> tuple[float, float]:
    """Redemptions per second for ``workers`` processes each doing ``count``, and the CPU time
    the workers spent per redemption (µs): the client's own cost, which the machine's other load
    disturbs far less than the rate."""
    context = mp.get_context("spawn")
    start = context.Barrier(workers + 1)  # passed once every process has imported and connected
    done = context.Queue()
    processes = [
        context.Process(target=side, args=(url, f"bench-{n}", f"GIFT-{n}", count, start, done))
        for n in range(workers)
    ]
    for process in processes:
        process.start()
    start.wait(timeout=300)
    began = time.perf_counter()
    reports = [done.get(timeout=600) for _ in processes]
    elapsed = time.perf_counter() - began
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"a {side.__name__} process failed")
    total = sum(n for n, _ in reports)
    return total / elapsed, sum(cpu for _, cpu in reports) / total * 1e6


def run(backend: str, workers: int, count: int, runs: int, goal: float) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        rates = {"bare": [], "credex": []}
        cpus = {"bare": [], "credex": []}
        for _ in range(runs):
            for name, side in (("bare", bare_worker), ("credex", credex_worker)):
                url = fresh_database(backend, Path(tmp))
                try:
                    seed(url, workers, count)
                    rate, cpu = measure(side, url, workers, count)
                    rates[name].append(rate)
                    cpus[name].append(cpu)
                finally:
                    drop_database(url)
    bare = statistics.median(rates["bare"])
    credex = statistics.median(rates["credex"])
    ratio = credex / bare
    bare_cpu, credex_cpu = statistics.median(cpus["bare"]), statistics.median(cpus["credex"])
    print(f"{backend}, {workers} worker(s), {count} redemptions each, {runs} runs")
    print(f"  bare driver : median {bare:8.0f}/s  runs {', '.join(f'{r:.0f}' for r in rates['bare'])}")
    print(f"  credex      : median {credex:8.0f}/s  runs {', '.join(f'{r:.0f}' for r in rates['credex'])}")
    print(
        f"  client CPU per redemption: bare {bare_cpu:.0f} µs, credex {credex_cpu:.0f} µs "
        f"(ratio bare/credex {bare_cpu / credex_cpu:.2f})"
    )
    print(f"  ratio credex/bare: {ratio:.2f} (goal >= {goal})  {'OK' if ratio >= goal else 'BELOW GOAL'}")
    return ratio >= goal


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--workers", type=int, help="processes (default: 8 on Postgres, 1 on SQLite)")
    parser.add_argument("--count", type=int, default=500, help="redemptions per process")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    ok = True
    for backend in backends:
        workers = args.workers or (8 if backend == "postgres" else 1)
        goal = 0.7 if backend == "postgres" else 0.5
        ok &= run(backend, workers, args.count, args.runs, goal)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
