"""ledger_entry: index source_id only for the entries that have one

Revision ID: 0011_partial_source_index
Revises: 0010_delivery_checkpoints
Create Date: 2026-11-26

Grants and purchases, most of the ledger, have no source_id, yet every one of them was written
into ix_ledger_entry_source_id. Only refunds, settles, expiries and a redemption's refund have a
source, and the one query reading the index (a purchase's earlier refunds: ``source_id = x``)
implies ``source_id IS NOT NULL`` on both backends, so the index keeps only those entries. Rows
are not touched.
"""

from alembic import op
import sqlalchemy as sa


revision = "0011_partial_source_index"
down_revision = "0010_delivery_checkpoints"
branch_labels = None
depends_on = None

HAS_SOURCE = sa.text("source_id IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_ledger_entry_source_id", table_name="ledger_entry")
    op.create_index(
        "ix_ledger_entry_source_id",
        "ledger_entry",
        ["source_id"],
        unique=False,
        postgresql_where=HAS_SOURCE,
        sqlite_where=HAS_SOURCE,
    )


def downgrade() -> None:
    op.drop_index("ix_ledger_entry_source_id", table_name="ledger_entry")
    op.create_index("ix_ledger_entry_source_id", "ledger_entry", ["source_id"], unique=False)
