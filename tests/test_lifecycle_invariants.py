"""The rules of the points lifecycle, checked straight on the database, and a check that the
checker itself notices a broken rule."""

from __future__ import annotations

from collections import defaultdict

import pytest
from sqlalchemy import text

from credex.db.engine import get_engine

CREATED_BY_AWARDS = ("purchase", "review", "grant")


def check_lifecycle_invariants(db_url: str, *, legacy_upto: int = 0) -> dict:
    """Assert every lifecycle rule; return a few totals for the test. Entries up to id
    ``legacy_upto`` predate the lifecycle: their points were carried over as one lot per account."""
    with get_engine(db_url).connect() as connection:
        accounts = connection.execute(text("SELECT user_id, balance, pending, debt FROM account")).all()
        entries = connection.execute(
            text("SELECT id, user_id, kind, ref, points, pending, debt, balance, source_id FROM ledger_entry")
        ).all()
        lots = connection.execute(
            text("SELECT id, user_id, entry_id, points, remaining, state FROM point_lot")
        ).all()
        uses = connection.execute(text("SELECT lot_id, entry_id, points FROM lot_use")).all()

    by_entry = {e.id: e for e in entries}
    ledger = defaultdict(lambda: [0, 0, 0])
    running: dict[str, int] = defaultdict(int)
    for entry in sorted(entries, key=lambda e: e.id):
        sums = ledger[entry.user_id]
        sums[0] += entry.points
        sums[1] += entry.pending
        sums[2] += entry.debt
        running[entry.user_id] += entry.points
        assert entry.balance == running[entry.user_id], f"entry {entry.id} records the wrong balance"
    in_lots = defaultdict(lambda: {"available": 0, "pending": 0})
    for lot in lots:
        if lot.state in ("available", "pending"):
            in_lots[lot.user_id][lot.state] += lot.remaining

    for account in accounts:
        where = f"account {account.user_id}"
        assert account.balance >= 0 and account.pending >= 0 and account.debt >= 0, where
        assert [account.balance, account.pending, account.debt] == ledger[account.user_id], (
            f"{where}: balance/pending/debt differ from the sums of the ledger"
        )
        assert account.balance == in_lots[account.user_id]["available"], f"{where}: balance != available lots"
        assert account.pending == in_lots[account.user_id]["pending"], f"{where}: pending != pending lots"
        assert account.debt == 0 or account.balance == 0, f"{where}: debt left unpaid"

    used_by_lot = defaultdict(list)
    used_by_entry = defaultdict(int)
    for use in uses:
        assert use.points > 0
        used_by_lot[use.lot_id].append(use)
        used_by_entry[use.entry_id] += use.points
    created_by_entry = defaultdict(int)
    for lot in lots:
        where = f"lot {lot.id} ({lot.state})"
        assert 0 <= lot.remaining <= lot.points, f"{where}: remaining out of range"
        assert lot.points - lot.remaining == sum(u.points for u in used_by_lot[lot.id]), (
            f"{where}: its uses do not add up to what was taken out of it"
        )
        if lot.state == "available":
            assert lot.remaining > 0, f"{where}: nothing left in an available lot"
        elif lot.state in ("used", "expired"):
            assert lot.remaining == 0, f"{where}: points left in a finished lot"
        expiries = [u for u in used_by_lot[lot.id] if by_entry[u.entry_id].kind == "expiry"]
        if lot.state == "expired":
            assert len(expiries) == 1, f"{where}: not expired exactly once"
            last = max(u.entry_id for u in used_by_lot[lot.id])
            assert expiries[0].entry_id == last, f"{where}: points spent after they expired"
        else:
            assert expiries == [], f"{where}: expiry entries on a lot that did not expire"
        if lot.entry_id is not None:
            created_by_entry[lot.entry_id] += lot.points
            assert by_entry[lot.entry_id].kind in CREATED_BY_AWARDS, where

    refunded = defaultdict(int)
    for entry in entries:
        lots_moved = created_by_entry[entry.id] - used_by_entry[entry.id]
        assert entry.id <= legacy_upto or lots_moved == entry.points + entry.pending, (
            f"entry {entry.id} ({entry.kind} {entry.ref}): its lots do not match its effect"
        )
        if entry.kind == "refund":
            clawback = -(entry.points + entry.pending - entry.debt)
            assert clawback >= 0 and entry.debt >= 0
            refunded[entry.source_id] += clawback
    for purchase_id, clawed in refunded.items():
        purchase = by_entry[purchase_id]
        earned = purchase.points + purchase.pending - purchase.debt
        assert clawed <= earned, f"order {purchase.ref}: refunds took back {clawed} of {earned}"
    return {
        "balance": sum(a.balance for a in accounts),
        "pending": sum(a.pending for a in accounts),
        "debt": sum(a.debt for a in accounts),
        "lots": len(lots),
        "expired_lots": sum(1 for lot in lots if lot.state == "expired"),
    }


def test_the_checker_notices_a_lot_spent_twice(credex, db_url):
    credex("award", "grant", "u1", "100", "--reason", "welcome", "--ref", "g-1")
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "30")
    credex("redeem", "create", "u1", "MUG", "--address", "1 High St")
    check_lifecycle_invariants(db_url)
    with get_engine(db_url).begin() as connection:  # a second consumption nobody recorded
        connection.execute(text("UPDATE point_lot SET remaining = remaining - 30"))
    with pytest.raises(AssertionError, match="balance != available lots"):
        check_lifecycle_invariants(db_url)
