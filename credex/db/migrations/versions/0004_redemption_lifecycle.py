"""redemption lifecycle: cancel, refund, delivery status, events, stock movements

Revision ID: 0004_redemption_lifecycle
Revises: 0003
Create Date: 2026-11-25

- redemption: ``delivery_status`` and ``delivery_checked_at`` (track sync's claim); the new
  statuses need no schema change (a String(16)).
- redemption_event: every change of a redemption's status; each existing redemption gets its
  ``create`` event.
- stock_movement: every change of a gift's stock. The existing stock is carried over as it must
  have been before the existing redemptions took theirs (one ``set`` per limited gift, one
  ``redeem`` per redemption of it), so a gift's stock is the sum of its movements from here on
  and a cancel of an old redemption gives its stock back like any other.
- outbox_message: a redemption now has more than its redemption.created message (its
  redemption.cancelled ones), so the unique redemption id becomes a partial unique index on the
  created message; ``first_claimed_at`` records a relay's first claim, before any publish.
- lot_use: a redemption_refund puts points back into the lots they came from, as a negative use.
"""

from alembic import op
import sqlalchemy as sa


revision = '0004_redemption_lifecycle'
down_revision = '0003'
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
UNCONFIRMED = sa.text("state IN ('pending', 'sent')")
CREATED = sa.text("routing_key = 'redemption.created'")
FRESH = sa.text("state = 'pending' AND first_claimed_at IS NULL")
CARRIED_OVER = 'carried over by migration 0004'


def _sqlite() -> bool:
    return op.get_bind().dialect.name == 'sqlite'


def upgrade() -> None:
    # SQLite: ADD COLUMN keeps the table, which others reference.
    op.add_column('redemption', sa.Column('delivery_status', sa.String(length=32), nullable=True))
    op.add_column('redemption', sa.Column('delivery_checked_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_redemption_status_delivery_checked_at', 'redemption',
                    ['status', 'delivery_checked_at'], unique=False)

    op.create_table('redemption_event',
    sa.Column('id', BigId, autoincrement=True, nullable=False),
    sa.Column('redemption_id', BigId, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['redemption_id'], ['redemption.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_redemption_event_redemption_id_id', 'redemption_event', ['redemption_id', 'id'],
                    unique=False)
    op.execute(
        "INSERT INTO redemption_event (redemption_id, at, status, source, detail) "
        "SELECT id, created_at, 'pending', 'create', NULL FROM redemption ORDER BY id"
    )
    # A redemption already shipping moved there when its confirmation came (time unknown: updated_at).
    op.execute(
        "INSERT INTO redemption_event (redemption_id, at, status, source, detail) "
        "SELECT id, updated_at, status, 'relay', NULL FROM redemption WHERE status <> 'pending' ORDER BY id"
    )

    op.create_table('stock_movement',
    sa.Column('id', BigId, autoincrement=True, nullable=False),
    sa.Column('sku', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('delta', sa.BigInteger(), nullable=False),
    sa.Column('stock_after', sa.BigInteger(), nullable=True),
    sa.Column('ref', sa.String(length=255), nullable=True),
    sa.Column('operator', sa.String(length=128), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['sku'], ['catalog_item.sku'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_stock_movement_sku_id', 'stock_movement', ['sku', 'id'], unique=False)
    op.create_index('ix_stock_movement_ref', 'stock_movement', ['ref'], unique=False)
    taken = (
        "SELECT sku, coalesce(sum(quantity), 0) AS taken FROM redemption GROUP BY sku"
    )
    op.execute(
        "INSERT INTO stock_movement (sku, kind, delta, stock_after, ref, operator, at) "
        "SELECT i.sku, 'set', i.stock + coalesce(t.taken, 0), i.stock + coalesce(t.taken, 0), NULL, "
        f"'{CARRIED_OVER}', i.created_at "
        f"FROM catalog_item i LEFT JOIN ({taken}) t ON t.sku = i.sku "
        "WHERE i.stock IS NOT NULL ORDER BY i.sku"
    )
    op.execute(
        "INSERT INTO stock_movement (sku, kind, delta, stock_after, ref, operator, at) "
        "SELECT r.sku, 'redeem', -r.quantity, "
        "i.stock + coalesce(t.taken, 0) - sum(r.quantity) OVER (PARTITION BY r.sku ORDER BY r.id "
        "ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW), "
        "CAST(r.id AS VARCHAR(255)), r.operator, r.created_at "
        f"FROM redemption r JOIN catalog_item i ON i.sku = r.sku LEFT JOIN ({taken}) t ON t.sku = r.sku "
        "WHERE i.stock IS NOT NULL ORDER BY r.id"
    )

    # The outbox: more than one message per redemption; the created one stays unique.
    op.drop_index('ix_outbox_message_due', table_name='outbox_message')
    if _sqlite():
        with op.batch_alter_table(
            'outbox_message', recreate='always',
            naming_convention={'uq': 'uq_%(table_name)s_%(column_0_name)s'},
        ) as batch_op:
            batch_op.drop_constraint('uq_outbox_message_redemption_id', type_='unique')
            batch_op.add_column(sa.Column('first_claimed_at', sa.DateTime(timezone=True), nullable=True))
    else:
        op.drop_constraint('outbox_message_redemption_id_key', 'outbox_message', type_='unique')
        op.add_column('outbox_message', sa.Column('first_claimed_at', sa.DateTime(timezone=True), nullable=True))
    # Messages a relay may already have handed to the broker count as claimed.
    op.execute("UPDATE outbox_message SET first_claimed_at = created_at WHERE attempts > 0 OR state <> 'pending' "
               "OR claimed_by IS NOT NULL OR sent_at IS NOT NULL OR last_error IS NOT NULL")
    op.create_index('ix_outbox_message_redemption_id', 'outbox_message', ['redemption_id'], unique=False)
    op.create_index(
        'uq_outbox_message_created', 'outbox_message', ['redemption_id'], unique=True,
        postgresql_where=CREATED, sqlite_where=CREATED,
    )
    op.create_index(
        'ix_outbox_message_due', 'outbox_message', ['next_attempt_at', 'id'], unique=False,
        postgresql_where=UNCONFIRMED, sqlite_where=UNCONFIRMED,
    )
    # The relay's first claim of a message reads the fresh ones off the front of this one.
    op.create_index(
        'ix_outbox_message_fresh', 'outbox_message', ['next_attempt_at', 'id'], unique=False,
        postgresql_where=FRESH, sqlite_where=FRESH,
    )

    # lot_use: negative uses put points back.
    if _sqlite():
        op.execute(
            "CREATE TABLE lot_use_0004 (lot_id BIGINT NOT NULL, entry_id BIGINT NOT NULL, points BIGINT NOT NULL, "
            "CONSTRAINT ck_lot_use_points_nonzero CHECK (points <> 0), PRIMARY KEY (lot_id, entry_id), "
            "FOREIGN KEY(lot_id) REFERENCES point_lot (id), FOREIGN KEY(entry_id) REFERENCES ledger_entry (id))"
        )
        op.execute("INSERT INTO lot_use_0004 (lot_id, entry_id, points) SELECT lot_id, entry_id, points FROM lot_use")
        op.execute("DROP TABLE lot_use")
        op.execute("ALTER TABLE lot_use_0004 RENAME TO lot_use")
    else:
        op.drop_constraint('ck_lot_use_points_positive', 'lot_use', type_='check')
        op.create_check_constraint('ck_lot_use_points_nonzero', 'lot_use', 'points <> 0')


def downgrade() -> None:
    # Back to one message per redemption and positive lot uses: what 0003 can hold (the cancels'
    # messages and the points put back are lost; take a backup first).
    if _sqlite():
        op.execute(
            "CREATE TABLE lot_use_0003 (lot_id BIGINT NOT NULL, entry_id BIGINT NOT NULL, points BIGINT NOT NULL, "
            "CONSTRAINT ck_lot_use_points_positive CHECK (points > 0), PRIMARY KEY (lot_id, entry_id), "
            "FOREIGN KEY(lot_id) REFERENCES point_lot (id), FOREIGN KEY(entry_id) REFERENCES ledger_entry (id))"
        )
        op.execute("INSERT INTO lot_use_0003 SELECT lot_id, entry_id, points FROM lot_use WHERE points > 0")
        op.execute("DROP TABLE lot_use")
        op.execute("ALTER TABLE lot_use_0003 RENAME TO lot_use")
    else:
        op.execute("DELETE FROM lot_use WHERE points < 0")
        op.drop_constraint('ck_lot_use_points_nonzero', 'lot_use', type_='check')
        op.create_check_constraint('ck_lot_use_points_positive', 'lot_use', 'points > 0')
    op.execute("DELETE FROM outbox_message WHERE routing_key <> 'redemption.created'")
    for name in ('ix_outbox_message_fresh', 'ix_outbox_message_due', 'uq_outbox_message_created',
                 'ix_outbox_message_redemption_id'):
        op.drop_index(name, table_name='outbox_message')
    if _sqlite():
        with op.batch_alter_table('outbox_message', recreate='always') as batch_op:
            batch_op.drop_column('first_claimed_at')
            batch_op.create_unique_constraint('uq_outbox_message_redemption_id', ['redemption_id'])
    else:
        op.drop_column('outbox_message', 'first_claimed_at')
        op.create_unique_constraint('outbox_message_redemption_id_key', 'outbox_message', ['redemption_id'])
    op.create_index(
        'ix_outbox_message_due', 'outbox_message', ['next_attempt_at', 'id'], unique=False,
        postgresql_where=UNCONFIRMED, sqlite_where=UNCONFIRMED,
    )
    op.drop_table('stock_movement')
    op.drop_table('redemption_event')
    op.drop_index('ix_redemption_status_delivery_checked_at', table_name='redemption')
    if _sqlite():
        op.execute("ALTER TABLE redemption DROP COLUMN delivery_checked_at")
        op.execute("ALTER TABLE redemption DROP COLUMN delivery_status")
    else:
        op.drop_column('redemption', 'delivery_checked_at')
        op.drop_column('redemption', 'delivery_status')
