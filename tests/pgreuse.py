"""Postgres test databases used again when a test left them as the template made them.

``CREATE DATABASE … TEMPLATE`` costs the server 0.16-0.3 s of CPU (it writes every page of the
template, system catalogs included, to the WAL), and some 400 tests of the suite pay it on a
2-core machine. A database whose test changed only rows is as good as new once those rows are
gone: ``TRUNCATE … RESTART IDENTITY`` of credex's tables, with the rows the migrations wrote put
back, takes 0.07 s. Anything else a test may have changed (a table, column, index, constraint,
trigger or its enabled state, a function, an owner, a privilege, a default privilege, the
schema's revision, the database's own settings) is read back as a fingerprint and compared with
that of the first copy made in this process; a database whose fingerprint differs, or that
another session is still connected to, is dropped as before.

A spare is renamed before it is used again, so every test still meets a database name no test
of its process used before. Each test process keeps its own spares, so two processes never share
one."""

from __future__ import annotations

import uuid
from collections import defaultdict

from tests.support import pg_admin

_spares: dict[str, list[str]] = defaultdict(list)  # template -> clean databases made from it
_fingerprints: dict[str, tuple] = {}  # template -> its fingerprint
_seeds: dict[str, dict[str, list[tuple]]] = {}  # template -> the rows its migrations wrote

# What a test can change in a database besides its rows, read as text. System schemas are left
# out: only a superuser could change them, and no test does.
_FINGERPRINT = """
WITH ns AS (
    SELECT oid, nspname FROM pg_namespace
    WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
      AND nspname NOT LIKE 'pg_temp%' AND nspname NOT LIKE 'pg_toast_temp%'
)
SELECT 'rel', concat_ws(' ', ns.nspname, c.relname, c.relkind, c.relowner::regrole, c.relacl, c.reloptions,
                        c.relrowsecurity, c.relpersistence)
FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
UNION ALL
SELECT 'col', concat_ws(' ', c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                        pg_get_expr(d.adbin, d.adrelid), a.attacl)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN ns ON ns.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'con', concat_ws(' ', conrelid::regclass, conname, pg_get_constraintdef(oid), convalidated)
FROM pg_constraint WHERE connamespace IN (SELECT oid FROM ns)
UNION ALL
SELECT 'idx', indexdef FROM pg_indexes WHERE schemaname IN (SELECT nspname FROM ns)
UNION ALL
SELECT 'trg', concat_ws(' ', pg_get_triggerdef(t.oid), t.tgenabled)
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid WHERE c.relnamespace IN (SELECT oid FROM ns)
UNION ALL
SELECT 'fn', concat_ws(' ', p.oid::regprocedure, md5(pg_get_functiondef(p.oid)), p.proowner::regrole,
                       p.proacl)
FROM pg_proc p WHERE p.pronamespace IN (SELECT oid FROM ns)
UNION ALL
SELECT 'view', concat_ws(' ', c.relname, md5(pg_get_viewdef(c.oid))) FROM pg_class c
WHERE c.relkind IN ('v', 'm') AND c.relnamespace IN (SELECT oid FROM ns)
UNION ALL
SELECT 'rule', concat_ws(' ', schemaname, tablename, rulename) FROM pg_rules
WHERE schemaname IN (SELECT nspname FROM ns)
UNION ALL
SELECT 'pol', concat_ws(' ', schemaname, tablename, policyname) FROM pg_policies
UNION ALL
SELECT 'ns', concat_ws(' ', nspname, nspowner::regrole, nspacl) FROM pg_namespace
WHERE oid IN (SELECT oid FROM ns)
UNION ALL
SELECT 'dacl', concat_ws(' ', defaclrole::regrole, defaclnamespace, defaclobjtype, defaclacl)
FROM pg_default_acl
UNION ALL
SELECT 'ext', concat_ws(' ', extname, extversion) FROM pg_extension
UNION ALL
SELECT 'type', t.typname FROM pg_type t
WHERE t.typnamespace IN (SELECT oid FROM ns) AND t.typtype IN ('e', 'd', 'r', 'm')
UNION ALL
SELECT 'db', concat_ws(' ', datdba::regrole, datallowconn, datconnlimit, datacl)
FROM pg_database WHERE datname = current_database()
UNION ALL
SELECT 'set', concat_ws(' ', setrole::regrole, setconfig)
FROM pg_db_role_setting WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _connect(database: str):
    import psycopg

    from tests.support import pg_url

    return psycopg.connect(pg_url(database), autocommit=True, connect_timeout=5)


def _fingerprint(connection) -> tuple:
    rows = connection.execute(_FINGERPRINT).fetchall()
    public = connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    tables = {row[0] for row in public}
    revision = (
        connection.execute("SELECT version_num FROM alembic_version ORDER BY 1").fetchall()
        if "alembic_version" in tables
        else None
    )
    return (tuple(sorted(rows)), revision)


def _emptied_tables(connection) -> list[str]:
    public = connection.execute(
        "SELECT quote_ident(tablename) FROM pg_tables "
        "WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
    )
    return [row[0] for row in public]


def _seed_rows(connection) -> dict[str, list[tuple]]:
    """The rows the migrations wrote (``outbox_claim_mark``'s one row), table -> rows, read on a
    fresh copy: they go back after the TRUNCATE. ``alembic_version`` is never emptied."""
    seeds = {}
    for table in _emptied_tables(connection):
        rows = connection.execute(f"SELECT * FROM {table}").fetchall()
        if rows:
            seeds[table] = rows
    return seeds


def _new_name() -> str:
    return f"credex_t_{uuid.uuid4().hex[:12]}"


def take(template: str) -> str:
    """A database at the template's state: a spare, else a new copy."""
    spares = _spares[template]
    if spares:
        return spares.pop()
    name = _new_name()
    with pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    if template not in _fingerprints:
        # Read on the first copy, never on the template: a session left on it would make the
        # next CREATE DATABASE … TEMPLATE wait for it.
        with _connect(name) as connection:
            _fingerprints[template] = _fingerprint(connection)
            _seeds[template] = _seed_rows(connection)
    return name


def give_back(template: str, name: str) -> None:
    """Keep ``name`` as a spare if emptying its rows makes it the template again; else drop it."""
    import psycopg

    with pg_admin() as admin:
        if _clean(template, name):
            # Under a new name: what a process keeps by database URL (an engine, a warning given
            # once) must not carry over to the next test, as with a new database.
            renamed = _new_name()
            try:
                admin.execute(f'ALTER DATABASE "{name}" RENAME TO "{renamed}"')
            except psycopg.Error:
                pass
            else:
                _spares[template].append(renamed)
                return
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _clean(template: str, name: str) -> bool:
    import psycopg

    try:
        with _connect(name) as connection:
            others = connection.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()[0]
            if others or _fingerprint(connection) != _fingerprints.get(template):
                return False
            tables = _emptied_tables(connection)
            with connection.transaction():
                # The append-only triggers refuse TRUNCATE; in replica mode no ordinary trigger fires.
                connection.execute("SET LOCAL session_replication_role = replica")
                connection.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
                for table, rows in _seeds[template].items():
                    marks = ", ".join(["%s"] * len(rows[0]))
                    connection.cursor().executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
            return True
    except psycopg.Error:
        return False


def drop_spares() -> None:
    """At the end of the process: drop every spare it kept."""
    names = [name for spares in _spares.values() for name in spares]
    _spares.clear()
    if not names:
        return
    with pg_admin() as admin:
        for name in names:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
