"""The database: created on first use, migrated by `db upgrade`, and failures that say what to do."""

import json
import sqlite3
import time
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
def test_an_unreachable_database_exits_69_quickly_without_the_password(url):
    started = time.monotonic()
    result = run_process("--database-url", url, "account", "show", "u1")
    elapsed = time.monotonic() - started
    assert result.exit_code == 69
    assert elapsed < 15
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
