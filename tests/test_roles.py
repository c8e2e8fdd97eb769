"""`credex db roles` (Postgres): each process connects with a role that can run its own commands
and is refused everything else; nobody can UPDATE or DELETE a ledger entry. The roles are
cluster-wide and other tests create them at the same moment in other databases: every run here
tolerates that. A test connects "as" a role with libpq's ``options=-c role=…`` (a SET ROLE at
connection time): the privileges checked are the role's alone."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import make_postgres_database
from tests.invariants import check_invariants
from tests.pipeline import Pipeline
from tests.sandbox import running_sandbox
from tests.support import Outcome, a_role_without_privileges, credex_command, run_process, subprocess_env

pytestmark = pytest.mark.postgres

ROLES = ("credex_support", "credex_relay", "credex_warehouse", "credex_auditor")


@pytest.fixture
def pg(request: pytest.FixtureRequest) -> Iterator[str]:
    url, drop = make_postgres_database(request.getfixturevalue("postgres_template"))
    try:
        yield url
    finally:
        drop()


def as_role(url: str, role: str) -> str:
    return (
        make_url(url).update_query_dict({"options": f"-c role={role}"}).render_as_string(hide_password=False)
    )


def cli(url: str, *args: object, input: str | None = None) -> Outcome:
    from typer.testing import CliRunner

    from credex.cli import app

    result = CliRunner().invoke(
        app, ["--database-url", url, *map(str, args)], input=input, catch_exceptions=False
    )
    return Outcome(result.exit_code, result.stdout, result.stderr)


def ok(outcome: Outcome) -> Outcome:
    assert outcome.exit_code == 0, outcome.stderr
    return outcome


def privileges(url: str, role: str, table: str) -> set[str]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        return {
            p
            for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE")
            if connection.execute("SELECT has_table_privilege(%s, %s, %s)", (role, table, p)).fetchone()[0]
        }


def role_exists(url: str, role: str) -> bool:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        return connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def attempt(url: str, role: str, statement: str) -> str | None:
    """Run ``statement`` as ``role`` (rolled back); the SQLSTATE it was refused with, or None."""
    import psycopg

    with psycopg.connect(url, options=f"-c role={role}") as connection:
        try:
            connection.execute(statement)
        except psycopg.Error as error:
            return error.sqlstate
        finally:
            connection.rollback()
    return None


def test_roles_are_postgres_only(tmp_path):
    done = cli(f"sqlite:///{tmp_path / 'shop.db'}", "db", "roles", "--json")
    assert done.exit_code == 2
    error = json.loads(done.stderr)["error"]
    assert error["code"] == "unsupported" and "needs PostgreSQL" in error["message"]
    assert not (tmp_path / "shop.db").exists()


def test_print_sql_shows_the_statements_and_grants_nothing(pg):
    done = ok(cli(pg, "db", "roles", "--print-sql"))
    assert "GRANT UPDATE (stock, updated_at) ON TABLE" in done.stdout
    assert (
        'GRANT SELECT, INSERT, UPDATE ON TABLE "public"."shipment_request" TO credex_warehouse;'
        in done.stdout
    )
    for role in ROLES:
        assert f"CREATE ROLE {role} NOLOGIN" in done.stdout
        # Roles belong to the server: another test's database may have created them already
        # (with no grant in this fresh one), or none has yet (a fresh server) and none is made.
        if role_exists(pg, role):
            assert privileges(pg, role, "redemption") == set()
    assert "UPDATE" not in {
        line.split(" ON ")[0] for line in done.stdout.splitlines() if "ledger_entry" in line
    }


def test_concurrent_refreshes_in_two_databases_and_a_repeat_all_succeed(pg, request):
    other, drop = make_postgres_database(request.getfixturevalue("postgres_template"))
    try:
        runs = [
            subprocess.Popen(
                credex_command("--database-url", url, "db", "roles", "--json"),
                env=subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for url in (pg, other, pg, other)
        ]
        outcomes = [(run.wait(timeout=60), *run.communicate()) for run in runs]
        assert [code for code, _, _ in outcomes] == [0, 0, 0, 0], [err for _, _, err in outcomes]
        for url in (pg, other):
            assert privileges(url, "credex_relay", "outbox_message") == {
                "SELECT",
                "INSERT",
                "UPDATE",
                "DELETE",
            }
            assert privileges(url, "credex_auditor", "ledger_entry") == {"SELECT"}
    finally:
        drop()

    # A privilege granted by hand is taken back by the next refresh; the statements do not change.
    import psycopg

    with psycopg.connect(pg, autocommit=True) as connection:
        connection.execute("GRANT DELETE ON account TO credex_relay")
    first = ok(cli(pg, "db", "roles", "--json")).json()["sql"]
    assert "DELETE" not in privileges(pg, "credex_relay", "account")
    assert ok(cli(pg, "db", "roles", "--json")).json()["sql"] == first


# What each role must not do, as statements; each is refused with "insufficient privilege".
REFUSED = {
    "credex_relay": [
        "UPDATE catalog_item SET name = 'Cheap'",
        "UPDATE catalog_item SET points = 1",
        "INSERT INTO catalog_item (sku, name, points, active, created_at, updated_at) "
        "VALUES ('FREE', 'Free', 1, true, now(), now())",
        "DELETE FROM account",
        "SELECT count(*) FROM shipment_request",
        "UPDATE shipment_request SET express_no = NULL",
        "DELETE FROM shipment_request",
    ],
    "credex_warehouse": [
        "SELECT count(*) FROM account",
        "SELECT count(*) FROM ledger_entry",
        "SELECT count(*) FROM redemption",
        "SELECT count(*) FROM outbox_message",
        "SELECT count(*) FROM catalog_item",
        "UPDATE account SET balance = 0",
        "INSERT INTO ledger_entry (user_id, kind, ref, points, balance, operator, created_at) "
        "VALUES ('u1', 'grant', 'x', 1, 1, 'me', now())",
    ],
    "credex_auditor": [
        "INSERT INTO account (user_id, balance, earned, redeemed, created_at, updated_at) "
        "VALUES ('x', 0, 0, 0, now(), now())",
        "UPDATE account SET balance = balance",
        "DELETE FROM outbox_message",
        "UPDATE catalog_item SET stock = 0",
        "UPDATE shipment_request SET express_no = NULL",
    ],
    "credex_support": [
        "DELETE FROM account",
        "DELETE FROM redemption",
        "SELECT count(*) FROM shipment_request",
        "TRUNCATE outbox_message",
    ],
}
# Allowed, to show the lines are drawn at the column: the relay gives stock back on a refund.
ALLOWED = {
    "credex_relay": ["UPDATE catalog_item SET stock = stock", "SELECT count(*) FROM redemption"],
    "credex_auditor": [f"SELECT count(*) FROM {t}" for t in ("account", "ledger_entry", "shipment_request")],
    "credex_warehouse": ["SELECT count(*) FROM shipment_request"],
}
LEDGER_CHANGES = [
    "UPDATE ledger_entry SET points = points + 1",
    "DELETE FROM ledger_entry",
    "TRUNCATE ledger_entry CASCADE",
]


def test_each_role_is_refused_what_it_must_not_do_and_nobody_edits_the_ledger(pg):
    ok(cli(pg, "db", "roles"))
    ok(cli(pg, "catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "5"))
    ok(cli(pg, "award", "grant", "u1", "100", "--reason", "welcome", "--ref", "w-1"))
    ok(cli(pg, "redeem", "create", "u1", "MUG", "--address", "1 High St"))
    for role, statements in REFUSED.items():
        for statement in statements + LEDGER_CHANGES:
            assert attempt(pg, role, statement) == "42501", f"{role} may {statement}"
    for role, statements in ALLOWED.items():
        for statement in statements:
            assert attempt(pg, role, statement) is None, f"{role} may not {statement}"
    # The owner is refused by the trigger instead.
    for statement in LEDGER_CHANGES:
        assert attempt(pg, "postgres", statement) == "CX001"

    # A command run with the wrong role says so in one line, exit 1, and changes nothing.
    wrong = [
        ("credex_relay", ("catalog", "update", "MUG", "--points", "1")),
        ("credex_relay", ("catalog", "add", "FREE", "--name", "Free", "--points", "1")),
        ("credex_warehouse", ("account", "show", "u1")),
        ("credex_auditor", ("award", "grant", "u1", "5", "--reason", "more")),
        ("credex_support", ("warehouse", "list")),
    ]
    for role, command in wrong:
        done = cli(as_role(pg, role), *command, "--json")
        assert done.exit_code == 1, (role, command, done.stderr)
        error = json.loads(done.stderr)["error"]
        assert error["code"] == "permission_denied" and "permission denied for table" in error["message"]
    # award bulk writes through the driver's own cursor: refused the same way (it was exit 70).
    for role, what in (("credex_auditor", "table account"), ("credex_relay", "sequence point_lot_id_seq")):
        done = cli(
            as_role(pg, role),
            "award",
            "bulk",
            "-",
            "--format",
            "csv",
            "--json",
            input="user_id,points,ref\nu1,5,b-1\n",
        )
        assert done.exit_code == 1, (role, done.stderr)
        error = json.loads(done.stderr)["error"]
        assert error["code"] == "permission_denied" and f"permission denied for {what}" in error["message"]
    shown = ok(cli(pg, "catalog", "list", "--json")).json()
    assert [(i["sku"], i["points"], i["stock"]) for i in shown] == [("MUG", 10, 4)]
    assert ok(cli(pg, "account", "show", "u1", "--json")).json()["balance"] == 90
    check_invariants(pg, stocks={"MUG": 5})


def _owners_view(url: str) -> dict:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        return {
            table: connection.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("alembic_version", "account", "ledger_entry", "catalog_item", "outbox_message")
        }


def test_a_role_granted_nothing_is_told_so_and_not_sent_to_db_upgrade(pg):
    """It could not read alembic_version: that was taken for "no schema" (exit 1, not_migrated,
    "run `credex db upgrade`"), and `db upgrade` then failed as a server out of reach (exit 69)."""
    ok(cli(pg, "catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "5"))
    ok(cli(pg, "award", "grant", "u1", "100", "--reason", "welcome", "--ref", "w-1"))
    before = _owners_view(pg)
    with a_role_without_privileges(pg) as url:
        for command in (
            ("account", "show", "u1"),
            ("catalog", "list"),
            ("award", "grant", "u1", "5", "--reason", "more"),
            ("redeem", "create", "u1", "MUG", "--address", "1 High St"),
            ("relay", "status"),
            ("audit", "verify"),
            ("db", "roles"),
            ("db", "upgrade"),
        ):
            done = cli(url, *command, "--json")
            assert done.exit_code == 1, (command, done.stderr)
            assert done.stdout == "" and done.stderr.count("\n") == 1
            error = json.loads(done.stderr)["error"]
            assert error["code"] == "permission_denied", (command, error)
            assert "permission denied for table alembic_version" in error["message"], error
            hint = "as the role that owns the schema" if command == ("db", "upgrade") else "`credex db roles`"
            assert hint in error["message"], error
        plain = cli(url, "award", "grant", "u1", "5", "--reason", "more")
        assert plain.exit_code == 1 and plain.stderr.startswith("error: refused by the database: permission")
    assert _owners_view(pg) == before


@pytest.mark.rabbitmq
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_each_process_runs_its_commands_with_its_own_role(pg, rabbit, tmp_path):
    ok(cli(pg, "db", "roles"))
    support, relay, warehouse, auditor = (as_role(pg, role) for role in ROLES)

    ok(cli(support, "catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "9"))
    ok(cli(support, "catalog", "update", "MUG", "--stock", "8"))
    ok(cli(support, "award", "grant", "u1", "100", "--reason", "welcome", "--ref", "w-1"))
    ok(cli(support, "award", "purchase", "u2", "--order", "o-1", "--amount", "50"))
    # Three batches, in a process of its own: the second and third are written by the writer
    # processes it forks, each connecting as the run does (the same role).
    grants = tmp_path / "grants.csv"
    grants.write_text("user_id,points,ref\n" + "".join(f"u{3 + n % 4},{n + 1},b-{n}\n" for n in range(25)))
    bulk = ok(
        run_process(
            "--database-url", support, "award", "bulk", grants, "--json", "--batch-size", 10, "--jobs", 2
        )
    )
    assert bulk.json()["applied"] == 25
    u3 = ok(cli(support, "account", "show", "u3", "--json")).json()
    assert u3["balance"] == sum(n + 1 for n in range(25) if n % 4 == 0)
    ids = [
        ok(cli(support, "redeem", "create", user, "MUG", "--address", "1 High St", "--json")).json()[
            "redemption_id"
        ]
        for user in ("u1", "u2")
    ]
    ok(cli(support, "account", "history", "u1"))
    ok(cli(support, "redeem", "list", "--json"))
    ok(cli(support, "award", "refund", "u2", "--order", "o-1", "--refund", "rf-1", "--amount", "10"))
    ok(cli(support, "award", "settle"))
    ok(cli(support, "award", "expire"))

    with running_sandbox() as sandbox:
        pipeline = Pipeline(pg, rabbit, sandbox, tmp_path)
        try:

            def run(url: str, *command: str) -> subprocess.CompletedProcess:
                done = pipeline.run("--database-url", url, *command)
                assert done.returncode == 0, f"{command}: {done.stderr}"
                return done

            assert json.loads(run(relay, "relay", "run", "--once", "--json").stdout)["published"] == 2
            assert json.loads(run(warehouse, "warehouse", "run", "--once", "--json").stdout)["waybills"] == 2
            assert json.loads(run(relay, "relay", "run", "--once", "--json").stdout)["confirmed"] == 2
            run(relay, "relay", "status")
            run(relay, "relay", "retry", "--dead")
            run(relay, "relay", "list", "--state", "confirmed")
            run(relay, "relay", "purge", "--confirmed-before", "30d")
            run(warehouse, "warehouse", "list")
            tracked = json.loads(run(support, "track", str(ids[0]), "--json").stdout)
            assert tracked["status"] == "info_received"
        finally:
            pipeline.close()

    verified = cli(auditor, "audit", "verify", "--json")
    assert verified.exit_code == 0, verified.stdout + verified.stderr
    assert verified.json()["checked"]["redemptions_with_shipments"] == 2
    check_invariants(pg, stocks={"MUG": 8}, shipped=True)
