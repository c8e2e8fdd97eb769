"""Least-privilege roles on Postgres (``credex db roles``): one role per kind of process, each
granted only what its commands need, table by table and, where a table is shared, column by column.

The roles are NOLOGIN groups: a login role (a password, a certificate) is made a member of one
(``GRANT credex_relay TO relay_app``) and connects as itself, with the group's privileges only.
No role may UPDATE or DELETE a ledger entry; the append-only triggers (migration 0008) refuse it
to the tables' owner too.

Refreshing is idempotent: every privilege of the four roles on the schema's tables and sequences
is revoked and granted again in one transaction, so a privilege taken out of this list goes away.
Roles are cluster-wide while grants are per database, so creating a role tolerates another run
creating it at the same moment in another database (the advisory lock only spans one database).
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import text
from sqlalchemy.engine import Connection


class Grant(NamedTuple):
    table: str
    privileges: tuple[str, ...]
    columns: tuple[str, ...] = ()  # the privileges apply to these columns only


_READ = ("SELECT",)
_ADD = ("SELECT", "INSERT")
_WRITE = ("SELECT", "INSERT", "UPDATE")

# Every role reads the schema's revision (a command checks it before anything else).
_REVISION = Grant("alembic_version", _READ)

# The points side of a refund: points back into their lots, debt paid first, stock back. The
# relay needs it for a cancelled redemption (the redemption lifecycle), never to set prices.
_REFUND = (
    Grant("account", ("SELECT", "UPDATE")),
    Grant("ledger_entry", _ADD),
    Grant("point_lot", ("SELECT", "UPDATE")),
    Grant("lot_use", _ADD),
    Grant("catalog_item", _READ),
    Grant("catalog_item", ("UPDATE",), ("stock", "updated_at")),
    Grant("redemption_event", _ADD),
    Grant("stock_movement", _ADD),
)

ROLES: dict[str, tuple[Grant, ...]] = {
    # catalog, award (also bulk, refund, settle, expire), redeem, account, track
    "credex_support": (
        _REVISION,
        Grant("account", _WRITE),
        Grant("ledger_entry", _ADD),
        Grant("point_lot", _WRITE),
        Grant("lot_use", _ADD),
        Grant("catalog_item", _WRITE),
        Grant("redemption", _WRITE),  # UPDATE: redeem cancel, the stored delivery status
        Grant("outbox_message", _WRITE),  # UPDATE: a cancel withdraws a message never sent
        Grant("outbox_claim_mark", _READ),  # ... created after every relay's claim
        Grant("redemption_event", _ADD),
        Grant("stock_movement", _ADD),
    ),
    # relay run / status / list / retry / purge: the outbox, and what a confirmation changes
    "credex_relay": (
        _REVISION,
        Grant("outbox_message", ("SELECT", "INSERT", "UPDATE", "DELETE")),  # DELETE: relay purge
        Grant("outbox_claim_mark", _WRITE),  # a Postgres relay's claim, before it publishes
        Grant("redemption", _READ),
        Grant("redemption", ("UPDATE",), ("status", "carrier", "express_no", "updated_at")),
        *_REFUND,
    ),
    # warehouse run / list: its own table, nothing of the points
    "credex_warehouse": (
        _REVISION,
        Grant("shipment_request", _WRITE),
    ),
    # audit verify: reads everything, writes nothing
    "credex_auditor": (
        _REVISION,
        *(
            Grant(table, _READ)
            for table in (
                "account",
                "ledger_entry",
                "point_lot",
                "lot_use",
                "catalog_item",
                "redemption",
                "outbox_message",
                "outbox_claim_mark",
                "shipment_request",
                "redemption_event",
                "stock_movement",
            )
        ),
    ),
}

_LOCK_KEY = 0x726F6C65  # "role": one refresh at a time per database

# CREATE ROLE is cluster-wide: another database's refresh may create it between our look and our
# create (unique_violation while both run, duplicate_object after).
_CREATE_ROLE = (
    "DO $$ BEGIN "
    "IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
    "CREATE ROLE {role} NOLOGIN; END IF; "
    "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
)


def roles_sql(connection: Connection) -> list[str]:
    """The statements that create or refresh the roles on ``connection``'s database, for the
    tables that exist in it (a table a newer schema adds is granted once it is there)."""
    database, schema = connection.execute(text("SELECT current_database(), current_schema()")).one()
    tables = set(
        connection.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = :schema"), {"schema": schema}
        ).scalars()
    )
    sequences = dict(
        connection.execute(
            text(
                "SELECT table_name, pg_get_serial_sequence("
                "quote_ident(table_schema) || '.' || quote_ident(table_name), column_name) "
                "FROM information_schema.columns WHERE table_schema = :schema AND column_name = 'id'"
            ),
            {"schema": schema},
        ).all()
    )
    q_schema, q_database = _quote(schema), _quote(database)
    statements = []
    for role, grants in ROLES.items():
        statements += [
            _CREATE_ROLE.format(role=role),
            f"GRANT CONNECT ON DATABASE {q_database} TO {role}",
            f"GRANT USAGE ON SCHEMA {q_schema} TO {role}",
            f"REVOKE ALL ON ALL TABLES IN SCHEMA {q_schema} FROM {role}",
            f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {q_schema} FROM {role}",
        ]
        inserts = set()
        for grant in grants:
            if grant.table not in tables:
                continue
            what = ", ".join(
                f"{p} ({', '.join(grant.columns)})" if grant.columns else p for p in grant.privileges
            )
            statements.append(f"GRANT {what} ON TABLE {q_schema}.{_quote(grant.table)} TO {role}")
            if "INSERT" in grant.privileges:
                inserts.add(grant.table)
        for table in sorted(inserts):
            if sequences.get(table):
                statements.append(f"GRANT USAGE, SELECT ON SEQUENCE {sequences[table]} TO {role}")
    return statements


def refresh_roles(connection: Connection) -> list[str]:
    """Create or refresh the roles in the caller's transaction; the statements run."""
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    statements = roles_sql(connection)
    for statement in statements:
        connection.exec_driver_sql(statement)
    return statements


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
