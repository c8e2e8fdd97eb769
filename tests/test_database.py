"""The database: created on first use, migrated by `db upgrade`, and failures that say what to do.

(Over 400 lines on purpose: every way a database can be missing, old, locked or unreachable,
side by side, sharing their fixtures.)
"""

import json
import sqlite3
import uuid

import pytest

from tests.support import pg_admin, pg_url, run_process, subprocess_env


def test_the_schema_revision_constant_matches_the_migrations():
    from credex.db import HEAD_REVISION
    from credex.db.migrate import head_revision

    assert head_revision() == HEAD_REVISION


def test_sqlite_is_created_on_first_use_in_wal_mode(tmp_path):
    path = tmp_path / "fresh" / "points.db"
    path.parent.mkdir()
    result = run_process("--database-url", f"sqlite:///{path}", "catalog", "list", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == []
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_the_default_database_is_credex_db_in_the_current_directory(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "credex", "award", "grant", "u1", "5", "--reason", "r", "--json"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "credex.db").exists()


def test_db_upgrade_is_idempotent(db_url, credex):
    first = credex("db", "upgrade", "--json")
    again = credex("db", "upgrade", "--json")
    assert first.exit_code == 0 and again.exit_code == 0
    assert again.json()["from"] == again.json()["to"]


@pytest.fixture
def empty_postgres(postgres_template):
    name = f"credex_empty_{uuid.uuid4().hex[:10]}"
    with pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield pg_url(name)
    from credex.db.engine import dispose_engines

    dispose_engines()
    with pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_an_unmigrated_postgres_is_refused_until_db_upgrade(empty_postgres):
    refused = run_process("--database-url", empty_postgres, "account", "show", "u1", "--json")
    assert refused.exit_code == 1
    error = json.loads(refused.stderr)["error"]
    assert error["code"] == "not_migrated" and "credex db upgrade" in error["message"]

    upgraded = run_process("--database-url", empty_postgres, "db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.stderr
    granted = run_process(
        "--database-url", empty_postgres, "award", "grant", "u1", "7", "--reason", "r", "--json"
    )
    assert granted.exit_code == 0 and json.loads(granted.stdout)["balance"] == 7


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://credex:s3cr3t-pw@127.0.0.1:1/points",  # nothing listens on port 1
        "postgresql://credex:s3cr3t-pw@db.invalid:5432/points",  # no such host
    ],
)
def test_an_unreachable_database_exits_69_without_the_password(url):
    # No wall-clock bound of our own: a DNS lookup has no timeout credex could promise; a hang
    # fails through run_process's timeout (and pytest-timeout's) with a stack.
    result = run_process("--database-url", url, "account", "show", "u1")
    assert result.exit_code == 69
    assert "s3cr3t-pw" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cannot use the database postgresql")
    assert result.stderr.count("\n") == 1


def test_the_password_is_hidden_when_given_through_the_environment():
    env = subprocess_env(CREDEX_DATABASE_URL="postgresql://credex:an0ther-pw@127.0.0.1:1/points")
    result = run_process("redeem", "list", "--json", env=env)
    assert result.exit_code == 69
    assert json.loads(result.stderr)["error"]["code"] == "unavailable"
    assert "an0ther-pw" not in result.stdout + result.stderr


def test_an_unsupported_database_url_is_bad_usage():
    result = run_process("--database-url", "mysql://root:pw@localhost/x", "catalog", "list")
    assert result.exit_code == 2
    assert "unsupported database" in result.stderr and "pw@" not in result.stderr


# --- a schema credex does not know ------------------------------------------------------------


def _set_revision(url: str, revision: str) -> None:
    from sqlalchemy import text

    from credex.db.engine import dispose_engines, get_engine

    with get_engine(url).begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    dispose_engines()  # forget that this process found the schema current


def _everything(url: str) -> dict:
    from sqlalchemy import text

    from credex.db.engine import get_engine

    tables = ("account", "ledger_entry", "point_lot", "catalog_item", "redemption", "outbox_message")
    with get_engine(url).connect() as connection:
        found = {t: connection.execute(text(f"SELECT * FROM {t} ORDER BY 1")).all() for t in tables}
        found["revision"] = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    return found


@pytest.fixture
def shop_at_unknown_revision(db_url, credex):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "5")
    credex("award", "grant", "u1", "100", "--reason", "opening", "--ref", "open-u1")
    credex("redeem", "create", "u1", "MUG", "--address", "1 High St")
    _set_revision(db_url, "9999")  # a newer credex migrated it, or someone stamped it by hand
    return _everything(db_url)


ORDINARY_COMMANDS = [
    ("account", "show", "u1"),
    ("award", "grant", "u1", "5", "--reason", "r", "--ref", "g-9999"),
    ("award", "purchase", "u2", "--order", "o-1", "--amount", "30"),
    ("catalog", "add", "CAP", "--name", "Cap", "--points", "3"),
    ("redeem", "create", "u1", "MUG", "--address", "1 High St"),
    ("relay", "status"),
    ("award", "settle"),
]


@pytest.mark.breaks_invariants
@pytest.mark.parametrize("command", ORDINARY_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_table_renamed_by_hand_is_a_schema_mismatch_not_an_internal_error(db_url, credex, command):
    from sqlalchemy import text

    from credex.db.engine import dispose_engines, get_engine

    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "5")
    credex("award", "grant", "u1", "100", "--reason", "opening", "--ref", "open-u1")
    tables = {
        "catalog": "catalog_item",
        "relay": "outbox_message",
        "redeem": "redemption",
        "settle": "point_lot",
    }
    table = tables.get(command[1] if command[1] == "settle" else command[0], "account")
    with get_engine(db_url).begin() as connection:
        connection.execute(text(f"ALTER TABLE {table} RENAME TO {table}_gone"))
    dispose_engines()
    done = credex(*command, "--json")
    assert done.exit_code == 1, done.stderr
    error = json.loads(done.stderr)["error"]
    assert error["code"] == "schema_mismatch" and table in error["message"], error


@pytest.mark.parametrize("command", ORDINARY_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_database_at_an_unknown_revision_is_refused_by_every_command_and_left_alone(
    db_url, credex, shop_at_unknown_revision, command
):
    result = credex(*command, "--json")
    assert result.exit_code == 1, result.stderr
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "not_migrated" and "9999" in error["message"], error
    assert result.stdout == ""
    assert _everything(db_url) == shop_at_unknown_revision


def test_db_upgrade_refuses_a_revision_it_does_not_know_and_changes_nothing(
    db_url, credex, shop_at_unknown_revision
):
    result = credex("db", "upgrade", "--json")
    assert result.exit_code == 1, result.stderr
    assert "9999" in json.loads(result.stderr)["error"]["message"]
    assert _everything(db_url) == shop_at_unknown_revision


# --- an old file, upgraded by whatever command comes first --------------------------------------


def fill_sqlite_at_0001(path) -> None:
    """What credex 0001 left: two shoppers, a gift, a redemption with its ledger entry and its
    outbox message, written as that version wrote them."""
    created = "2024-03-01 12:00:00.000000"
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO account (user_id, balance, earned, redeemed, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [("u1", 60, 100, 40, created, created), ("u2", 25, 25, 0, created, created)],
        )
        db.execute(
            "INSERT INTO catalog_item (sku, name, points, stock, active, created_at, updated_at) "
            "VALUES ('MUG', 'Mug', 40, 9, 1, ?, ?)",
            (created, created),
        )
        db.executemany(
            "INSERT INTO ledger_entry (id, user_id, kind, ref, points, balance, detail, operator, reason, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'old-admin', ?, ?)",
            [
                (1, "u1", "purchase", "o-1", 100, 100, "amount=100", "order o-1", created),
                (2, "u2", "review", "rv-1", 25, 25, "photos=no", "review rv-1", created),
                (3, "u1", "redemption", "1", -40, 60, "MUG x1", "redemption 1: 1 x MUG", created),
            ],
        )
        message_id = "6f1c2f7e-0000-4000-8000-000000000001"
        db.execute(
            "INSERT INTO redemption (id, request_id, user_id, sku, quantity, points, balance, address, "
            "status, message_id, operator, created_at, updated_at) "
            "VALUES (1, 'web-1', 'u1', 'MUG', 1, 40, 60, '1 High St', 'pending', ?, 'old-admin', ?, ?)",
            (message_id, created, created),
        )
        body = {
            "message_id": message_id,
            "redemption_id": 1,
            "user_id": "u1",
            "sku": "MUG",
            "quantity": 1,
            "points": 40,
            "address": "1 High St",
            "created_at": "2024-03-01T12:00:00+00:00",
        }
        db.execute(
            "INSERT INTO outbox_message (id, redemption_id, routing_key, body, state, attempts, "
            "next_attempt_at, created_at) VALUES (?, 1, 'redemption.created', ?, 'pending', 0, ?, ?)",
            (message_id, json.dumps(body), created, created),
        )


def test_an_old_sqlite_file_is_upgraded_by_the_first_ordinary_command_and_keeps_every_rule(tmp_path):
    from credex.db import HEAD_REVISION
    from credex.db.engine import dispose_engines
    from tests.invariants import check_invariants
    from tests.test_migration_lifecycle import migrate

    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    migrate(url, "0001")
    dispose_engines()
    fill_sqlite_at_0001(path)

    shown = run_process("--database-url", url, "account", "show", "u1", "--json")
    assert shown.exit_code == 0, shown.stderr
    assert {k: json.loads(shown.stdout)[k] for k in ("balance", "earned", "redeemed", "pending", "debt")} == {
        "balance": 60,
        "earned": 100,
        "redeemed": 40,
        "pending": 0,
        "debt": 0,
    }
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD_REVISION,)]
    check_invariants(url, stocks={"MUG": 10}, legacy_upto=3)

    # The upgraded file lives on: the old request id is still a repeat, new points join the old.
    again = run_process(
        "--database-url", url, "redeem", "create", "u1", "MUG", "--address", "1 High St",
        "--request-id", "web-1", "--json",
    )  # fmt: skip
    assert again.exit_code == 0 and json.loads(again.stdout)["duplicate"] is True, again.stderr
    assert run_process("--database-url", url, "award", "grant", "u1", "30", "--reason", "r").exit_code == 0
    spent = run_process("--database-url", url, "redeem", "create", "u1", "MUG", "--address", "x", "--json")
    assert spent.exit_code == 0 and json.loads(spent.stdout)["balance"] == 50, spent.stderr
    check_invariants(url, stocks={"MUG": 10}, legacy_upto=3)


# --- processes that all start on a fresh database -----------------------------------------------


def _start(*args: object, env: dict | None = None):
    import subprocess

    from tests.support import credex_command

    return subprocess.Popen(
        credex_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or subprocess_env(),
    )


def _finish(processes, timeout: float = 120) -> list[tuple[int, str, str]]:
    """Every process's (exit code, stdout, stderr); all of them killed if one hangs."""
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
    return results


@pytest.mark.timeout(300)
def test_processes_starting_together_on_a_fresh_sqlite_file_migrate_it_once(tmp_path):
    from credex.db import HEAD_REVISION
    from tests.invariants import check_invariants

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    grants = [
        _start("--database-url", url, "award", "grant", "u1", str(n), "--reason", "r", "--ref", f"g-{n}")
        for n in range(1, 5)
    ]
    for code, _out, err in _finish(grants):
        assert code == 0, err
    with sqlite3.connect(tmp_path / "fresh.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD_REVISION,)]
        assert db.execute("SELECT balance FROM account").fetchall() == [(1 + 2 + 3 + 4,)]
    check_invariants(url)


@pytest.mark.timeout(300)
def test_db_upgrade_run_by_several_processes_at_once_on_an_empty_postgres(empty_postgres):
    from sqlalchemy import text

    from credex.db import HEAD_REVISION
    from credex.db.engine import get_engine
    from tests.invariants import check_invariants

    upgrades = [_start("--database-url", empty_postgres, "db", "upgrade", "--json") for _ in range(3)]
    outcomes = _finish(upgrades)
    for code, out, err in outcomes:
        assert code == 0, err
        assert json.loads(out)["to"] == HEAD_REVISION
    # Each says what it found once it held the lock: one migrated an empty database, the
    # others found it done.
    found = sorted((json.loads(out)["from"] or "") for _code, out, _err in outcomes)
    assert found == ["", HEAD_REVISION, HEAD_REVISION], found
    with get_engine(empty_postgres).connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).all() == [(HEAD_REVISION,)]
    granted = run_process("--database-url", empty_postgres, "award", "grant", "u1", "7", "--reason", "r")
    assert granted.exit_code == 0, granted.stderr
    check_invariants(empty_postgres)


# --- a database another program holds locked ----------------------------------------------------

WRITES = [
    ("award", "grant", "u1", "5", "--reason", "r", "--ref", "g-locked"),
    ("redeem", "create", "u1", "MUG", "--address", "1 High St"),
    ("catalog", "update", "MUG", "--stock", "3"),
    ("award", "settle"),
]


@pytest.mark.parametrize("command", WRITES, ids=lambda c: " ".join(c[:2]))
def test_a_sqlite_file_locked_by_another_program_is_exit_69_and_nothing_changes(
    tmp_path, monkeypatch, command
):
    from typer.testing import CliRunner

    from credex.cli import app
    from credex.db import engine

    path = tmp_path / "locked.db"
    url = f"sqlite:///{path}"

    def credex(*args: str):
        return CliRunner().invoke(app, ["--database-url", url, *args], catch_exceptions=False)

    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10").exit_code == 0
    assert credex("award", "grant", "u1", "100", "--reason", "opening").exit_code == 0
    before = _everything(url)
    # credex waits 30 s for a lock unless told otherwise: a test must not wait that long.
    monkeypatch.setenv("CREDEX_SQLITE_BUSY_TIMEOUT", "0.3")
    engine.dispose_engines()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # what a backup tool or a stuck script does
        result = credex(*command, "--json")
    finally:
        holder.rollback()
        holder.close()
    assert result.exit_code == 69, result.stderr
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "unavailable" and "database is locked" in error["message"], error
    assert result.stdout == ""
    engine.dispose_engines()
    assert _everything(url) == before


# --- URLs, files and settings a user gets wrong: a code and one line, never exit 70 -----------


@pytest.fixture
def credex_at():
    """credex in-process against any URL; engines are forgotten afterwards."""
    from typer.testing import CliRunner

    from credex.cli import app
    from credex.db.engine import dispose_engines

    def run(url: str, *args: str):
        from tests.support import Outcome

        dispose_engines()
        result = CliRunner().invoke(app, ["--database-url", url, *args], catch_exceptions=False)
        return Outcome(result.exit_code, result.stdout, result.stderr)

    yield run
    dispose_engines()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("postgresql+asyncpg://credex:s3cr3t-pw@127.0.0.1/points", "unsupported database driver"),
        ("postgresql+psycopg2://credex:s3cr3t-pw@127.0.0.1/points", "unsupported database driver"),
        ("sqlite://somehost/points.db", "Invalid SQLite URL"),
        ("sqlite+foo:///points.db", "unsupported database driver"),
        ("http://example.com/points", "unsupported database"),
        (":::", "not a database URL"),
        ("sqlite://", "in-memory SQLite database keeps nothing"),  # was exit 0: nothing kept
        ("sqlite:///", "in-memory SQLite database keeps nothing"),
        ("sqlite:///:memory:", "in-memory SQLite database keeps nothing"),
        # An "@" in the password: the driver was given "pw@127.0.0.1" for the host, and said so.
        ("postgresql://credex:s3cr3t-pw@s3cr3t-pw@127.0.0.1:5432/points", "write it as %40"),
        ("postgresql://credex@127.0.0.1:99999/points", "port must be 1 to 65535, got 99999"),  # was 69
        ("postgresql://credex@127.0.0.1:0/points", "port must be 1 to 65535, got 0"),
        # libpq refuses these only when connecting: exit 69, and a worker retrying them for ever.
        (
            "postgresql://credex:s3cr3t-pw@127.0.0.1/points?sslmod=require",
            "option libpq does not know: 'sslmod'",
        ),
        ("postgresql://credex:s3cr3t-pw@127.0.0.1/points?sslmode=bogus", "sslmode must be one of"),
        # Ignored by the driver with a warning: a "read-only" URL that wrote all the same.
        ("sqlite:///points.db?mode=ro", "take effect only in SQLite's URI form"),
        # SQLite's URI form naming memory: migrated, then nothing kept (was exit 1, unknown_user).
        ("sqlite:///file::memory:?uri=true", "in-memory SQLite database keeps nothing"),
        ("sqlite:///file:points.db?mode=memory&uri=true", "in-memory SQLite database keeps nothing"),
    ],
)
def test_a_database_url_credex_cannot_use_is_bad_usage_in_one_line(credex_at, url, words):
    result = credex_at(url, "account", "show", "u1", "--json")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "invalid_input" and words in error["message"], error
    assert "s3cr3t-pw" not in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///shop\x00.db",
        "postgresql://credex:s3cr3t-pw@127.0.0.1:5432/po\x00ints",
        "sqlite:///\ud800.db",
    ],
)
def test_a_database_url_holding_nul_or_a_surrogate_is_bad_usage(credex_at, url):
    result = credex_at(url, "account", "show", "u1", "--json")
    assert result.exit_code == 2, result.stderr
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "invalid_input" and "printable" in error["message"], error
    assert "s3cr3t-pw" not in result.stderr


def _files(directory) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


@pytest.mark.parametrize(
    ("written", "words"),
    [
        # The driver appended the options to the name: a new file "shop.db?mode=ro", migrated and
        # written, where a read-only look at shop.db was meant.
        (
            "sqlite:///{path}?mode=ro&uri=true",
            "with uri=true the SQLite database must be written as file:PATH",
        ),
        ("sqlite:///{path}?uri=true", "with uri=true the SQLite database must be written as file:PATH"),
        # A new, empty "shop.db " (or "shop.db\xa0"): the points seemed gone.
        ("sqlite:///{path} ", "begins or ends with white space"),
        ("sqlite:///{path}\u00a0", "begins or ends with white space"),
        (" sqlite:///{path}", "begins or ends with white space"),
    ],
    ids=["uri-without-file", "uri-alone", "trailing-space", "trailing-nbsp", "leading-space"],
)
def test_a_sqlite_url_that_would_name_another_file_is_bad_usage_and_creates_nothing(
    tmp_path, credex_at, written, words
):
    path = tmp_path / "shop.db"
    assert credex_at(f"sqlite:///{path}", "award", "grant", "u1", "5", "--reason", "r").exit_code == 0
    from credex.db.engine import dispose_engines

    dispose_engines()
    before = _everything(f"sqlite:///{path}")
    dispose_engines()
    files = _files(tmp_path)
    url = written.format(path=path)
    for command in (("award", "grant", "u1", "5", "--reason", "r"), ("account", "show", "u1")):
        result = credex_at(url, *command, "--json")
        assert result.exit_code == 2, (command, result.stdout, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stdout == ""
        error = json.loads(result.stderr)["error"]
        assert error["code"] == "invalid_input" and words in error["message"], error
    dispose_engines()
    assert _files(tmp_path) == files  # no file of another name
    assert _everything(f"sqlite:///{path}") == before
    # Written as SQLite's URI form, the same options do what they say.
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    assert json.loads(credex_at(read_only, "account", "show", "u1", "--json").stdout)["balance"] == 5


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("edge", ["trailing", "leading"])
def test_a_postgres_url_with_white_space_at_an_end_is_bad_usage_not_a_server_away(db_url, credex_at, edge):
    """Was exit 69 (no database "credex_t_… "): a worker would retry it for ever."""
    url = f"{db_url} " if edge == "trailing" else f" {db_url}"
    result = credex_at(url, "catalog", "list", "--json")
    assert result.exit_code == 2, result.stderr
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "invalid_input" and "begins or ends with white space" in error["message"]
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("journal", ["wal", "delete"])  # delete: a file copied from elsewhere
def test_a_read_only_sqlite_file_is_read_and_a_write_is_exit_69_changing_nothing(
    tmp_path, credex_at, journal
):
    path = tmp_path / "shop.db"
    assert credex_at(f"sqlite:///{path}", "award", "grant", "u1", "5", "--reason", "r").exit_code == 0
    from credex.db.engine import dispose_engines

    dispose_engines()
    with sqlite3.connect(path) as db:
        assert db.execute(f"PRAGMA journal_mode = {journal}").fetchone() == (journal,)
    before = _everything(f"sqlite:///{path}")
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"  # what a read-only mount gives, even to root
    shown = credex_at(read_only, "account", "show", "u1", "--json")
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout)["balance"] == 5
    refused = credex_at(read_only, "award", "grant", "u1", "5", "--reason", "r", "--json")
    assert refused.exit_code == 69, refused.stderr
    error = json.loads(refused.stderr)["error"]
    assert error["code"] == "unavailable" and "readonly" in error["message"], error
    assert "INSERT" not in error["message"] and refused.stderr.count("\n") == 1
    assert _everything(f"sqlite:///{path}") == before


def test_a_file_that_is_not_a_database_is_exit_69(tmp_path, credex_at):
    path = tmp_path / "notes.db"
    path.write_text("not a database\n" * 100)
    result = credex_at(f"sqlite:///{path}", "account", "show", "u1")
    assert result.exit_code == 69, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CREDEX_REVIEW_POINTS", "ten"),
        ("CREDEX_REVIEW_POINTS", "-5"),
        ("CREDEX_PURCHASE_RATE", "NaN"),
        ("CREDEX_PURCHASE_RATE", "inf"),
        ("CREDEX_PURCHASE_RATE", "１"),  # full-width: numbers are ASCII
        ("CREDEX_PURCHASE_RATE", "1000001"),
        ("CREDEX_PURCHASE_RATE", "0.1234567"),
        ("CREDEX_EXPIRY_DAYS", "1e3"),
        ("CREDEX_SQLITE_BUSY_TIMEOUT", "soon"),
        # Underscores, an exponent, infinity: Python's int() and float() take them, cli.md does not.
        ("CREDEX_REVIEW_POINTS", "1_0"),
        ("CREDEX_PENDING_DAYS", "１４"),
        ("CREDEX_PURCHASE_RATE", "1_0"),
        ("CREDEX_SQLITE_BUSY_TIMEOUT", "1e1"),
        ("CREDEX_SQLITE_BUSY_TIMEOUT", "inf"),
        ("CREDEX_SQLITE_BUSY_TIMEOUT", "3_0"),
        ("CREDEX_AMQP_PUBLISH_TIMEOUT", "0"),
        ("CREDEX_AMQP_PUBLISH_TIMEOUT", "inf"),
    ],
)
def test_a_setting_with_a_bad_value_is_bad_usage_naming_it(tmp_path, credex_at, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    path = tmp_path / "shop.db"
    result = credex_at(f"sqlite:///{path}", "award", "review", "u1", "--review", "r1", "--json")
    assert result.exit_code == 2, result.stderr
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "invalid_input" and name in error["message"], error
    assert not path.exists() or _everything(f"sqlite:///{path}")["account"] == []


def test_the_publish_timeout_setting_defaults_to_what_a_broker_made_without_settings_waits():
    from credex.amqp.connection import RPC_TIMEOUT_S
    from credex.config import Settings

    assert Settings.model_fields["amqp_publish_timeout"].default == RPC_TIMEOUT_S


@pytest.mark.parametrize("rate", ["1e999999", "1e999999999"])
def test_a_purchase_rate_beyond_any_arithmetic_is_bad_usage_not_an_internal_error(
    tmp_path, credex_at, monkeypatch, rate
):
    """It was exit 70 (decimal.Overflow) at the first purchase."""
    monkeypatch.setenv("CREDEX_PURCHASE_RATE", rate)
    path = tmp_path / "shop.db"
    result = credex_at(
        f"sqlite:///{path}", "award", "purchase", "u1", "--order", "o1", "--amount", "10", "--json"
    )
    assert result.exit_code == 2, result.stderr
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "invalid_input" and "CREDEX_PURCHASE_RATE" in error["message"], error
    assert not path.exists() or _everything(f"sqlite:///{path}")["account"] == []


@pytest.mark.postgres
def test_a_value_postgres_refuses_is_bad_input_without_the_sql(db_url, backend):
    """Behind the input rules: should a value reach Postgres that it refuses (too long, NUL),
    the error is bad input (exit 2) that names neither the SQL nor the values."""
    from sqlalchemy import insert
    from sqlalchemy.exc import DBAPIError

    from credex.db import tables
    from credex.db.engine import get_engine
    from credex.db.failures import translate_db_error
    from credex.db.models import utcnow

    if backend != "postgres":
        pytest.skip("SQLite stores any length and NUL")
    now = utcnow()
    for user in ("x" * 129, "nul\x00byte"):
        with pytest.raises(DBAPIError) as raised, get_engine(db_url).begin() as connection:
            connection.execute(insert(tables.account).values(user_id=user, created_at=now, updated_at=now))
        error = translate_db_error(raised.value)
        assert error is not None and error.exit_code == 2 and error.code == "invalid_input"
        assert "INSERT" not in error.message and user not in error.message


@pytest.mark.parametrize(
    ("table", "column", "args"),
    [
        ("redemption", "created_at", ["redeem", "show", "1"]),
        ("redemption", "created_at", ["redeem", "list"]),
        ("account", "updated_at", ["account", "show", "u1"]),
        ("outbox_message", "next_attempt_at", ["relay", "list"]),
    ],
)
def test_a_value_changed_by_hand_into_another_type_is_a_clear_error(tmp_path, credex_at, table, column, args):
    """SQLite keeps whatever an UPDATE run by hand stores: a time that is no time was exit 70."""
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    for setup in (
        ["catalog", "add", "MUG", "--name", "Mug", "--points", "10"],
        ["award", "grant", "u1", "100", "--ref", "g1", "--reason", "opening"],
        ["redeem", "create", "u1", "MUG", "--address", "1 High St"],
    ):
        assert credex_at(url, *setup).exit_code == 0
    with sqlite3.connect(tmp_path / "shop.db") as db:
        db.execute(f"UPDATE {table} SET {column} = 'not a time'")  # noqa: S608 - names from the test
    result = credex_at(url, *args, "--json")
    assert result.exit_code == 1, result.stderr
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "unreadable_value", error
    assert "not of its column's type" in error["message"] and "'not a time'" in error["message"]


def test_a_balance_changed_by_hand_into_text_is_a_clear_error_and_nothing_is_granted(tmp_path, credex_at):
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    assert credex_at(url, "award", "grant", "u1", "100", "--ref", "g1", "--reason", "opening").exit_code == 0
    with sqlite3.connect(tmp_path / "shop.db") as db:
        db.execute("UPDATE account SET balance = 'lots'")
    result = credex_at(url, "award", "grant", "u1", "5", "--ref", "g2", "--reason", "more", "--json")
    assert result.exit_code == 1, result.stderr  # was exit 70: "can only concatenate str"
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "unreadable_value" and "'lots'" in error["message"], error
    with sqlite3.connect(tmp_path / "shop.db") as db:
        assert db.execute("SELECT count(*) FROM ledger_entry").fetchone() == (1,)


def test_a_balance_changed_by_hand_into_text_refuses_a_redemption_clearly_and_nothing_is_written(
    tmp_path, credex_at
):
    """SQLite compares text above any number, so 'lots' >= 10 passes the redemption's guard and
    the CHECK on the balance refuses the write: that was exit 70 with the SQL in the message."""
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    assert (
        credex_at(url, "catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "5").exit_code
        == 0
    )
    assert credex_at(url, "award", "grant", "u1", "100", "--ref", "g1", "--reason", "opening").exit_code == 0
    with sqlite3.connect(tmp_path / "shop.db") as db:
        db.execute("UPDATE account SET balance = 'lots'")
    result = credex_at(url, "redeem", "create", "u1", "MUG", "--address", "1 High St", "--json")
    assert result.exit_code == 1, result.stderr
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "constraint_violated", error
    assert "ck_account_balance_nonnegative" in error["message"] and "UPDATE" not in error["message"], error
    with sqlite3.connect(tmp_path / "shop.db") as db:
        assert db.execute("SELECT count(*) FROM redemption").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM outbox_message").fetchone() == (0,)
        assert db.execute("SELECT stock FROM catalog_item").fetchone() == (5,)


def test_a_row_a_check_constraint_refuses_is_a_rule_error_without_the_values(db_url):
    """A change a CHECK refuses is exit 1 naming the constraint's refusal, never the SQL or the
    row (Postgres's DETAIL shows the row); a UNIQUE refused stays a bug (test_driver.py)."""
    from sqlalchemy import insert
    from sqlalchemy.exc import DBAPIError

    from credex.db import tables
    from credex.db.engine import get_engine, upgrade
    from credex.db.failures import translate_db_error
    from credex.db.models import utcnow

    upgrade(db_url)
    now = utcnow()
    row = {
        "user_id": "other-user-8",
        "balance": -5,
        "earned": 0,
        "redeemed": 0,
        "created_at": now,
        "updated_at": now,
    }
    with pytest.raises(DBAPIError) as raised, get_engine(db_url).begin() as connection:
        connection.execute(insert(tables.account).values(**row))
    error = translate_db_error(raised.value)
    assert error is not None and (error.exit_code, error.code) == (1, "constraint_violated"), raised.value
    assert "ck_account_balance_nonnegative" in error.message, error.message
    assert "INSERT" not in error.message and "other-user-8" not in error.message, error.message
