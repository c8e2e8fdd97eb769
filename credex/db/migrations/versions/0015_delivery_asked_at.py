"""redemption.delivery_asked_at: track sync's claim, apart from the time of the carrier's answer

Revision ID: 0015_delivery_asked_at
Revises: 0014_slimmer_account_indexes
Create Date: 2026-11-27

``delivery_checked_at`` was both: `track sync` wrote it when it claimed a parcel, before asking
the carrier, and `track` read it as the time the carrier gave ``delivery_status``. After a failed
check (an unknown number, a carrier down) `track` said "in_transit (as the carrier said at <the
failed attempt>)". The claim moves to ``delivery_asked_at`` (with the index the claim reads, on
(status, delivery_asked_at)); ``delivery_checked_at`` is the time of the carrier's last answer,
as redemption JSON shows it beside ``delivery_status``.

Existing rows keep their claims (``delivery_asked_at`` takes the old value, so no parcel is asked
again sooner than the interval allows); a row claimed but never answered (no status) has no time
of an answer. A row whose last claim failed after an earlier answer keeps the claim's time as
its answer's: the old column cannot tell them apart.

Downgrading puts the claim back into ``delivery_checked_at``, which is what the older credex reads.
"""

from alembic import op
import sqlalchemy as sa


revision = "0015_delivery_asked_at"
down_revision = "0014_slimmer_account_indexes"
branch_labels = None
depends_on = None


# A plain ALTER TABLE on both backends: a batch copy of `redemption` on SQLite would have to drop
# a table other tables' foreign keys point at.
def upgrade() -> None:
    op.add_column("redemption", sa.Column("delivery_asked_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE redemption SET delivery_asked_at = delivery_checked_at WHERE delivery_checked_at IS NOT NULL"
    )
    op.execute(
        "UPDATE redemption SET delivery_checked_at = NULL "
        "WHERE delivery_status IS NULL AND delivery_checked_at IS NOT NULL"
    )
    op.drop_index("ix_redemption_status_delivery_checked_at", table_name="redemption")
    op.create_index(
        "ix_redemption_status_delivery_asked_at", "redemption", ["status", "delivery_asked_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_redemption_status_delivery_asked_at", table_name="redemption")
    op.execute(
        "UPDATE redemption SET delivery_checked_at = delivery_asked_at WHERE delivery_asked_at IS NOT NULL"
    )
    op.create_index(
        "ix_redemption_status_delivery_checked_at",
        "redemption",
        ["status", "delivery_checked_at"],
        unique=False,
    )
    op.execute("ALTER TABLE redemption DROP COLUMN delivery_asked_at")
