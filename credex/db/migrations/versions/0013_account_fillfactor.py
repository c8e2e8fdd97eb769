"""account: leave room on each page so a balance's update stays on its page (Postgres)

Revision ID: 0013_account_fillfactor
Revises: 0012_outbox_claim_mark
Create Date: 2026-11-26

Every award, redemption, refund and bulk batch rewrites account rows, and no indexed column of
account ever changes (the key is user_id). Postgres can then keep the new version on the same page
and skip the primary key (a HOT update), but only where the page has room; at the default
fillfactor of 100 a page is full once its rows are in, so most updates went to another page and
added a key entry. With autovacuum slow or off, the table and its key grew with every version.
Measured with bench/bulk.py's bare script (1M grants over 20,000 shoppers, batches of 5,000, one
run each): 408,291 of 960,354 account updates HOT and 58 MB of account pages at the default;
all of them HOT and 4 MB at fillfactor 50, the run 64.5 s -> 53.8 s. Pages written from now on
keep the room; ``VACUUM FULL account`` repacks the old ones when convenient. SQLite has no such
setting: nothing to do there.
"""

from alembic import op


revision = "0013_account_fillfactor"
down_revision = "0012_outbox_claim_mark"
branch_labels = None
depends_on = None

FILLFACTOR = 50


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE account SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE account RESET (fillfactor)")
