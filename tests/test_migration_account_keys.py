"""0016: on Postgres the per-row foreign keys from ledger_entry and point_lot to account give way to
a trigger on account. What a user of the database could see the keys do still holds on both
backends: an account that has entries or lots cannot be deleted or renamed, one that has none can
be. (An entry or a lot written by hand for an unknown shopper is what the audit reports:
test_audit.py, test_ledger_entries_and_lots_whose_account_was_removed_are_found.)"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from credex.db.engine import get_engine, upgrade
from tests.support import lock_waiters, wait_for
from tests.test_migration_lifecycle import empty_url, migrate  # noqa: F401 - a fixture

ACCOUNT = (
    "INSERT INTO account (user_id, balance, earned, redeemed, pending, debt, created_at, updated_at) "
    "VALUES (:user, 0, 0, 0, 0, 0, '2026-11-27 10:00:00', '2026-11-27 10:00:00')"
)


def account_keys(url: str) -> set[str]:
    """The foreign keys that point at account, as 'table.column'."""
    with get_engine(url).connect() as connection:
        inspector = sa.inspect(connection)
        return {
            f"{table}.{key['constrained_columns'][0]}"
            for table in ("ledger_entry", "point_lot", "redemption")
            for key in inspector.get_foreign_keys(table)
            if key["referred_table"] == "account"
        }


def grant(credex, user: str, points: int, ref: str) -> None:
    outcome = credex("award", "grant", user, points, "--ref", ref, "--reason", "test", "--json")
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr


def refused(url: str, statement: str, **params) -> str:
    with pytest.raises(IntegrityError) as caught, get_engine(url).begin() as connection:
        connection.execute(sa.text(statement), params)
    return str(caught.value.orig)


def test_upgrading_drops_the_two_keys_on_postgres_and_downgrading_brings_them_back(empty_url):  # noqa: F811
    every = {"ledger_entry.user_id", "point_lot.user_id", "redemption.user_id"}
    migrate(empty_url, "0015_delivery_asked_at")
    assert account_keys(empty_url) == every
    upgrade(empty_url)
    postgres = empty_url.startswith("postgresql")
    assert account_keys(empty_url) == ({"redemption.user_id"} if postgres else every)
    migrate(empty_url, "0015_delivery_asked_at", down=True)
    assert account_keys(empty_url) == every
    migrate(empty_url, "head")
    assert account_keys(empty_url) == ({"redemption.user_id"} if postgres else every)


def test_an_account_with_entries_or_lots_is_neither_deleted_nor_renamed(credex, db_url):
    grant(credex, "u-1", 50, "g-1")
    for statement in (
        "DELETE FROM account WHERE user_id = 'u-1'",
        "UPDATE account SET user_id = 'u-9' WHERE user_id = 'u-1'",
    ):
        message = refused(db_url, statement)
        assert "u-1" in message or "FOREIGN KEY" in message, message
    with get_engine(db_url).connect() as connection:
        assert connection.execute(sa.text("SELECT user_id, balance FROM account")).all() == [("u-1", 50)]
    # What the keys allowed stays allowed: a balance changes, an account with nothing is removed.
    with get_engine(db_url).begin() as connection:
        connection.execute(sa.text(ACCOUNT), {"user": "u-2"})
        connection.execute(sa.text("UPDATE account SET updated_at = updated_at WHERE user_id = 'u-1'"))
        connection.execute(sa.text("UPDATE account SET user_id = 'u-3' WHERE user_id = 'u-2'"))
        assert connection.execute(sa.text("DELETE FROM account WHERE user_id = 'u-3'")).rowcount == 1


@pytest.mark.breaks_invariants  # a lot written by hand, with no entry taking its points
def test_a_lot_alone_keeps_its_account(db_url):
    """A lot with no ledger entry of its account (by hand) still keeps the account."""
    with get_engine(db_url).begin() as connection:
        connection.execute(sa.text(ACCOUNT), {"user": "u-1"})
        connection.execute(
            sa.text(
                "INSERT INTO point_lot (user_id, entry_id, points, remaining, state, available_at, "
                "created_at) VALUES ('u-1', NULL, 5, 0, 'used', '2026-11-27 10:00:00', '2026-11-27 10:00:00')"
            )
        )
    refused(db_url, "DELETE FROM account WHERE user_id = 'u-1'")
    refused(db_url, "UPDATE account SET user_id = 'u-2' WHERE user_id = 'u-1'")


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_delete_waits_for_a_batch_writing_the_account_then_is_refused(credex, db_url):
    """The trigger's query runs after the DELETE got the row: it sees what the writer committed."""
    grant(credex, "u-1", 50, "g-1")
    engine = get_engine(db_url)
    outcome: dict[str, BaseException | None] = {}
    with engine.connect() as writer:
        writer.begin()
        writer.execute(sa.text("SELECT 1 FROM account WHERE user_id = 'u-1' FOR UPDATE"))
        writer.execute(sa.text(ACCOUNT.replace("0, 0, 0, 0, 0", "5, 5, 0, 0, 0")), {"user": "u-2"})

        def delete() -> None:
            try:
                with engine.begin() as connection:
                    connection.execute(sa.text("DELETE FROM account WHERE user_id IN ('u-1', 'u-2')"))
                outcome["error"] = None
            except BaseException as error:  # noqa: BLE001 - reported to the test's thread
                outcome["error"] = error

        thread = threading.Thread(target=delete)
        thread.start()
        wait_for(lambda: lock_waiters(db_url) >= 1, timeout=10, what="the DELETE to wait for the writer")
        # What a batch writes for a new shopper, committed while the DELETE waits.
        entry = writer.execute(
            sa.text(
                "INSERT INTO ledger_entry (user_id, kind, ref, points, balance, detail, operator, reason, "
                "created_at, pending, debt) VALUES ('u-2', 'grant', 'g-2', 5, 5, 'points=5', 't', 'r', "
                "'2026-11-27 10:00:00', 0, 0) RETURNING id"
            )
        ).scalar()
        writer.execute(
            sa.text(
                "INSERT INTO point_lot (user_id, entry_id, points, remaining, state, available_at, "
                "created_at) VALUES ('u-2', :entry, 5, 5, 'available', '2026-11-27 10:00:00', "
                "'2026-11-27 10:00:00')"
            ),
            {"entry": entry},
        )
        writer.commit()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], IntegrityError), outcome
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT user_id FROM account ORDER BY 1")).scalars().all() == [
            "u-1",
            "u-2",
        ]
