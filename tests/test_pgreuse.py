"""The suite's own Postgres databases used again (tests/pgreuse.py): a test must never meet what
an earlier test left, so a database comes back as the template made it, under a new name, or
not at all."""

from __future__ import annotations

import psycopg
import pytest

from tests import pgreuse
from tests.support import pg_admin, pg_url


def run(database: str, *statements: str) -> list[tuple]:
    with psycopg.connect(pg_url(database), autocommit=True) as connection:
        rows: list[tuple] = []
        for statement in statements:
            cursor = connection.execute(statement)
            rows = cursor.fetchall() if cursor.description else []
        return rows


def exists(database: str) -> bool:
    with pg_admin() as admin:
        found = admin.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (database,))
        return found.fetchone()[0] == 1


def test_a_database_whose_rows_changed_comes_back_empty_under_a_new_name(postgres_template):
    first = pgreuse.take(postgres_template)
    template_rows = run(first, "SELECT * FROM outbox_claim_mark")
    run(
        first,
        "INSERT INTO account (user_id, balance, earned, redeemed, created_at, updated_at) "
        "VALUES ('u1', 5, 5, 0, now(), now())",
        "INSERT INTO ledger_entry (user_id, kind, ref, points, balance, operator, created_at) "
        "VALUES ('u1', 'grant', 'r1', 5, 5, 'cli', now())",
        "UPDATE outbox_claim_mark SET through = now()",
    )
    pgreuse.give_back(postgres_template, first)
    assert not exists(first)
    again = pgreuse.take(postgres_template)
    try:
        assert again != first
        assert run(again, "SELECT count(*) FROM account") == [(0,)]
        assert run(again, "SELECT count(*) FROM ledger_entry") == [(0,)]
        assert run(again, "SELECT * FROM outbox_claim_mark") == template_rows  # the migration's row is back
        # Numbering starts again, as in a new copy.
        run(
            again,
            "INSERT INTO account (user_id, balance, earned, redeemed, created_at, updated_at) "
            "VALUES ('u2', 1, 1, 0, now(), now())",
        )
        assert run(
            again,
            "INSERT INTO ledger_entry (user_id, kind, ref, points, balance, operator, created_at) "
            "VALUES ('u2', 'grant', 'r2', 1, 1, 'cli', now()) RETURNING id",
        ) == [(1,)]
    finally:
        pgreuse.give_back(postgres_template, again)


@pytest.mark.parametrize(
    "change",
    [
        "ALTER TABLE ledger_entry DISABLE TRIGGER ledger_entry_append_only",
        "ALTER TABLE account ADD COLUMN note text",
        "DROP INDEX ix_point_lot_available",
        "CREATE SEQUENCE stray",
        "GRANT SELECT ON account TO PUBLIC",
        "ALTER TABLE account SET (fillfactor = 100)",
        "CREATE OR REPLACE FUNCTION credex_refuse_change() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RETURN NULL; END $$",
        "UPDATE alembic_version SET version_num = 'older'",
    ],
)
def test_a_database_whose_schema_changed_is_dropped_not_used_again(postgres_template, change):
    name = pgreuse.take(postgres_template)
    run(name, change)
    spares_before = list(pgreuse._spares[postgres_template])
    pgreuse.give_back(postgres_template, name)
    assert not exists(name)
    assert pgreuse._spares[postgres_template] == spares_before  # nothing kept


def test_a_database_another_session_still_uses_is_dropped(postgres_template):
    name = pgreuse.take(postgres_template)
    with psycopg.connect(pg_url(name), autocommit=True) as lingering:
        lingering.execute("SELECT 1")
        spares_before = list(pgreuse._spares[postgres_template])
        pgreuse.give_back(postgres_template, name)
        assert pgreuse._spares[postgres_template] == spares_before
    assert not exists(name)
