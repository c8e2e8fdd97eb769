"""outbox: a partial index on the due messages, in the order the relay claims them

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

The relay asks for the oldest due unconfirmed messages, a batch at a time. On (state,
next_attempt_at) that meant sorting every due message for each batch: after a long outage, a
backlog of a million messages sorted for every 500 claimed. Indexing only the unconfirmed
messages, in due order, lets a claim read its batch off the front of the index.
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

UNCONFIRMED = sa.text("state IN ('pending', 'sent')")


def upgrade() -> None:
    op.drop_index('ix_outbox_message_state_next_attempt_at', table_name='outbox_message')
    op.create_index(
        'ix_outbox_message_due', 'outbox_message', ['next_attempt_at', 'id'], unique=False,
        postgresql_where=UNCONFIRMED, sqlite_where=UNCONFIRMED,
    )


def downgrade() -> None:
    op.drop_index('ix_outbox_message_due', table_name='outbox_message')
    op.create_index(
        'ix_outbox_message_state_next_attempt_at', 'outbox_message', ['state', 'next_attempt_at'], unique=False
    )
