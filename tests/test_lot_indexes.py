"""Every index on the points tables has a statement that needs it, and every statement on them
reads through an index (migration 0009): the lots are indexed only while pending, available or
able to expire, so `award settle`, `award expire`, spending oldest first, refunds and bulk grants
must say each partial index's predicate in so many words.

The statements are the ones credex really runs: a life of points (plain, pending and expiring
awards, a bulk file with a negative row and debt, redemptions, a cancel that refunds, a purchase
refund, settle, expire, history) is played through the command line while each statement's plan
is recorded: SQLite's trace callback, then EXPLAIN QUERY PLAN on it; Postgres's auto_explain,
with sequential scans disabled so that a tiny table still shows whether an index could serve.
"""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time
from sqlalchemy import event
from sqlalchemy.engine import Engine

from credex.db.engine import dispose_engines

START = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
TABLES = ("point_lot", "lot_use", "ledger_entry")
# Each index on the three tables and the statement that needs it.
INDEXES = {
    "ix_point_lot_available": "spending oldest first, bulk grants reading the lots they spend",
    "ix_point_lot_pending": "award settle",
    "ix_point_lot_expirable": "award expire: the accounts with lapsed points",
    "ix_lot_use_entry_id": "a cancelled redemption's points put back into its lots",
    "ix_ledger_entry_user_id_id": "account history",
    "ix_ledger_entry_source_id": "a purchase's earlier refunds",
}


class Plans:
    """The statements run on the three tables while recording, each with its plan."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.sqlite_statements: list[str] = []
        self.postgres_plans: list[str] = []

    def on_connect(self, dbapi_connection, _record) -> None:
        if self.backend == "sqlite":
            dbapi_connection.set_trace_callback(self.sqlite_statements.append)
            return
        for setting in (
            "LOAD 'auto_explain'",
            "SET auto_explain.log_min_duration = 0",
            "SET auto_explain.log_nested_statements = on",
            "SET enable_seqscan = off",
            "SET jit = off",
            "SET client_min_messages = log",
        ):
            dbapi_connection.execute(setting)
        dbapi_connection.commit()
        dbapi_connection.add_notice_handler(lambda notice: self.postgres_plans.append(notice.message_primary))

    def plans(self, db_url: str) -> list[tuple[str, str]]:
        """(statement, plan) for each statement that reads one of the three tables."""
        if self.backend == "postgres":
            found = []
            for message in self.postgres_plans:
                text_, _, plan = message.partition("\n")
                if any(t in message for t in TABLES) and "Query Text:" in message:
                    found.append((text_, plan))
            return found
        path = db_url.removeprefix("sqlite:///")
        found = []
        with sqlite3.connect(path) as db:
            for statement in dict.fromkeys(self.sqlite_statements):
                words = statement.lstrip().split(None, 1)
                if not words or words[0].upper() not in ("SELECT", "UPDATE", "DELETE", "WITH"):
                    continue
                if not any(re.search(rf"\b{t}\b", statement) for t in TABLES):
                    continue
                rows = db.execute(f"EXPLAIN QUERY PLAN {statement}").fetchall()
                found.append((statement, "\n".join(row[-1] for row in rows)))
        return found


def full_scans(backend: str, plan: str) -> list[str]:
    if backend == "postgres":
        return [m for m in re.findall(r"Seq Scan on (\w+)", plan) if m in TABLES]
    return [m for m in re.findall(r"SCAN (\w+)(?! USING)", plan) if m in TABLES]


@pytest.fixture
def recorded(db_url, backend):
    dispose_engines()  # connections made from here on are recorded
    plans = Plans(backend)
    event.listen(Engine, "connect", plans.on_connect)
    try:
        yield plans
    finally:
        event.remove(Engine, "connect", plans.on_connect)
        dispose_engines()


def test_each_points_index_serves_a_statement_and_no_statement_scans_a_points_table(
    credex, db_url, backend, recorded, monkeypatch, tmp_path: Path
):
    def ok(*args, env: dict | None = None):
        result = credex(*args, env=env)
        assert result.exit_code == 0, result.stderr
        return result

    ok("catalog", "add", "MUG", "--name", "Mug", "--points", "30", "--stock", "10")  # before the frozen clock
    with freeze_time(START, ignore=["_pytest"]) as clock:
        ok("award", "grant", "u1", "100", "--reason", "welcome", "--ref", "w-1")
        ok("award", "grant", "u2", "40", "--reason", "welcome", "--ref", "w-2")
        ok("award", "purchase", "u1", "--order", "o-1", "--amount", "50", env={"CREDEX_PENDING_DAYS": "14"})
        ok("award", "grant", "u2", "20", "--reason", "gift", "--ref", "x-2", env={"CREDEX_EXPIRY_DAYS": "30"})
        bulk = tmp_path / "campaign.csv"
        bulk.write_text(
            "user_id,points,ref,reason\nu1,30,c-1,spring\nu2,-50,c-2,correction\nu3,5,c-3,spring\n"
        )
        applied = ok("award", "bulk", str(bulk), "--json").json()
        assert applied["applied"] == 3, applied
        ok("redeem", "create", "u1", "MUG", "--address", "1 High St", "--quantity", "2", "--json")
        spent = ok("redeem", "create", "u1", "MUG", "--address", "1 High St", "--json").json()
        ok("redeem", "cancel", spent["redemption_id"], "--reason", "ordered by mistake")
        ok("award", "refund", "u1", "--order", "o-1", "--refund", "rf-1")
        clock.move_to(START + timedelta(days=15))
        settled = ok("award", "settle", "--json").json()
        clock.move_to(START + timedelta(days=60))
        ok("award", "grant", "u3", "10", "--reason", "late", "--ref", "l-3", env={"CREDEX_EXPIRY_DAYS": "30"})
        assert ok("account", "show", "u3", "--json").json()["balance"] == 15
        expired = ok("award", "expire", "--json").json()
        ok("account", "history", "u2", "--json")

    plans = recorded.plans(db_url)
    assert (settled["lots"], expired["lots"], expired["points"]) == (0, 1, 10), (settled, expired)
    assert plans, "no statement was recorded"
    scans = [(statement, plan) for statement, plan in plans if full_scans(backend, plan)]
    assert not scans, "\n\n".join(f"{s}\n{p}" for s, p in scans)
    used = {name for name in INDEXES if any(name in plan for _statement, plan in plans)}
    assert used == set(INDEXES), f"no statement used {set(INDEXES) - used}"
