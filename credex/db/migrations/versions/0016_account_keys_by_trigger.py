"""ledger_entry and point_lot: an account is kept by a trigger, not by two per-row foreign keys (Postgres)

Revision ID: 0016_account_keys_by_trigger
Revises: 0015_delivery_asked_at
Create Date: 2026-11-27

The foreign keys ``ledger_entry.user_id`` and ``point_lot.user_id`` -> ``account`` made Postgres
look the account up and lock it (FOR KEY SHARE) once for every entry and every lot written, in a
trigger queued per row and run at the end of each statement. A bulk batch writes two rows per
grant, so that was two lookups a row for an account the batch had already locked, or created,
itself. Measured with `credex award bulk` (100k grants over 20,000 shoppers, batches of 5,000,
two runs each): the server's CPU 4.95-5.04 s with the keys, 2.93-3.09 s without, the run 7.2-7.6 s
against 5.5-6.0 s.

What the keys guaranteed is kept, where it can go wrong:
- Deleting an account, or changing its key, is refused while a ledger entry or a lot names it
  (SQLSTATE 23503, as a foreign key would), by a row trigger on ``account`` that runs only for
  those two statements: a balance's update does not fire it. A DELETE waits for the row lock of a
  transaction writing that account's entries (every writer locks or updates the account first),
  and the trigger's query then sees what that transaction committed.
- credex writes an entry or a lot only for an account it created or locked in the same
  transaction. A script inserting one for an unknown shopper is what ``credex audit verify``
  reports (account.ledger, account.lots: ``found: null``).

``redemption.user_id`` keeps its foreign key: one row per redemption, not per row of a file.
SQLite keeps both keys: its check is a lookup in the account's primary key, cheap beside
Postgres's, and removing a key there would copy the two largest tables.

Downgrading adds the keys back, which checks every row (and fails, naming the key, if the audit's
orphans exist).
"""

from alembic import op


revision = "0016_account_keys_by_trigger"
down_revision = "0015_delivery_asked_at"
branch_labels = None
depends_on = None

# (table, the foreign key's name as Postgres named it in 0001)
KEYS = (("ledger_entry", "ledger_entry_user_id_fkey"), ("point_lot", "point_lot_user_id_fkey"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "CREATE OR REPLACE FUNCTION credex_account_in_use() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN "
        "IF TG_OP = 'UPDATE' AND NEW.user_id = OLD.user_id THEN RETURN NEW; END IF; "
        "IF EXISTS (SELECT 1 FROM ledger_entry WHERE user_id = OLD.user_id) "
        "OR EXISTS (SELECT 1 FROM point_lot WHERE user_id = OLD.user_id) THEN "
        "RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation', "
        "MESSAGE = format('account %L still has ledger entries or lots: it cannot be ' "
        "|| lower(TG_OP) || 'd', OLD.user_id); "
        "END IF; "
        "IF TG_OP = 'DELETE' THEN RETURN OLD; END IF; "
        "RETURN NEW; "
        "END $$"
    )
    op.execute(
        "CREATE TRIGGER account_in_use BEFORE DELETE OR UPDATE OF user_id ON account "
        "FOR EACH ROW EXECUTE FUNCTION credex_account_in_use()"
    )
    for table, key in KEYS:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {key}")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, key in KEYS:
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {key} FOREIGN KEY (user_id) REFERENCES account (user_id)")
    op.execute("DROP TRIGGER account_in_use ON account")
    op.execute("DROP FUNCTION credex_account_in_use()")
