"""Start-up: how long a command takes from exec to exit, against an older credex and the bare driver,
side by side in one run.

    python bench/startup.py                    # against the commit named by --baseline-ref
    python bench/startup.py --runs 21 --baseline-ref 97c1f29
    python bench/startup.py --postgres postgresql://postgres@127.0.0.1:5432/test   # also on Postgres

Each command runs --runs times, interleaved (current, baseline, bare, current, …) so that a busy
machine slows every side alike; medians are printed with the ratio current / baseline. The
database is a fresh SQLite file with one shopper, one gift and one redemption. The baseline is a
checkout of --baseline-ref (a git worktree made for the run and removed after), run with this
interpreter, so both sides import the same libraries. Goals: `--help` <= 0.12 s; `account show`,
`redeem show`, `relay status` <= 0.4 s and <= half the baseline. With --postgres ADMIN_URL the three
look-ups also run on two fresh Postgres databases made there (one per side, dropped after), beside
a bare psycopg script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "--help": ["--help"],
    "account show": ["account", "show", "u-1", "--json"],
    "redeem show": ["redeem", "show", "1", "--json"],
    "relay status": ["relay", "status", "--json"],
}
BARE_POSTGRES = (
    "import psycopg, sys, json; c = psycopg.connect(sys.argv[1]); "
    "r = c.execute('SELECT user_id, balance, earned, redeemed FROM account WHERE user_id = %s', ('u-1',))"
    ".fetchone(); print(json.dumps(r))"
)
BARE = (
    "import sqlite3, sys, json; c = sqlite3.connect(sys.argv[1]); "
    "r = c.execute('SELECT user_id, balance, earned, redeemed FROM account WHERE user_id = ?', ('u-1',))"
    ".fetchone(); print(json.dumps(r))"
)


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=60)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return elapsed


def prepare(url: str, tree: Path, cwd: Path) -> None:
    """One database per side, made by that side's own credex: an older credex cannot open a
    database migrated past its own head revision."""
    env = {**os.environ, "CREDEX_DATABASE_URL": url, "CREDEX_OPERATOR": "bench"}
    env["PYTHONPATH"] = str(tree)
    for args in (
        ["db", "upgrade"],
        ["catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "5"],
        ["award", "grant", "u-1", "100", "--reason", "bench"],
        ["redeem", "create", "u-1", "MUG", "--address", "1 Bench Road"],
    ):
        subprocess.run(
            [sys.executable, "-m", "credex", *args], env=env, cwd=cwd, check=True, capture_output=True
        )


def postgres_databases(admin_url: str, sides) -> dict[str, str]:
    """A fresh database per side on the server of ``admin_url``: their URLs."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    urls = {}
    with psycopg.connect(admin_url, autocommit=True) as admin:
        for side in sides:
            name = f"credex_startup_{side}_{uuid.uuid4().hex[:8]}"
            admin.execute(f'CREATE DATABASE "{name}"')
            urls[side] = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return urls


def drop_databases(admin_url: str, urls: dict[str, str]) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    with psycopg.connect(admin_url, autocommit=True) as admin:
        for url in urls.values():
            admin.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--baseline-ref", default="97c1f29", help="git ref of the credex to compare with")
    parser.add_argument(
        "--postgres", metavar="ADMIN_URL", help="also on Postgres: a server where databases can be made"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="credex-startup-"))
    baseline = work / "baseline"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(baseline), args.baseline_ref],
        check=True,
    )
    sides = {"current": ROOT, "baseline": baseline}
    postgres: dict[str, str] = {}
    try:
        urls = {side: f"sqlite:///{work / f'{side}.db'}" for side in sides}
        runs = [(name, argv, urls) for name, argv in COMMANDS.items()]
        bare = {"bare sqlite3": ([sys.executable, "-c", BARE, str(work / "current.db")], [])}
        if args.postgres:
            postgres = postgres_databases(args.postgres, sides)
            runs += [(f"{name} (pg)", argv, postgres) for name, argv in COMMANDS.items() if name != "--help"]
            bare["bare psycopg"] = ([sys.executable, "-c", BARE_POSTGRES, postgres["current"]], [])
        for side, tree in sides.items():
            prepare(urls[side], tree, work)
            if postgres:
                prepare(postgres[side], tree, work)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.runs):
            for name, argv, side_urls in runs:
                for side, tree in sides.items():
                    env = {**os.environ, "PYTHONPATH": str(tree), "CREDEX_DATABASE_URL": side_urls[side]}
                    env = {k: v for k, v in env.items() if k not in ("COLUMNS",)}
                    times.setdefault((name, side), []).append(
                        timed([sys.executable, "-m", "credex", *argv], env, work)
                    )
            for command, measured in bare.values():
                measured.append(timed(command, dict(os.environ), work))
        print(f"median of {args.runs} runs, seconds (baseline: {args.baseline_ref})")
        print(f"{'command':<22}{'current':>10}{'baseline':>10}{'ratio':>8}")
        for name, _, _ in runs:
            now = statistics.median(times[name, "current"])
            then = statistics.median(times[name, "baseline"])
            print(f"{name:<22}{now:>10.3f}{then:>10.3f}{now / then:>8.2f}")
        for name, (_, measured) in bare.items():
            print(f"{name:<22}{statistics.median(measured):>10.3f}")
    finally:
        if postgres:
            drop_databases(args.postgres, postgres)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
