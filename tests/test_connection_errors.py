"""A lost database is told by the driver's exception classes and codes and by SQLAlchemy's
``connection_invalidated``, never by the words of a message: a server that went away or a
database that is locked is "unavailable" (exit 69, or a worker waits); a deadlock or an error
whose text merely mentions a connection is not."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from credex.db.failures import is_connection_error
from tests.support import pg_admin, pg_url


def failure(engine, sql: str) -> DBAPIError:
    with engine.connect() as connection, pytest.raises(DBAPIError) as raised:
        connection.execute(text(sql))
    return raised.value


def test_sqlite_locked_or_unopenable_is_unavailable_and_a_bad_statement_is_not(tmp_path):
    path = tmp_path / "points.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    try:
        locked = failure(engine, "INSERT INTO t VALUES (1)")
        assert "locked" in str(locked.orig) and is_connection_error(locked)
        assert not is_connection_error(failure(engine, "SELECT * FROM no_such_table"))
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()
    nowhere = create_engine(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'points.db'}")
    with pytest.raises(DBAPIError) as raised:
        nowhere.connect()
    assert is_connection_error(raised.value)


def test_sqlite_text_that_only_sounds_like_a_lost_connection_is_not_one():
    error = sqlite3.OperationalError("database is locked")  # made up, not from SQLite: no code
    assert not is_connection_error(error)


@pytest.fixture
def pg_engine(postgres_template):
    engine = create_engine(pg_url(postgres_template).replace("postgresql://", "postgresql+psycopg://"))
    yield engine
    engine.dispose()


def test_postgres_unreachable_or_terminated_is_unavailable(pg_engine):
    refused = create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:1/x", connect_args={"connect_timeout": 2}
    )
    with pytest.raises(DBAPIError) as raised:
        refused.connect()
    assert is_connection_error(raised.value)

    with pg_engine.connect() as connection:
        pid = connection.execute(text("SELECT pg_backend_pid()")).scalar()
        with pg_admin() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(DBAPIError) as raised:
            connection.execute(text("SELECT 1"))
    assert type(raised.value.orig).__name__ == "AdminShutdown"
    assert is_connection_error(raised.value)


def test_postgres_errors_on_a_working_connection_are_not_connection_loss(pg_engine):
    sounds_like_it = failure(
        pg_engine, "DO $$ BEGIN RAISE EXCEPTION 'connection refused: server closed the connection'; END $$"
    )
    assert "connection refused" in str(sounds_like_it.orig)
    assert not is_connection_error(sounds_like_it)
    assert not is_connection_error(failure(pg_engine, "SELECT * FROM no_such_table"))
    import psycopg.errors

    deadlock = psycopg.errors.DeadlockDetected("deadlock detected")
    assert isinstance(deadlock, psycopg.OperationalError) and not is_connection_error(deadlock)
