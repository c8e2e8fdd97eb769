"""`award grant` row by row and `award bulk` with the same rows write the same ledger, lots, lot
uses and balances: two groups of shoppers in one database, each with a debt and older lots, one
group granted one by one, the other in batches."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from credex.db.engine import get_engine, session_for
from credex.errors import CredexError
from credex.points.awards import award_grant, award_purchase
from credex.points.bulk import grant_bulk
from credex.points.bulk_files import Grant
from credex.points.catalog import add_item
from credex.points.lifecycle import refund_order
from credex.points.redemptions import redeem
from tests.test_bulk_service import mixed_file
from tests.test_lifecycle_invariants import check_lifecycle_invariants

GROUPS = ("one", "bulk")


def moment(value: datetime | str) -> datetime:
    return datetime.fromisoformat(value) if isinstance(value, str) else value  # SQLite: text


def start(url: str) -> None:
    """In each group u1 owes 90 points (a refunded order whose points were spent) and u2 has
    older lots to spend first."""
    with session_for(url, write=True) as session:
        add_item(session, "MUG", name="Mug", points=90, stock=None)
        for group in GROUPS:
            award_purchase(session, f"{group}-u1", order_id=f"{group}-o1", amount="100", rate=1, operator="t")
            redeem(session, f"{group}-u1", "MUG", address="1 High St", operator="t")
            refund_order(
                session, f"{group}-u1", order_id=f"{group}-o1", refund_id=f"{group}-rf1", rate=1, operator="t"
            )
            for n in (1, 2):
                award_grant(session, f"{group}-u2", 40, reason="start", ref=f"{group}-s{n}", operator="t")


def group_state(url: str, group: str) -> dict:
    """The group's accounts, ledger, lots and uses, its prefix taken off; entries other than
    grants by kind (their refs are ids)."""
    where = {"prefix": f"{group}-%"}
    strip = len(group) + 1

    def ref(kind, value):
        return value[strip:] if value.startswith(f"{group}-") else kind

    with get_engine(url).connect() as connection:
        rows = {
            "accounts": connection.execute(
                text(
                    "SELECT user_id, balance, pending, debt, earned, redeemed FROM account "
                    "WHERE user_id LIKE :prefix ORDER BY user_id"
                ),
                where,
            ).all(),
            "ledger": connection.execute(
                text(
                    "SELECT user_id, kind, ref, points, pending, debt, balance, detail, reason "
                    "FROM ledger_entry WHERE user_id LIKE :prefix ORDER BY id"
                ),
                where,
            ).all(),
            "lots": connection.execute(
                text(
                    "SELECT p.user_id, e.kind, e.ref, p.points, p.remaining, p.state, p.available_at, "
                    "p.expires_at FROM point_lot p JOIN ledger_entry e ON e.id = p.entry_id "
                    "WHERE p.user_id LIKE :prefix ORDER BY p.id"
                ),
                where,
            ).all(),
            "uses": connection.execute(
                text(
                    "SELECT made.kind, made.ref, took.kind, took.ref, u.points FROM lot_use u "
                    "JOIN point_lot p ON p.id = u.lot_id JOIN ledger_entry made ON made.id = p.entry_id "
                    "JOIN ledger_entry took ON took.id = u.entry_id WHERE p.user_id LIKE :prefix "
                    "ORDER BY took.id, p.id"
                ),
                where,
            ).all(),
        }
    return {
        "accounts": [(user[strip:], *counters) for user, *counters in rows["accounts"]],
        "ledger": [  # the reasons of the entries before the grants name their group
            (user[strip:], kind, ref(kind, value), *rest, reason if kind == "grant" else None)
            for user, kind, value, *rest, reason in rows["ledger"]
        ],
        "lots": [
            (
                user[strip:],
                ref(kind, value),
                points,
                remaining,
                state,
                None
                if expires_at is None
                else (moment(expires_at) - moment(available_at)) // timedelta(days=1),
            )
            for user, kind, value, points, remaining, state, available_at, expires_at in rows["lots"]
        ],
        "uses": [(ref(mk, mr), ref(tk, tr), points) for mk, mr, tk, tr, points in rows["uses"]],
    }


@pytest.mark.parametrize("expiry_days", [0, 30])
def test_award_grant_and_award_bulk_with_the_same_rows_write_the_same(db_url, expiry_days):
    start(db_url)
    rows = mixed_file(160, seed=expiry_days)
    outcomes = {"applied": 0, "duplicates": 0, "rejected": 0}
    with session_for(db_url, write=True) as session:
        for user, points, ref in rows:
            try:
                entry = award_grant(
                    session, f"one-{user}", points, reason="campaign", ref=f"one-{ref}", operator="t",
                    expiry_days=expiry_days,
                )  # fmt: skip
            except CredexError:
                outcomes["rejected"] += 1
            else:
                outcomes["duplicates" if entry["duplicate"] else "applied"] += 1
    grants = [
        Grant(n + 2, f"bulk-{user}", points, f"bulk-{ref}", "campaign", [])
        for n, (user, points, ref) in enumerate(rows)
    ]
    with session_for(db_url, write=True) as session:
        report = grant_bulk(session, grants, operator="t", expiry_days=expiry_days, batch_size=7)
    assert (report.applied, report.duplicates, report.rejected) == tuple(outcomes.values())
    assert report.applied > 100 and report.rejected > 0  # corrections refused as well as applied

    one, bulk = (group_state(db_url, group) for group in GROUPS)
    assert bulk == one
    assert any(debt < 0 for *_, debt, _balance, _detail, _reason in one["ledger"][5:])  # debt paid
    assert any(points < 0 for _user, _kind, _ref, points, *_ in one["ledger"][5:])  # corrections
    check_lifecycle_invariants(db_url)
