"""outbox: Postgres tells listening relays at commit that a message became due

Revision ID: 0006_outbox_notify
Revises: 0003
Create Date: 2026-11-25

A relay that only polls finds a new message up to one poll interval late. With this trigger every
transaction that writes a due outbox message (a redemption, a cancel, `relay retry`, whoever the
writer is) sends `NOTIFY credex_outbox`, which Postgres delivers when it commits, so a relay
LISTENing on its own connection claims at once; polling stays as the safety net. Notifications of
one transaction collapse into one (same channel, same empty payload). SQLite has no NOTIFY: its
relay watches the file's data version instead, and this revision changes nothing there.
"""

from alembic import op


revision = '0006_outbox_notify'
down_revision = '0005_shipment_lifecycle'
branch_labels = None
depends_on = None

CHANNEL = 'credex_outbox'

# A row is worth a wake-up when it is unconfirmed and due now or within a second (clock drift
# between the writer and the server); a relay woken for nothing costs one claim that finds none.
FUNCTION = f"""
CREATE OR REPLACE FUNCTION credex_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', '');
    RETURN NULL;
END
$$
"""
DUE = "NEW.state IN ('pending', 'sent') AND NEW.next_attempt_at <= clock_timestamp() + interval '1 second'"
ON_INSERT = f"""
CREATE TRIGGER outbox_message_notify_insert AFTER INSERT ON outbox_message
FOR EACH ROW WHEN ({DUE}) EXECUTE FUNCTION credex_outbox_notify()
"""
ON_UPDATE = f"""
CREATE TRIGGER outbox_message_notify_update AFTER UPDATE OF state, next_attempt_at ON outbox_message
FOR EACH ROW WHEN ({DUE} AND (OLD.state, OLD.next_attempt_at) IS DISTINCT FROM (NEW.state, NEW.next_attempt_at))
EXECUTE FUNCTION credex_outbox_notify()
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(FUNCTION)
    op.execute(ON_INSERT)
    op.execute(ON_UPDATE)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute('DROP TRIGGER IF EXISTS outbox_message_notify_update ON outbox_message')
    op.execute('DROP TRIGGER IF EXISTS outbox_message_notify_insert ON outbox_message')
    op.execute('DROP FUNCTION IF EXISTS credex_outbox_notify()')
