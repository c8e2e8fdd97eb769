"""outbox_claim_mark: one durable mark per batch instead of one per message

Revision ID: 0012_outbox_claim_mark
Revises: 0011_partial_source_index
Create Date: 2026-11-26

A Postgres relay holds its batch as row locks, which a crashed relay loses; so that `redeem
cancel` never withdraws a message the broker may have, the relay used to commit
``first_claimed_at`` on every fresh message of a batch before publishing it: an update of each
row (and of its five index entries) besides the record, half of the relay's database time. Now it
commits one row: the created_at of the batch's newest fresh message, in ``outbox_claim_mark``,
and `redeem cancel` withdraws a message only if it was created after that mark (and has no
``first_claimed_at``: SQLite's leases still write it, and the record now writes it on Postgres).

ix_outbox_message_fresh (the fresh messages by due time) served only the per-message mark: it
goes, and every new message is written into one index fewer.

Downgrading writes ``first_claimed_at`` on every message the mark covers, which is what the older
relays and cancels read.
"""

from datetime import datetime, timezone

from alembic import op
import sqlalchemy as sa


revision = "0012_outbox_claim_mark"
down_revision = "0011_partial_source_index"
branch_labels = None
depends_on = None

NEVER = datetime(1970, 1, 1, tzinfo=timezone.utc)  # before any message
FRESH = sa.text("state = 'pending' AND first_claimed_at IS NULL")


def upgrade() -> None:
    mark = op.create_table(
        "outbox_claim_mark",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("through", sa.DateTime(timezone=True), nullable=False),
    )
    op.bulk_insert(mark, [{"id": 1, "through": NEVER}])
    op.drop_index("ix_outbox_message_fresh", table_name="outbox_message")


def downgrade() -> None:
    op.execute(
        "UPDATE outbox_message SET first_claimed_at = created_at WHERE first_claimed_at IS NULL "
        "AND created_at <= (SELECT through FROM outbox_claim_mark WHERE id = 1)"
    )
    op.drop_table("outbox_claim_mark")
    op.create_index(
        "ix_outbox_message_fresh", "outbox_message", ["next_attempt_at", "id"], unique=False,
        postgresql_where=FRESH, sqlite_where=FRESH,
    )
