"""Fresh databases for the benchmarks: a migrated SQLite file or Postgres database, and its removal."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

POSTGRES_ADMIN = os.environ.get("CREDEX_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def fresh_database(backend: str, workdir: Path) -> str:
    """The URL of a new database at credex's newest schema."""
    from credex.db.engine import dispose_engines, upgrade

    if backend == "sqlite":
        url = f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:8]}.db'}"
    else:
        import psycopg
        from sqlalchemy.engine import make_url

        name = f"credex_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        url = make_url(POSTGRES_ADMIN).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    dispose_engines()
    return url


def drop_database(url: str) -> None:
    from credex.db.engine import dispose_engines

    dispose_engines()
    if url.startswith("postgresql"):
        import psycopg
        from sqlalchemy.engine import make_url

        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
    else:
        for suffix in ("", "-wal", "-shm"):
            Path(url.removeprefix("sqlite:///") + suffix).unlink(missing_ok=True)
