"""shipment requests: a row state machine for create and cancel, tombstones, unique waybills

Revision ID: 0005_shipment_lifecycle
Revises: 0003
Create Date: 2026-11-25

Each shipment request gets a status (requested, requesting, waybill, cancelled, failed) that the
warehouse changes only by conditional updates, the carrier idempotency key it is asked with, the
recipient and the carrier's shipment id (to cancel the waybill), when the carrier was first asked,
and a reason. A cancel that comes before its create writes a tombstone: a cancelled row with no
sku, quantity, address or message yet, so those columns become nullable.

Existing rows: with an express number they become ``waybill``, without one ``requested`` (and
counted as asked: the old warehouse may have called the carrier before it crashed). They keep the
key the old warehouse used, ``redemption-<id>``, so that asking again cannot issue a second
waybill. The recipient is copied from the redemption where the points side shares the database.

Express numbers become unique per carrier. Duplicates already stored are not kept silently: the
upgrade stops, changes nothing, and lists them with how to fix them.
"""

from alembic import op
import sqlalchemy as sa


revision = '0005_shipment_lifecycle'
down_revision = '0004_redemption_lifecycle'
branch_labels = None
depends_on = None

UNIQUE_WAYBILL = 'uq_shipment_request_carrier_express_no'


def _refuse_duplicate_waybills() -> None:
    rows = op.get_bind().execute(sa.text(
        "SELECT carrier, express_no, id, redemption_id FROM shipment_request "
        "WHERE express_no IS NOT NULL AND (carrier, express_no) IN ("
        "  SELECT carrier, express_no FROM shipment_request WHERE express_no IS NOT NULL "
        "  GROUP BY carrier, express_no HAVING count(*) > 1) "
        "ORDER BY carrier, express_no, id"
    )).all()
    if not rows:
        return
    groups: dict[tuple, list] = {}
    for carrier, express_no, shipment_id, redemption_id in rows:
        groups.setdefault((carrier, express_no), []).append(f"{shipment_id} (redemption {redemption_id})")
    listed = '; '.join(
        f"{carrier} {express_no} on shipment requests {', '.join(ids)}"
        for (carrier, express_no), ids in groups.items()
    )
    from credex.errors import Conflict

    raise Conflict(
        f"cannot make express numbers unique per carrier: {len(groups)} number(s) are on several "
        f"shipment requests: {listed}. Ask the carrier which shipment each number belongs to; on "
        "the others clear it (UPDATE shipment_request SET carrier = NULL, express_no = NULL WHERE "
        "id = …) so that their waybill is asked for again, then run `credex db upgrade` again"
    )


def upgrade() -> None:
    _refuse_duplicate_waybills()
    with op.batch_alter_table('shipment_request') as batch:
        batch.add_column(sa.Column('status', sa.String(length=16), nullable=False, server_default='requested'))
        batch.add_column(sa.Column('idempotency_key', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('recipient', sa.String(length=128), nullable=True))
        batch.add_column(sa.Column('carrier_shipment_id', sa.String(length=128), nullable=True))
        batch.add_column(sa.Column('asked_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('reason', sa.Text(), nullable=True))
        batch.alter_column('message_id', existing_type=sa.String(length=36), nullable=True)
        batch.alter_column('sku', existing_type=sa.String(length=64), nullable=True)
        batch.alter_column('quantity', existing_type=sa.Integer(), nullable=True)
        batch.alter_column('address', existing_type=sa.Text(), nullable=True)
        batch.create_unique_constraint(UNIQUE_WAYBILL, ['carrier', 'express_no'])
    op.execute(
        "UPDATE shipment_request SET "
        "status = CASE WHEN express_no IS NULL THEN 'requested' ELSE 'waybill' END, "
        "idempotency_key = 'redemption-' || CAST(redemption_id AS VARCHAR(20)), "
        "asked_at = updated_at"
    )
    op.execute(
        "UPDATE shipment_request SET recipient = ("
        "SELECT r.user_id FROM redemption r WHERE r.id = shipment_request.redemption_id)"
    )


def downgrade() -> None:
    # Tombstones have nothing to ship: they go, so that the columns can be NOT NULL again.
    op.execute("DELETE FROM shipment_request WHERE sku IS NULL OR quantity IS NULL OR address IS NULL")
    op.execute("UPDATE shipment_request SET message_id = '' WHERE message_id IS NULL")
    with op.batch_alter_table('shipment_request') as batch:
        batch.drop_constraint(UNIQUE_WAYBILL, type_='unique')
        batch.alter_column('address', existing_type=sa.Text(), nullable=False)
        batch.alter_column('quantity', existing_type=sa.Integer(), nullable=False)
        batch.alter_column('sku', existing_type=sa.String(length=64), nullable=False)
        batch.alter_column('message_id', existing_type=sa.String(length=36), nullable=False)
        for column in ('reason', 'asked_at', 'carrier_shipment_id', 'recipient', 'idempotency_key', 'status'):
            batch.drop_column(column)
