"""points lifecycle: pending points, debt, lots spent oldest first, expiry

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

The balances already in the database become one available, unexpiring lot per account, so that
an upgraded account keeps every rule: its balance is the sum of its ledger and of its lots.
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def _add_counter(table: str, column: str, check: str | None) -> None:
    if op.get_bind().dialect.name == 'sqlite':
        # ADD COLUMN keeps the table: SQLite's batch copy would drop a table that others reference.
        constraint = f' CONSTRAINT {check} CHECK ({column} >= 0)' if check else ''
        op.execute(f'ALTER TABLE {table} ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0{constraint}')
    else:
        op.add_column(table, sa.Column(column, sa.BigInteger(), nullable=False, server_default='0'))
        if check:
            op.create_check_constraint(check, table, f'{column} >= 0')


def upgrade() -> None:
    _add_counter('account', 'pending', 'ck_account_pending_nonnegative')
    _add_counter('account', 'debt', 'ck_account_debt_nonnegative')
    _add_counter('ledger_entry', 'pending', None)
    _add_counter('ledger_entry', 'debt', None)
    op.add_column('ledger_entry', sa.Column('source_id', sa.BigInteger(), nullable=True))
    op.create_index('ix_ledger_entry_source_id', 'ledger_entry', ['source_id'], unique=False)

    op.create_table('point_lot',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.String(length=128), nullable=False),
    sa.Column('entry_id', sa.BigInteger(), nullable=True),
    sa.Column('points', sa.BigInteger(), nullable=False),
    sa.Column('remaining', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('available_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('remaining >= 0 AND remaining <= points', name='ck_point_lot_remaining'),
    sa.ForeignKeyConstraint(['user_id'], ['account.user_id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('entry_id', name='uq_point_lot_entry_id')
    )
    op.create_index('ix_point_lot_user_id_state_available_at', 'point_lot',
                    ['user_id', 'state', 'available_at', 'id'], unique=False)
    op.create_index('ix_point_lot_state_available_at', 'point_lot', ['state', 'available_at'], unique=False)
    op.create_index('ix_point_lot_state_expires_at', 'point_lot', ['state', 'expires_at'], unique=False)

    op.create_table('lot_use',
    sa.Column('lot_id', sa.BigInteger(), nullable=False),
    sa.Column('entry_id', sa.BigInteger(), nullable=False),
    sa.Column('points', sa.BigInteger(), nullable=False),
    sa.CheckConstraint('points > 0', name='ck_lot_use_points_positive'),
    sa.ForeignKeyConstraint(['entry_id'], ['ledger_entry.id'], ),
    sa.ForeignKeyConstraint(['lot_id'], ['point_lot.id'], ),
    sa.PrimaryKeyConstraint('lot_id', 'entry_id')
    )

    # Existing points: available now, never expiring, older than anything awarded from here on.
    op.execute(
        "INSERT INTO point_lot (user_id, entry_id, points, remaining, state, available_at, expires_at, created_at) "
        "SELECT user_id, NULL, balance, balance, 'available', created_at, NULL, created_at "
        "FROM account WHERE balance > 0 ORDER BY created_at, user_id"
    )


def downgrade() -> None:
    op.drop_table('lot_use')
    op.drop_index('ix_point_lot_state_expires_at', table_name='point_lot')
    op.drop_index('ix_point_lot_state_available_at', table_name='point_lot')
    op.drop_index('ix_point_lot_user_id_state_available_at', table_name='point_lot')
    op.drop_table('point_lot')
    op.drop_index('ix_ledger_entry_source_id', table_name='ledger_entry')
    for table, columns in (('ledger_entry', ('source_id', 'debt', 'pending')), ('account', ('debt', 'pending'))):
        if op.get_bind().dialect.name != 'sqlite' and table == 'account':
            op.drop_constraint('ck_account_debt_nonnegative', table, type_='check')
            op.drop_constraint('ck_account_pending_nonnegative', table, type_='check')
        for column in columns:
            op.drop_column(table, column)
