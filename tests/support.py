"""Helpers for tests: the services' addresses, running credex as a process, waiting."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_ADMIN_URL = os.environ.get("CREDEX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("CREDEX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
ROOT = Path(__file__).resolve().parent.parent


def service_missing(what: str, detail: object) -> None:
    message = f"{what} is not reachable: {detail}"
    if CI:
        pytest.fail(message + " (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(message)


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def credex_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "credex", *map(str, args)]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDEX_")}
    env["CREDEX_OPERATOR"] = "tester"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_process(*args: object, env: dict[str, str] | None = None, timeout: float = 60) -> Outcome:
    """Run credex as a real process."""
    done = subprocess.run(
        credex_command(*args), capture_output=True, text=True, env=env or subprocess_env(), timeout=timeout
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def wait_for(
    condition: Callable[[], object], *, timeout: float = 30, interval: float = 0.05, what: str = ""
) -> object:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


@contextmanager
def file_lock(path: Path, *, exclusive: bool, timeout: float) -> Iterator[None]:
    """An flock on ``path`` (exclusive or shared) for the block, or TimeoutError after ``timeout`` s:
    what keeps tests on parallel workers off a resource one of them must have alone."""
    with open(path, "a+") as handle:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the lock {path} was not free within {timeout} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pg_admin():
    import psycopg

    return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)


def pg_url(database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(hide_password=False)


@contextmanager
def a_role_without_privileges(db_url: str) -> Iterator[str]:
    """Postgres: ``db_url`` as a login of its own (a fresh name, dropped afterwards) that may connect
    but was granted nothing on credex's tables: a login not yet made a member of its group."""
    import uuid

    from sqlalchemy.engine import make_url

    role = f"nopriv_{uuid.uuid4().hex[:12]}"
    with pg_admin() as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        yield make_url(db_url).set(username=role, password=None).render_as_string(hide_password=False)
    finally:
        from credex.db.engine import dispose_engines

        dispose_engines()
        with pg_admin() as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')


@contextmanager
def holding_accounts(db_url: str, *users: str) -> Iterator[None]:
    """Postgres: hold the row locks of ``users``' accounts, as a long transaction of another
    program would: every writer that touches them waits inside its own transaction meanwhile."""
    import psycopg

    with psycopg.connect(db_url, connect_timeout=5) as connection:
        connection.execute(
            "SELECT user_id FROM account WHERE user_id = ANY(%s) FOR UPDATE", (list(users),)
        ).fetchall()
        try:
            yield
        finally:
            connection.rollback()


def lock_waiters(db_url: str) -> int:
    """Postgres: the sessions of this database that wait for a lock right now."""
    import psycopg

    with psycopg.connect(db_url, connect_timeout=5, autocommit=True) as connection:
        return connection.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()[0]
