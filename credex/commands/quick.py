"""The read-only look-ups answered without Typer, SQLAlchemy, Alembic or the settings: `account
show`, `redeem show` and `relay status`, on a database already at the head revision; and
`credex --help`.

A command line of exactly that shape (global ``--database-url``/``--operator``, the command, its
one id, ``--json``) is read here with the driver alone: the standard library's sqlite3 for
``sqlite:///PATH`` (the file opened for reading, never created), psycopg for ``postgresql://``.
One SELECT checks that ``alembic_version`` is the head revision this credex knows
(``credex.db.HEAD_REVISION``); the query and its output are those of the full path. Anything
unusual falls back to the full path, which then answers as it always did (same output, same
errors, same exit code): an option or argument of another shape, an id the input rules might
refuse or reshape, a setting the settings check might refuse, a URL of another form, a missing
file, a database not at the head revision (SQLite is migrated there), a lock, an unknown id, any
database error. ``answer`` returns None in those cases, having printed nothing. A Postgres server
that cannot be reached or refuses the connection is the exception: the full path would only try
again (and wait as long), so it is exit 69 here, in the full path's words.

(A little over 400 lines on purpose: both drivers' ways to the three look-ups live together, so
that they stay the full path's twins.)
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from credex.db import HEAD_REVISION
from credex.errors import CredexError, redact

# The number of arguments of each command answered here.
COMMANDS = {("account", "show"): 1, ("redeem", "show"): 1, ("relay", "status"): 0}
# Settings (CREDEX_*, any case) whose value the settings check can refuse (numbers, durations):
# with one of them set, the full path checks them all. A test keeps this set in step with
# credex.config.Settings; the other settings are text, which the check takes as it is.
CHECKED_SETTINGS = frozenset(
    {
        "purchase_rate",
        "review_points",
        "review_photo_points",
        "pending_days",
        "expiry_days",
        "logistics_total_timeout",
        "logistics_connect_timeout",
        "logistics_read_timeout",
        "sqlite_busy_timeout",
        "amqp_publish_timeout",
    }
)
DEFAULT_DATABASE_URL = "sqlite:///credex.db"  # credex.config.Settings.database_url (a test checks it)
POSTGRES_CONNECT_TIMEOUT_S = 5  # credex.db.engine's (a test checks it)
MESSAGE_STATES = ("pending", "sent", "confirmed", "dead", "cancelled")  # credex.db.models.MessageState
# Ids that every input rule takes as they are: printable ASCII without spaces, shorter than any
# id column. Anything else goes to the full path, which refuses it or reshapes it as always.
_PLAIN_ID = re.compile(r"[!-~]{1,64}")
_PLAIN_NUMBER = re.compile(r"[0-9]{1,18}")
_POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")
# `credex --help` as Typer prints it on a terminal (or pipe) of 80 columns or more, where click
# wraps help text at 78: importing Typer alone takes longer than the whole answer may. A test
# compares it with the Typer root's own help; narrower terminals get Typer's.
ROOT_HELP = """\
Usage: credex [OPTIONS] COMMAND [ARGS]...

  Administer the points program: awards, redemptions, the relay and tracking.

Options:
  --database-url <str>  Points database (default: CREDEX_DATABASE_URL, else
                        sqlite:///credex.db).
  --operator <str>      Who makes changes (default: CREDEX_OPERATOR, else the
                        login name).
  --version             Print the version and exit.
  -h, --help            Show this message and exit.

Commands:
  db         Create and migrate the database schema.
  catalog    Keep the gift catalog.
  award      Award points (each award is idempotent on its reference).
  account    Look at a shopper's points.
  redeem     Redeem points for gifts and look redemptions up.
  relay      The relay: outbox to RabbitMQ, until the warehouse confirms.
  warehouse  The warehouse: shipment requests and waybills.
  track      Where is a gift? `credex track REDEMPTION_ID`, `credex track...
  logistics  The carrier side: a local sandbox carrier.
  audit      Check every rule of the points program across both databases.
"""


def answer(args: list[str]) -> int | None:
    """Answer the command line ``args`` and return its exit code, or None (nothing printed) when
    the full path must answer it."""
    if args in (["--help"], ["-h"]):
        return _root_help()
    try:
        parsed = _parse(args)
        if parsed is None:
            return None
        command, arguments, as_json, given_url = parsed
        url = _database_url(given_url)
        if url is None:
            return None
        result = _read(url, command, arguments)
        if result is None:
            return None
    except KeyboardInterrupt:
        return _interrupted(args)
    except CredexError as error:  # what the full path would say after trying the same
        return _report(as_json, error.code, redact(error.message), error.exit_code)
    except Exception:  # whatever it was, the full path meets it again and says it properly
        return None
    return _print(command, result, as_json)


# --- the command line and the settings, as Typer and credex.config would read them ---------------


def _parse(args: list[str]):
    database_url = None
    at = 0
    while at < len(args) and args[at].startswith("-"):
        name, equals, value = args[at].partition("=")
        if name not in ("--database-url", "--operator"):
            return None
        if not equals:
            at += 1
            if at == len(args) or args[at].startswith("-"):
                return None
            value = args[at]
        if name == "--database-url":
            database_url = value  # the last one given wins, as with click
        at += 1
    command = tuple(args[at : at + 2])
    if command not in COMMANDS:
        return None
    as_json = False
    arguments = []
    for word in args[at + 2 :]:
        if word == "--json":
            as_json = True
        elif word.startswith("-"):  # another option, `--`, `-h`: the full path reads it
            return None
        else:
            arguments.append(word)
    if len(arguments) != COMMANDS[command]:
        return None
    return command, arguments, as_json, database_url


def _database_url(given: str | None) -> str | None:
    """The points database's URL with the settings' precedence (option, CREDEX_DATABASE_URL in any
    case, default), or None when the settings check might refuse a setting."""
    names = [name for name in os.environ if name.lower().startswith("credex_")]
    settings = [name.lower()[len("credex_") :] for name in names]
    if len(set(settings)) != len(settings) or CHECKED_SETTINGS.intersection(settings):
        return None
    if given is not None:
        return given
    for name, setting in zip(names, settings, strict=True):
        if setting == "database_url":
            return os.environ[name]
    return DEFAULT_DATABASE_URL


# --- reading ------------------------------------------------------------------------------------


def _read(url: str, command: tuple[str, str], arguments: list[str]):
    if not url.isprintable() or url != url.strip():
        return None  # the full path refuses it (exit 2)
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path or path == ":memory:" or path.startswith("//") or any(c in path for c in "?#%"):
            return None
        return _read_sqlite(path, command, arguments)
    if "?" in url or "#" in url:
        return None  # options in a query: SQLAlchemy reads "+" there as a space, libpq does not
    for scheme in _POSTGRES_SCHEMES:
        if url.startswith(scheme):
            return _read_postgres(url, "postgresql://" + url[len(scheme) :], command, arguments)
    return None


def _read_sqlite(path: str, command, arguments):
    import sqlite3

    # mode=rw: an existing file only (the full path creates and migrates a missing one); no
    # busy wait: a lock sends the command to the full path, which waits as configured.
    connection = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=0, isolation_level=None)
    try:
        connection.execute("BEGIN")
        if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            return None  # the full path switches the file to WAL first

        def fetch(sql: str, params: tuple) -> list[tuple]:
            return connection.execute(sql, params).fetchall()

        return _query(fetch, command, arguments)
    finally:
        connection.close()


def _read_postgres(url: str, conninfo: str, command, arguments):
    import psycopg

    try:
        connection = psycopg.connect(conninfo, connect_timeout=POSTGRES_CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as error:
        # The server cannot be reached or refuses: the full path would try again, wait as long
        # and exit 69. Said here as it says it, after the same check of the URL.
        from credex.db.engine import get_engine
        from credex.db.failures import unavailable

        get_engine(url)  # a URL the full path refuses (exit 2) is refused the same way
        raise unavailable(url, error) from None
    try:

        def fetch(sql: str, params: tuple) -> list[tuple]:
            return connection.execute(sql.replace("?", "%s"), params).fetchall()

        return _query(fetch, command, arguments)
    finally:
        connection.rollback()
        connection.close()


def _query(fetch: Callable[[str, tuple], list[tuple]], command, arguments):
    """The command's result as the full path builds it, in one transaction, or None."""
    revision = fetch("SELECT version_num FROM alembic_version", ())
    if not revision or revision[0][0] != HEAD_REVISION:
        return None
    if command == ("account", "show"):
        return _account(fetch, *arguments)
    if command == ("redeem", "show"):
        return _redemption(fetch, *arguments)
    return _outbox_status(fetch)


def _utc(value) -> datetime | None:
    """A timestamp as credex.db.models.UTCDateTime reads it (SQLite: ISO text, no offset)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _account(fetch, user_id: str) -> dict | None:
    """credex.points.accounts.get_account."""
    if not _PLAIN_ID.fullmatch(user_id):
        return None
    rows = fetch(
        "SELECT user_id, balance, earned, redeemed, updated_at, pending, debt FROM account WHERE user_id = ?",
        (user_id,),
    )
    if not rows:
        return None  # the full path says there is no such account
    row = rows[0]
    if any(type(value) is not int for value in (row[1], row[2], row[3], row[5], row[6])):
        return None  # a counter changed by hand: the full path says so
    days: dict = {}
    for remaining, expires_at in fetch(
        "SELECT remaining, expires_at FROM point_lot WHERE user_id = ? AND state = 'available' "
        "AND expires_at IS NOT NULL ORDER BY expires_at",
        (user_id,),
    ):
        day = _utc(expires_at).date()
        days[day] = days.get(day, 0) + remaining
    return {
        "user_id": row[0],
        "balance": row[1],
        "earned": row[2],
        "redeemed": row[3],
        "updated_at": _utc(row[4]),
        "pending": row[5],
        "debt": row[6],
        "expiring": [{"points": points, "on": day} for day, points in days.items()],
    }


_REDEMPTION_COLUMNS = (
    "redemption_id",
    "user_id",
    "sku",
    "quantity",
    "points",
    "balance",
    "address",
    "status",
    "message_id",
    "express_no",
    "carrier",
    "delivery_status",
    "delivery_checked_at",
    "created_at",
)


def _redemption(fetch, redemption_id: str) -> dict | None:
    """credex.points.redemptions.get_redemption."""
    if not _PLAIN_NUMBER.fullmatch(redemption_id) or int(redemption_id) < 1:
        return None
    number = int(redemption_id)
    rows = fetch(
        "SELECT r.id, r.user_id, r.sku, r.quantity, r.points, r.balance, r.address, r.status, "
        "r.message_id, r.express_no, r.carrier, r.delivery_status, r.delivery_checked_at, "
        "r.created_at, m.state FROM redemption AS r "
        "LEFT OUTER JOIN outbox_message AS m ON m.id = r.message_id WHERE r.id = ?",
        (number,),
    )
    if not rows:
        return None  # the full path says there is no such redemption
    *values, message_state = rows[0]
    result = dict(zip(_REDEMPTION_COLUMNS, values, strict=True))
    result["delivery_checked_at"] = _utc(result["delivery_checked_at"])
    result["created_at"] = _utc(result["created_at"])
    if message_state is not None:
        result["message_state"] = message_state
    result["events"] = [
        {"at": _utc(at), "status": status, "source": source, "detail": detail}
        for at, status, source, detail in fetch(
            "SELECT at, status, source, detail FROM redemption_event WHERE redemption_id = ? "
            "ORDER BY id DESC",
            (number,),
        )
    ]
    return result


def _outbox_status(fetch) -> dict:
    """credex.relay.operators.outbox_status."""
    counts: dict = dict.fromkeys(MESSAGE_STATES, 0)
    for state, count in fetch("SELECT state, count(*) FROM outbox_message GROUP BY state", ()):
        counts[state] = count
    unconfirmed = ("pending", "sent")
    [(oldest,)] = fetch("SELECT min(created_at) FROM outbox_message WHERE state IN (?, ?)", unconfirmed)
    age = None if oldest is None else round((datetime.now(UTC) - _utc(oldest)).total_seconds(), 3)
    counts["oldest_unconfirmed_age_seconds"] = age
    return counts


# --- printing, as the commands print -------------------------------------------------------------


def render_account(console, account: dict) -> None:
    from credex.output import print_record

    shown = dict(account)
    shown["expiring"] = (
        ", ".join(f"{e['points']} on {e['on'].isoformat()}" for e in account["expiring"]) or "-"
    )
    print_record(console, shown, title=f"account {account['user_id']}")


def render_redemption(console, redemption: dict) -> None:
    from credex.output import print_record, print_rows

    title = f"redemption {redemption['redemption_id']}"
    if redemption.get("duplicate"):
        title += " (already recorded: nothing changed)"
    events = redemption.get("events")
    print_record(console, {k: v for k, v in redemption.items() if k != "events"}, title=title)
    if events:
        print_rows(
            console, events, columns=["at", "status", "source", "detail"], title="events (newest first)"
        )


def _print(command: tuple[str, str], result: dict, as_json: bool) -> int:
    from credex.output import emit

    try:
        if command == ("account", "show"):
            emit(result, as_json=as_json, render=render_account)
        elif command == ("redeem", "show"):
            emit(result, as_json=as_json, render=render_redemption)
        else:
            emit(result, as_json=as_json, title="outbox")
    except BrokenPipeError:  # the reader went away: as the full path, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return _report(as_json, "interrupted", "interrupted", 130)
    except OSError as error:  # stdout on a full disk or a failing device: as the full path says it
        from credex.output import os_error_outcome

        code, message, exit_code = os_error_outcome(error)
        return _report(as_json, code, redact(message), exit_code)
    except Exception as error:  # a bug, said in one line as the full path says it
        return _report(as_json, "internal", redact(f"internal error ({type(error).__name__}): {error}"), 70)
    return 0


def _root_help() -> int | None:
    import shutil

    if shutil.get_terminal_size().columns < 80:
        return None
    try:
        sys.stdout.write(ROOT_HELP)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


def _interrupted(args: list[str]) -> int:
    words = args[: args.index("--")] if "--" in args else args
    return _report("--json" in words, "interrupted", "interrupted", 130)


def _report(as_json: bool, code: str, message: str, exit_code: int) -> int:
    from credex.output import report_error

    report_error(None, as_json=as_json, code=code, message=message)
    return exit_code
