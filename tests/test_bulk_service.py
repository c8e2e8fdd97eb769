"""The bulk service against its definition: a file applied in batches ends exactly as its rows
granted one by one in file order with `award_grant`, and a batch that fails writes nothing."""

from __future__ import annotations

import io
import random

import pytest
from sqlalchemy import text

from credex.db.engine import dispose_engines, get_engine, session_for
from credex.errors import CredexError
from credex.points.awards import award_grant
from credex.points.bulk import grant_bulk
from credex.points.bulk_files import Grant, open_grants
from credex.points.bulk_writers import BatchWriter
from credex.points.lifecycle import refund_order
from tests.test_lifecycle_invariants import check_lifecycle_invariants


def mixed_file(rows: int, seed: int) -> list[tuple[str, int, str]]:
    """Grants, corrections that may or may not fit, repeats and reused refs, over few shoppers."""
    rng = random.Random(seed)
    out: list[tuple[str, int, str]] = []
    for n in range(rows):
        roll = rng.random()
        if out and roll < 0.08:
            out.append(rng.choice(out))
        elif out and roll < 0.12:
            user, points, ref = rng.choice(out)
            out.append((rng.choice(["u1", "u2", user]), points + 1, ref))
        else:
            points = rng.randint(-120, 200) or 1
            out.append((rng.choice(["u1", "u1", "u2", "u3", "u4"]), points, f"r-{n}"))
    return out


def with_debt(url: str) -> None:
    """u1 owes 90 points: a refunded order whose points were spent."""
    from credex.points.awards import award_purchase
    from credex.points.catalog import add_item
    from credex.points.redemptions import redeem

    with session_for(url, write=True) as session:
        add_item(session, "MUG", name="Mug", points=90, stock=None)
        award_purchase(session, "u1", order_id="o-1", amount="100", rate=1, operator="t")
        redeem(session, "u1", "MUG", address="1 High St", operator="t")
        refund_order(session, "u1", order_id="o-1", refund_id="rf-1", rate=1, operator="t")
        award_grant(session, "u2", 40, reason="start", ref="start-u2", operator="t", expiry_days=0)


def state(url: str) -> dict:
    queries = {
        "accounts": "SELECT user_id, balance, debt, earned, pending FROM account ORDER BY user_id",
        "ledger": (
            "SELECT user_id, kind, ref, points, debt, balance, detail FROM ledger_entry ORDER BY user_id, id"
        ),
        "lots": "SELECT user_id, points, remaining, state FROM point_lot ORDER BY user_id, id",
        "uses": (
            "SELECT made.ref, took.ref, u.points FROM lot_use u JOIN point_lot p ON p.id = u.lot_id "
            "JOIN ledger_entry made ON made.id = p.entry_id JOIN ledger_entry took ON took.id = u.entry_id "
            "ORDER BY made.ref, took.ref"
        ),
    }
    with get_engine(url).connect() as connection:
        return {name: [tuple(row) for row in connection.execute(text(sql))] for name, sql in queries.items()}


def as_csv(rows: list[tuple[str, int, str]]) -> bytes:
    return ("user_id,points,ref\n" + "".join(f"{u},{p},{r}\n" for u, p, r in rows)).encode()


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_a_file_in_batches_ends_as_its_rows_granted_one_by_one(db_url, tmp_path, batch_size):
    rows = mixed_file(250, seed=batch_size)
    reference = f"sqlite:///{tmp_path / 'one-by-one.db'}"
    for url in (db_url, reference):
        with_debt(url)
    expected = {"applied": 0, "duplicates": 0, "rejected": 0, "points_awarded": 0}
    with session_for(reference, write=True) as session:
        for user, points, ref in rows:
            try:
                entry = award_grant(session, user, points, reason="bulk grant", ref=ref, operator="t")
            except CredexError:
                expected["rejected"] += 1
                continue
            if entry["duplicate"]:
                expected["duplicates"] += 1
            else:
                expected["applied"] += 1
                expected["points_awarded"] += points

    reader = open_grants(io.BytesIO(as_csv(rows)), name="rows.csv", format="csv")
    with session_for(db_url, write=True) as session:
        report = grant_bulk(session, reader, operator="t", batch_size=batch_size)
    assert {k: getattr(report, k) for k in expected} == expected
    assert state(db_url) == state(reference)
    check_lifecycle_invariants(db_url)
    dispose_engines()


def test_a_batch_that_fails_half_written_leaves_nothing_of_itself(db_url, monkeypatch):
    rows = [Grant(n + 2, f"u{n % 3}", 10, f"a-{n}", None, []) for n in range(10)]
    backend = BatchWriter
    real_write = backend.write
    calls = []

    def write_then_fail(self, plan, **kwargs):
        real_write(self, plan, **kwargs)
        calls.append(len(plan.entries))
        if len(calls) == 2:  # the second batch: every row written, then the process "dies"
            raise RuntimeError("power cut")

    monkeypatch.setattr(backend, "write", write_then_fail)
    with session_for(db_url, write=True) as session, pytest.raises(RuntimeError, match="power cut"):
        grant_bulk(session, rows, operator="t", batch_size=4)
    with get_engine(db_url).connect() as connection:
        refs = connection.execute(text("SELECT ref FROM ledger_entry ORDER BY id")).scalars().all()
        lots = connection.execute(text("SELECT count(*) FROM point_lot")).scalar()
    assert refs == ["a-0", "a-1", "a-2", "a-3"] and lots == 4
    check_lifecycle_invariants(db_url)

    monkeypatch.setattr(backend, "write", real_write)
    with session_for(db_url, write=True) as session:
        report = grant_bulk(session, rows, operator="t", batch_size=4)
    assert (report.applied, report.duplicates) == (6, 4)
    check_lifecycle_invariants(db_url)
