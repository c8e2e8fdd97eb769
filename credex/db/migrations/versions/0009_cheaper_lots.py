"""point_lot: partial indexes, so that a plain grant pays for one lot index, not three

Revision ID: 0009_cheaper_lots
Revises: 0008_append_only
Create Date: 2026-11-25

Revision 0002 indexed every lot three times: (user_id, state, available_at, id), (state,
available_at) and (state, expires_at). Most lots are plain grants and purchases that are
available at once and never expire, and most lots end up used; yet each one was written into
three indexes, and stayed there after it was spent. Bulk grants spent about half their time
keeping those indexes.

Each index now holds only the lots its queries read:

- ix_point_lot_available (user_id, available_at, id) WHERE state = 'available': spending oldest
  first, bulk grants reading the lots they spend;
- ix_point_lot_pending (user_id, available_at, id) WHERE state = 'pending': `award settle`;
- ix_point_lot_expirable (user_id, expires_at) WHERE state = 'available' AND expires_at IS NOT
  NULL: `award expire` (the accounts with lapsed points, then each one's lapsed lots) and an
  account's expiring points. Read whole, it is the expirable lots only, in account order, which
  is what the accounts' DISTINCT wants.

A used or expired lot leaves them all. (ix_ledger_entry_source_id was meant to become partial
here too; it is done in 0011_partial_source_index.) lot_use gets an index on entry_id: a refund reads the lots
its redemption took from, which scanned every use. Rows are not touched.
"""

from alembic import op
import sqlalchemy as sa


revision = "0009_cheaper_lots"
down_revision = "0008_append_only"
branch_labels = None
depends_on = None

# Kept in step with credex.db.models (LOT_*_SQL); written out here, as a migration must not change
# when the models do.
AVAILABLE = sa.text("state = 'available'")
PENDING = sa.text("state = 'pending'")
EXPIRABLE = sa.text("state = 'available' AND expires_at IS NOT NULL")

OLD = (
    ("ix_point_lot_user_id_state_available_at", ["user_id", "state", "available_at", "id"]),
    ("ix_point_lot_state_available_at", ["state", "available_at"]),
    ("ix_point_lot_state_expires_at", ["state", "expires_at"]),
)
NEW = (
    ("ix_point_lot_available", ["user_id", "available_at", "id"], AVAILABLE),
    ("ix_point_lot_pending", ["user_id", "available_at", "id"], PENDING),
    ("ix_point_lot_expirable", ["user_id", "expires_at"], EXPIRABLE),
)


def upgrade() -> None:
    for name, _columns in OLD:
        op.drop_index(name, table_name="point_lot")
    for name, columns, where in NEW:
        op.create_index(name, "point_lot", columns, unique=False, postgresql_where=where, sqlite_where=where)
    op.create_index("ix_lot_use_entry_id", "lot_use", ["entry_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_lot_use_entry_id", table_name="lot_use")
    for name, _columns, _where in NEW:
        op.drop_index(name, table_name="point_lot")
    for name, columns in OLD:
        op.create_index(name, "point_lot", columns, unique=False)
