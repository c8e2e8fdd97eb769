"""`credex audit verify` over a large shop: its time, and its peak memory against the data's size.

    python bench/audit.py --backend sqlite --entries 1000000 --redemptions 100000
    python bench/audit.py --backend postgres --entries 1000000 --redemptions 100000
    python bench/audit.py --entries 20000 --redemptions 2000     # a quick look while developing

The shop is generated straight into a fresh migrated database (executemany on SQLite, COPY on
Postgres), consistent in every rule the audit checks: --users shoppers, each with grants (a lot
each) and redemptions spent from their first lot, every redemption shipped (its confirmed
outbox message, its shipment request with the same express number). Then the real command line
runs as a child process, from interpreter start to exit, and its wall time and peak RSS
(ru_maxrss) are printed, with the same run at a tenth of the size beside it: memory that does not
grow with the data is the goal (the checks stream; the aggregates run in the database).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from databases import drop_database, fresh_database  # noqa: E402

GRANT, PRICE = 100, 10
CHUNK = 20_000


def shop_rows(entries: int, redemptions: int, users: int):
    """(table, columns, rows) in insertion order; rows are generated lazily, chunk by chunk."""
    if redemptions * PRICE > (entries - redemptions) * GRANT:
        raise SystemExit("too few grants for that many redemptions")
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC).replace(tzinfo=None)
    grants = entries - redemptions
    grants_of = [grants // users + (1 if u < grants % users else 0) for u in range(users)]
    redemptions_of = [redemptions // users + (1 if u < redemptions % users else 0) for u in range(users)]
    for u in range(users):
        if redemptions_of[u] * PRICE > GRANT or (redemptions_of[u] and not grants_of[u]):
            raise SystemExit("spread the redemptions over more shoppers (--users)")

    def user(u: int) -> str:
        return f"u{u:07d}"

    yield (
        "catalog_item",
        ("sku", "name", "points", "stock", "active", "created_at", "updated_at"),
        iter([("MUG", "Mug", PRICE, None, True, now, now)]),
    )
    yield (
        "account",
        ("user_id", "balance", "earned", "redeemed", "pending", "debt", "created_at", "updated_at"),
        (
            (
                user(u),
                grants_of[u] * GRANT - redemptions_of[u] * PRICE,
                grants_of[u] * GRANT,
                redemptions_of[u] * PRICE,
                0,
                0,
                now,
                now,
            )
            for u in range(users)
        ),
    )

    # Entry ids: each shopper's grants, then their redemptions; lot ids follow the grants.
    first_entry, first_lot, first_redemption = [], [], []
    entry = lot = redemption = 1
    for u in range(users):
        first_entry.append(entry)
        first_lot.append(lot)
        first_redemption.append(redemption)
        entry += grants_of[u] + redemptions_of[u]
        lot += grants_of[u]
        redemption += redemptions_of[u]

    def ledger():
        for u in range(users):
            balance, e = 0, first_entry[u]
            for g in range(grants_of[u]):
                balance += GRANT
                yield (e, user(u), "grant", f"g-{u}-{g}", GRANT, 0, 0, balance, None, "bench", None, now)
                e += 1
            for k in range(redemptions_of[u]):
                balance -= PRICE
                ref = str(first_redemption[u] + k)
                yield (e, user(u), "redemption", ref, -PRICE, 0, 0, balance, None, "bench", None, now)
                e += 1

    yield (
        "ledger_entry",
        (
            "id",
            "user_id",
            "kind",
            "ref",
            "points",
            "pending",
            "debt",
            "balance",
            "source_id",
            "operator",
            "reason",
            "created_at",
        ),
        ledger(),
    )

    def lots():
        for u in range(users):
            for g in range(grants_of[u]):
                spent = redemptions_of[u] * PRICE if g == 0 else 0
                state = "available" if spent < GRANT else "used"
                yield (
                    first_lot[u] + g,
                    user(u),
                    first_entry[u] + g,
                    GRANT,
                    GRANT - spent,
                    state,
                    now,
                    None,
                    now,
                )

    yield (
        "point_lot",
        (
            "id",
            "user_id",
            "entry_id",
            "points",
            "remaining",
            "state",
            "available_at",
            "expires_at",
            "created_at",
        ),
        lots(),
    )

    def uses():
        for u in range(users):
            for k in range(redemptions_of[u]):
                yield (first_lot[u], first_entry[u] + grants_of[u] + k, PRICE)

    yield ("lot_use", ("lot_id", "entry_id", "points"), uses())

    def redeemed(u: int):
        balance = grants_of[u] * GRANT
        for k in range(redemptions_of[u]):
            balance -= PRICE
            rid = first_redemption[u] + k
            yield rid, balance, str(uuid.UUID(int=rid))

    yield (
        "redemption",
        (
            "id",
            "request_id",
            "user_id",
            "sku",
            "quantity",
            "points",
            "balance",
            "address",
            "status",
            "message_id",
            "carrier",
            "express_no",
            "operator",
            "created_at",
            "updated_at",
        ),
        (
            (
                rid,
                None,
                user(u),
                "MUG",
                1,
                PRICE,
                balance,
                "1 High St",
                "shipping",
                mid,
                "sandbox",
                f"SB{rid:010d}",
                "bench",
                now,
                now,
            )
            for u in range(users)
            for rid, balance, mid in redeemed(u)
        ),
    )
    yield (
        "outbox_message",
        (
            "id",
            "redemption_id",
            "routing_key",
            "body",
            "state",
            "attempts",
            "next_attempt_at",
            "sent_at",
            "confirmed_at",
            "created_at",
        ),
        (
            (
                mid,
                rid,
                "redemption.created",
                json.dumps({"message_id": mid, "redemption_id": rid}),
                "confirmed",
                1,
                now,
                now,
                now,
                now,
            )
            for u in range(users)
            for rid, _, mid in redeemed(u)
        ),
    )
    yield (
        "shipment_request",
        (
            "id",
            "type",
            "redemption_id",
            "message_id",
            "sku",
            "quantity",
            "address",
            "carrier",
            "express_no",
            "created_at",
            "updated_at",
        ),
        (
            (rid, 2, rid, mid, "MUG", 1, "1 High St", "sandbox", f"SB{rid:010d}", now, now)
            for u in range(users)
            for rid, _, mid in redeemed(u)
        ),
    )


def fill(url: str, entries: int, redemptions: int, users: int) -> float:
    started = time.perf_counter()
    if url.startswith("sqlite"):
        import sqlite3

        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        db.execute("PRAGMA synchronous = OFF")
        for table, columns, rows in shop_rows(entries, redemptions, users):
            marks = ", ".join("?" for _ in columns)
            statement = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
            while chunk := [row for _, row in zip(range(CHUNK), rows, strict=False)]:
                db.executemany(statement, chunk)
            db.commit()
        db.execute("ANALYZE")
        db.commit()
        db.close()
    else:
        import psycopg

        with psycopg.connect(url) as db:
            for table, columns, rows in shop_rows(entries, redemptions, users):
                with db.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            db.commit()
            db.autocommit = True
            db.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def verify(url: str) -> tuple[float, float, dict]:
    """One `credex audit verify --json` from start to exit: seconds, its own peak RSS in MiB, the report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDEX_")}
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "credex", "--database-url", url, "audit", "verify", "--json"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if child.returncode not in (0, 1):
            raise SystemExit(f"audit verify failed ({child.returncode}): {err.read()}")
        return seconds, usage.ru_maxrss / 1024, json.loads(out.read())  # Linux: ru_maxrss in KiB


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--entries", type=int, default=1_000_000, help="ledger entries (grants + redemptions)"
    )
    parser.add_argument("--redemptions", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--no-small", action="store_true", help="skip the run at a tenth of the size")
    args = parser.parse_args()

    sizes = [(args.entries, args.redemptions, args.users)]
    if not args.no_small:
        sizes.insert(0, (args.entries // 10, args.redemptions // 10, max(1, args.users // 10)))
    with tempfile.TemporaryDirectory() as workdir:
        for entries, redemptions, users in sizes:
            url = fresh_database(args.backend, Path(workdir))
            try:
                filled = fill(url, entries, redemptions, users)
                seconds, peak, report = verify(url)
            finally:
                drop_database(url)
            checked = report["checked"]
            assert checked["ledger_entries"] == entries and checked["redemptions"] == redemptions, checked
            print(
                f"{args.backend}: {entries:>9,} entries {redemptions:>8,} redemptions {users:>7,} shoppers | "
                f"filled in {filled:6.1f} s | verify {seconds:6.1f} s, peak RSS {peak:6.1f} MiB, "
                f"{len(report['violations'])} violations"
            )


if __name__ == "__main__":
    main()
