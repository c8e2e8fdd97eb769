"""Start-up pays only for what a command uses: `account show`, `redeem show` and `relay status`
are read with the driver alone (credex/commands/quick.py) and print exactly what the full path
prints; `--help` and every other command build only the group argv names."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.support import ROOT, a_role_without_privileges, subprocess_env

HEAVY = ("sqlalchemy", "sqlmodel", "alembic", "pydantic", "pydantic_settings", "typer")
# Runs credex as the `credex` script does, then says which packages and credex modules it loaded.
QUICK = """
import json, sys
from credex.cli import main
try:
    main()
except SystemExit as leaving:
    code = leaving.code
sys.stderr.write("LOADED " + json.dumps(sorted(sys.modules)) + "\\n")
sys.exit(code)
"""
# The full path, as before the quick one existed: the Typer app, not trying the quick path.
FULL = "from credex.commands.root import app; app(prog_name='credex', quick=False)"


def full(*args: str) -> tuple[int, str, str]:
    """The full path run in this process (what FULL prints, without an interpreter of its own
    that imports everything again: about 1.4 s of CPU each)."""
    from typer.testing import CliRunner

    from credex.cli import app

    done = CliRunner().invoke(app, list(args), catch_exceptions=False, prog_name="credex", quick=False)
    return done.exit_code, done.stdout, done.stderr


def run(script: str, *args: str, env: dict[str, str] | None = None):
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env or subprocess_env(),
        cwd=ROOT,
        timeout=120,
    )
    stderr, loaded = done.stderr, []
    if "LOADED " in stderr:
        stderr, _, listed = stderr.rpartition("LOADED ")
        loaded = json.loads(listed)
    return done.returncode, done.stdout, stderr, loaded


def packages(loaded: list[str]) -> set[str]:
    return {name.split(".")[0] for name in loaded}


def heavy(loaded: list[str]) -> list[str]:
    return sorted(packages(loaded) & set(HEAVY))


AGE = re.compile(r'("oldest_unconfirmed_age_seconds": |oldest_unconfirmed_age_seconds\s+)[0-9.]+')


def same_but_the_age(text: str) -> str:
    """relay status measures the oldest message's age when it runs: the rest must be equal (in a
    table, the age's width sets the column's, so the padding is left out there)."""
    if AGE.search(text) is None:
        return text
    return "\n".join(" ".join(line.split()) for line in AGE.sub(r"\1AGE", text).splitlines())


@pytest.fixture
def shop(credex, db_url) -> None:
    """A shopper with expiring and pending points, a redemption cancelled (four events), one
    pending with an address over two lines (stored before the input rules refused line breaks in
    free text: such rows are still read), an outbox with messages in two states."""
    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "5").exit_code == 0
    grant = credex("award", "grant", "u-1", "100", "--reason", "r", env={"CREDEX_EXPIRY_DAYS": "30"})
    assert grant.exit_code == 0
    purchase = credex(
        "award", "purchase", "u-1", "--order", "o-1", "--amount", "12.50", env={"CREDEX_PENDING_DAYS": "7"}
    )
    assert purchase.exit_code == 0
    assert credex("redeem", "create", "u-1", "MUG", "--address", "1 Road").exit_code == 0
    assert credex("redeem", "cancel", "1", "--reason", "changed my mind").exit_code == 0
    assert credex("redeem", "create", "u-1", "MUG", "--address", "2 Lane").exit_code == 0
    from sqlalchemy import func, update

    from credex.db import tables
    from credex.db.engine import get_engine

    with get_engine(db_url).begin() as connection:
        r, o, address = tables.redemption, tables.outbox_message, "2 Lane\nFlat 3, Zhōngshān"
        connection.execute(update(r).where(r.c.id == 2).values(address=address))
        body = func.replace(o.c.body, '"address": "2 Lane"', '"address": ' + json.dumps(address))
        connection.execute(update(o).where(o.c.redemption_id == 2).values(body=body))


LOOK_UPS = [
    ("account", "show", "u-1", "--json"),
    ("account", "show", "u-1"),
    ("redeem", "show", "1", "--json"),
    ("redeem", "show", "1"),
    ("redeem", "show", "2"),
    ("relay", "status", "--json"),
    ("relay", "status"),
]


@pytest.mark.timeout(600)
def test_the_quick_path_prints_what_the_full_path_prints_and_imports_none_of_it(shop, db_url):
    for args in LOOK_UPS:
        quick = run(QUICK, "--database-url", db_url, *args)
        before = full("--database-url", db_url, *args)
        assert quick[0] == before[0] == 0, (args, quick[2], before[2])
        assert same_but_the_age(quick[1]) == same_but_the_age(before[1]), args
        assert quick[2] == before[2] == "", args
        assert heavy(quick[3]) == [], args  # it really was the quick path
        if "--json" in args:
            assert "rich" not in packages(quick[3]), args


def test_the_database_url_comes_from_the_environment_in_any_case(shop, db_url):
    env = subprocess_env(credex_database_url=db_url)
    code, stdout, stderr, loaded = run(QUICK, "account", "show", "u-1", "--json", env=env)
    assert (code, stderr, heavy(loaded)) == (0, "", [])
    assert json.loads(stdout)["balance"] == 90
    # The option wins over the environment, as with the settings.
    env = subprocess_env(CREDEX_DATABASE_URL="sqlite:///nowhere/x.db")
    code, stdout, stderr, loaded = run(QUICK, "--database-url", db_url, "relay", "status", "--json", env=env)
    assert (code, stderr, heavy(loaded)) == (0, "", [])


@pytest.mark.parametrize(
    "args",
    [
        ("account", "show", "ghost", "--json"),  # no such account
        ("account", "show", " u-1", "--json"),  # the rules drop the space: the full path reads it
        ("account", "show", "u\x01-1", "--json"),  # refused by the input rules
        ("account", "show", "ü" * 129),  # too long, in characters not bytes
        ("redeem", "show", "0", "--json"),
        ("redeem", "show", "+2", "--json"),
        ("redeem", "show", "99", "--json"),
        ("redeem", "show", "1", "--json", "--limit", "3"),  # no such option
        ("relay", "status", "extra"),
        ("account", "show", "--json", "--", "-4"),
    ],
)
def test_what_the_quick_path_does_not_answer_is_answered_as_before(shop, db_url, args):
    quick = run(QUICK, "--database-url", db_url, *args)
    assert quick[:3] == full("--database-url", db_url, *args)
    assert quick[0] != 70


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_postgres_url_with_options_in_its_query_is_read_as_the_full_path_reads_it(shop, db_url):
    # `options=-c+role%3D…`: SQLAlchemy reads the "+" as a space, libpq would not.
    url = f"{db_url}?options=-c+application_name%3Dcredex-quick"
    quick = run(QUICK, "--database-url", url, "account", "show", "u-1", "--json")
    assert quick[:3] == full("--database-url", url, "account", "show", "u-1", "--json") and quick[0] == 0, (
        quick[2]
    )
    assert json.loads(quick[1])["balance"] == 90


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("where", ["closed port", "no such database"])
def test_a_postgres_that_cannot_be_reached_is_exit_69_as_before_after_one_attempt(db_url, where):
    from sqlalchemy.engine import make_url

    url = make_url(db_url).set(password="s3cr3t-pw")
    url = url.set(port=1) if where == "closed port" else url.set(database="credex_no_such_database")
    url = url.render_as_string(hide_password=False)
    for args in (("account", "show", "u-1", "--json"), ("relay", "status")):
        quick = run(QUICK, "--database-url", url, *args)
        assert quick[:3] == full("--database-url", url, *args)
        assert quick[0] == 69 and "s3cr3t-pw" not in quick[1] + quick[2]
        assert "typer" not in packages(quick[3])  # said by the quick path, not the full one


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_role_granted_nothing_is_told_so_as_the_full_path_tells_it(shop, db_url):
    with a_role_without_privileges(db_url) as url:
        for args in (
            ("account", "show", "u-1", "--json"),
            ("redeem", "show", "1"),
            ("relay", "status", "--json"),
        ):
            quick = run(QUICK, "--database-url", url, *args)
            assert quick[:3] == full("--database-url", url, *args)
            assert quick[0] == 1 and "permission denied for table alembic_version" in quick[2], quick[2]
            assert "credex db upgrade" not in quick[2]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_database_url_ending_in_white_space_is_refused_even_where_a_file_has_that_name(shop, db_url):
    import sqlite3

    path = db_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as source, sqlite3.connect(f"{path} ") as copy:
        source.backup(copy)  # "credex.db ": the one a URL ending in a space would name
    env = subprocess_env(CREDEX_DATABASE_URL=f"{db_url} ")
    quick = run(QUICK, "account", "show", "u-1", "--json", env=env)
    assert quick[:3] == full("--database-url", f"{db_url} ", "account", "show", "u-1", "--json")
    assert quick[0] == 2 and quick[1] == "", quick
    assert "begins or ends with white space" in json.loads(quick[2])["error"]["message"]


def test_a_setting_with_a_bad_value_is_refused_as_before(tmp_path):
    url = f"sqlite:///{tmp_path / 'credex.db'}"
    env = subprocess_env(CREDEX_REVIEW_POINTS="ten")
    code, stdout, stderr, _ = run(QUICK, "--database-url", url, "relay", "status", "--json", env=env)
    assert code == 2
    assert json.loads(stderr)["error"]["code"] == "invalid_input"
    assert "CREDEX_REVIEW_POINTS" in stderr


def test_a_missing_sqlite_file_is_created_and_migrated_as_before(tmp_path):
    database = tmp_path / "new.db"
    code, _, stderr, loaded = run(
        QUICK, "--database-url", f"sqlite:///{database}", "relay", "status", "--json"
    )
    assert code == 0 and stderr == ""
    assert database.exists()
    assert "alembic" in packages(loaded)  # the full path migrated it
    code, stdout, _, loaded = run(
        QUICK, "--database-url", f"sqlite:///{database}", "relay", "status", "--json"
    )
    assert code == 0 and json.loads(stdout)["pending"] == 0
    assert heavy(loaded) == []  # now at the head revision: the quick path


def test_an_older_sqlite_schema_is_migrated_by_the_full_path(tmp_path):
    from credex.db.engine import dispose_engines
    from tests.test_migration_lifecycle import migrate

    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate(url, "0009_cheaper_lots")
    dispose_engines()
    code, stdout, stderr, loaded = run(QUICK, "--database-url", url, "relay", "status", "--json")
    assert (code, stderr) == (0, "")
    assert "alembic" in packages(loaded)
    code, _, _, loaded = run(QUICK, "--database-url", url, "relay", "status", "--json")
    assert code == 0 and heavy(loaded) == []


def test_a_balance_changed_by_hand_into_text_is_a_clear_error_on_both_paths(tmp_path):
    """It used to be printed as the balance, with exit 0."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'shop.db'}"
    granted = full("--database-url", url, "award", "grant", "u1", "100", "--ref", "g1", "--reason", "opening")
    assert granted[0] == 0
    with sqlite3.connect(tmp_path / "shop.db") as db:
        db.execute("UPDATE account SET balance = 'lots'")
    code, stdout, stderr, _loaded = run(QUICK, "--database-url", url, "account", "show", "u1", "--json")
    before = full("--database-url", url, "account", "show", "u1", "--json")
    assert code == before[0] == 1, stderr
    assert stdout == before[1] == ""
    error = json.loads(stderr)["error"]
    assert error == json.loads(before[2])["error"]
    assert error["code"] == "unreadable_value" and "'lots'" in error["message"], error


GROUP_MODULES = {
    f"credex.commands.{name}"
    for name in ("db", "catalog", "award", "award_bulk", "account", "redeem", "relay", "warehouse", "track")
    + ("logistics", "audit")
}


@pytest.mark.parametrize(
    ("flag", "columns"), [("--help", "80"), ("-h", "200"), ("--help", "79"), ("-h", "50")]
)
def test_help_is_typers_own_and_builds_no_group(flag, columns):
    env = subprocess_env(COLUMNS=columns)
    code, stdout, stderr, loaded = run(QUICK, flag, env=env)
    assert (code, stdout, stderr) == run(FULL, flag, env=env)[:3]
    assert code == 0 and "relay      The relay: outbox to RabbitMQ" in stdout
    assert GROUP_MODULES.isdisjoint(loaded)
    # Wrapped at 78 from 80 columns on: the stored text; narrower, Typer wraps it.
    assert heavy(loaded) == ([] if int(columns) >= 80 else ["typer"])


def test_other_commands_build_only_the_group_they_name(tmp_path):
    url = f"sqlite:///{tmp_path / 'credex.db'}"
    code, _, _, loaded = run(QUICK, "--database-url", url, "account", "history", "u-1", "--json")
    assert code == 1  # no such account yet: the full path, its group only
    assert GROUP_MODULES.intersection(loaded) == {"credex.commands.account"}


def test_each_group_is_listed_with_its_own_help_and_built_as_add_typer_built_it():
    """The lazy root against the root as it was built before: every group added at once."""
    import importlib

    import typer
    from typer.core import TyperGroup
    from typer.testing import CliRunner

    from credex.commands import root

    eager = typer.Typer(
        cls=TyperGroup,
        name="credex",
        help=root.app.info.help,
        no_args_is_help=True,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    eager.callback()(root.main_options)
    for name, (module, help) in root.GROUPS.items():
        group = importlib.import_module(module).app
        assert group.info.help == help, name
        eager.add_typer(group, name=name)
    runner = CliRunner()
    paths = [[]]
    for name in root.GROUPS:
        paths.append([name])
        built = root.build_group(name)
        paths.extend([name, command] for command in getattr(built, "commands", {}))
    for path in paths:
        lazy = runner.invoke(root.app, [*path, "--help"], env={"COLUMNS": "100"})
        before = runner.invoke(eager, [*path, "--help"], env={"COLUMNS": "100"})
        assert (lazy.exit_code, lazy.stdout) == (before.exit_code, before.stdout), path


def test_the_quick_path_keeps_in_step_with_the_settings_and_the_schema():
    from credex.commands import quick
    from credex.config import Settings
    from credex.db.engine import POSTGRES_CONNECT_TIMEOUT_S
    from credex.db.models import MessageState
    from credex.points.rules import USER_ID_MAX

    text = {str, str | None}
    plain = {name for name, field in Settings.model_fields.items() if field.annotation in text}
    secret = {name for name, field in Settings.model_fields.items() if "SecretStr" in str(field.annotation)}
    assert set(Settings.model_fields) - plain - secret == quick.CHECKED_SETTINGS
    assert Settings.model_fields["database_url"].default == quick.DEFAULT_DATABASE_URL
    assert quick.POSTGRES_CONNECT_TIMEOUT_S == POSTGRES_CONNECT_TIMEOUT_S
    assert tuple(state.value for state in MessageState) == quick.MESSAGE_STATES
    assert USER_ID_MAX >= 64  # every id the quick path takes fits the column
