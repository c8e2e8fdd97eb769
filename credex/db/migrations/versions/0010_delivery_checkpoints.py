"""redemption.delivery_checkpoints: the carrier's checkpoints kept with its last status

Revision ID: 0010_delivery_checkpoints
Revises: 0009_cheaper_lots
Create Date: 2026-11-26

`track REDEMPTION_ID` answers from the stored answer while it is fresh (CREDEX_TRACK_MIN_INTERVAL):
the status alone told a shopper nothing about where the parcel is. The checkpoints the carrier
last gave (JSON, newest first) are kept beside the status. Existing rows get none until the next
`track` or `track sync`.
"""

from alembic import op
import sqlalchemy as sa


revision = "0010_delivery_checkpoints"
down_revision = "0009_cheaper_lots"
branch_labels = None
depends_on = None


# A plain ALTER TABLE on both backends: a batch copy of `redemption` on SQLite would have to drop
# a table other tables' foreign keys point at.
def upgrade() -> None:
    op.add_column("redemption", sa.Column("delivery_checkpoints", sa.Text(), nullable=True))


def downgrade() -> None:
    op.execute("ALTER TABLE redemption DROP COLUMN delivery_checkpoints")
