"""append-only ledger: triggers refuse UPDATE and DELETE of ledger entries

Revision ID: 0008_append_only
Revises: 0003
Create Date: 2026-11-25

A balance is the sum of its ledger; an entry edited or removed by hand would make the two
disagree with nothing left to show why. From this revision a correction is a new entry: the
database itself refuses to change or remove one, whoever asks (on Postgres also TRUNCATE, which
skips row triggers). Stock movements get the same guard when that table is present.

Existing rows are kept as they are: triggers only look at what happens from now on.
"""

from alembic import op
import sqlalchemy as sa


revision = '0008_append_only'
down_revision = '0006_outbox_notify'
branch_labels = None
depends_on = None

# The text a refused statement carries; credex.db.failures tells it by this SQLSTATE (Postgres) or
# by SQLite's SQLITE_CONSTRAINT_TRIGGER, never by the text.
APPEND_ONLY_SQLSTATE = 'CX001'
TABLES = ('ledger_entry', 'stock_movement')


def _message(table: str) -> str:
    return f'{table} is append-only: record a correction as a new entry'


def _present(table: str) -> bool:
    return sa.inspect(op.get_bind()).has_table(table)


def _install(table: str) -> None:
    if op.get_bind().dialect.name == 'sqlite':
        for action in ('UPDATE', 'DELETE'):
            op.execute(
                f'CREATE TRIGGER IF NOT EXISTS {table}_no_{action.lower()} BEFORE {action} ON {table} '
                f"BEGIN SELECT RAISE(ABORT, '{_message(table)}'); END"
            )
        return
    op.execute(
        'CREATE OR REPLACE FUNCTION credex_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$ '
        "BEGIN RAISE EXCEPTION USING ERRCODE = '" + APPEND_ONLY_SQLSTATE + "', "
        "MESSAGE = TG_TABLE_NAME || ' is append-only: record a correction as a new entry'; END $$"
    )
    op.execute(f'DROP TRIGGER IF EXISTS {table}_append_only ON {table}')
    op.execute(
        f'CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} '
        'FOR EACH ROW EXECUTE FUNCTION credex_refuse_change()'
    )
    op.execute(f'DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}')
    op.execute(
        f'CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} '
        'FOR EACH STATEMENT EXECUTE FUNCTION credex_refuse_change()'
    )


def _remove(table: str) -> None:
    if op.get_bind().dialect.name == 'sqlite':
        op.execute(f'DROP TRIGGER IF EXISTS {table}_no_update')
        op.execute(f'DROP TRIGGER IF EXISTS {table}_no_delete')
    else:
        op.execute(f'DROP TRIGGER IF EXISTS {table}_append_only ON {table}')
        op.execute(f'DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}')


def upgrade() -> None:
    for table in TABLES:
        if _present(table):
            _install(table)


def downgrade() -> None:
    for table in TABLES:
        if _present(table):
            _remove(table)
    if op.get_bind().dialect.name != 'sqlite':
        op.execute('DROP FUNCTION IF EXISTS credex_refuse_change()')
