"""Usage errors: exit 2 and one line on stderr; with --json, the error in JSON like any other."""

import json

import pytest

from tests.support import run_process


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["award", "grant", "--json"], "invalid_input", "Missing argument"),
        (["redeem", "list", "--limit", "0", "--json"], "invalid_input", "--limit"),
        (["--json", "account", "show"], "usage", "No such option: --json"),
        (["account", "show", "u1", "--bogus", "--json"], "usage", "No such option: --bogus"),
        (["nosuch", "--json"], "usage", "No such command 'nosuch'"),
        (["redeem", "cancel", "1", "--reason", "x", "--wait", "inf", "--json"], "invalid_input", "--wait"),
    ],
)
def test_a_usage_error_under_json_is_one_json_document_on_stderr(tmp_path, args, code, words):
    result = run_process("--database-url", f"sqlite:///{tmp_path / 'x.db'}", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    error = json.loads(result.stderr)["error"]
    assert error["code"] == code
    assert words in error["message"] and "--help" in error["message"]
    assert not (tmp_path / "x.db").exists(), "a usage error must not create the database"


def test_without_json_a_usage_error_shows_the_usage():
    result = run_process("award", "grant")
    assert result.exit_code == 2
    assert result.stderr.startswith("Usage: credex award grant")
    assert "Missing argument" in result.stderr and result.stdout == ""


def test_after_a_double_dash_json_is_an_argument_not_the_flag(tmp_path):
    result = run_process("--database-url", f"sqlite:///{tmp_path / 'x.db'}", "award", "grant", "--", "--json")
    assert result.exit_code == 2
    assert result.stderr.startswith("Usage:")


def test_a_double_dash_given_as_an_option_value_does_not_hide_json(tmp_path):
    # `--reason --`: the reason is "--"; the --json after it is still the flag, so the usage
    # error (the points are missing) comes as JSON.
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = run_process("--database-url", url, "award", "grant", "u1", "--reason", "--", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "invalid_input" and "Missing argument 'points'" in error["message"]


# --- long values: the message quotes them cut short, and hiding passwords in it costs its length --


@pytest.mark.parametrize(
    "args",
    [
        ["redeem", "list", "--status", "s" * 100_000],
        ["relay", "list", "--state", "s" * 100_000],
        ["audit", "verify", "--warehouse-database-url", "w" * 100_000],
    ],
    ids=["status", "state", "warehouse-url"],
)
def test_a_value_of_100000_characters_is_refused_in_one_short_line(tmp_path, args):
    """These took minutes of CPU (finding passwords in the message grew with the square of its
    length) and printed the whole value back."""
    assert run_process("--database-url", f"sqlite:///{tmp_path / 'x.db'}", "db", "upgrade").exit_code == 0
    result = run_process("--database-url", f"sqlite:///{tmp_path / 'x.db'}", *args, "--json", timeout=60)
    assert result.exit_code == 2, result.stderr[:300]
    assert result.stderr.count("\n") == 1
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "invalid_input"
    assert len(error["message"]) < 300 and "(100000 characters)" in error["message"], error


def test_a_bulk_header_of_long_names_is_refused_naming_them_cut_short(tmp_path):
    names = tmp_path / "header.csv"
    names.write_text(",".join(["x" * 130_000] * 6) + "\n")
    result = run_process(
        "--database-url", f"sqlite:///{tmp_path / 'x.db'}", "award", "bulk", str(names), timeout=60
    )
    assert result.exit_code == 2, result.stderr[:300]
    assert result.stderr.count("\n") == 1 and len(result.stderr) < 1000, result.stderr[:300]
    assert "has no user_id,points,ref" in result.stderr and "(130000 characters)" in result.stderr


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("cannot reach amqp://guest:guest@mq:5672/%2F", "cannot reach amqp://guest:***@mq:5672/%2F"),
        # An "@" in the password, not percent-encoded: hidden whole, not up to its first "@".
        ("postgresql://shop:pa@ss@db:5432/points", "postgresql://shop:***@db:5432/points"),
        ("'sqlite:///x.db', 'redis://:pw@cache/0'", "'sqlite:///x.db', 'redis://:***@cache/0'"),
        ("amqp://u:p1@n1,amqp://u:p2@n2/%2F", "amqp://u:***@n1,amqp://u:***@n2/%2F"),
        ("amqp://guest@mq:5672/ and a:b@c", "amqp://guest@mq:5672/ and a:b@c"),  # no password
        ("password=hunter2 token=abc Bearer xyz", "password=*** token=*** Bearer ***"),
    ],
)
def test_passwords_are_hidden_in_free_text(text, shown):
    from credex.errors import redact

    assert redact(text) == shown


def test_hiding_passwords_in_a_long_text_finds_every_one():
    from credex.errors import redact

    many = " ".join(f"amqp://u:secret{i}@h{i}" for i in range(20_000)) + " " + "x://y:" * 50_000
    shown = redact(many)
    assert "secret" not in shown and shown.count("u:***@h") == 20_000


# --- output that cannot be written: exit 2, one line, and the change it reports is kept ---------


def _to_dev_full(url: str, *args: str) -> tuple[int, str]:
    import subprocess

    from tests.support import credex_command, subprocess_env

    with open("/dev/full", "w") as full:
        done = subprocess.run(
            credex_command("--database-url", url, *args),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
            timeout=60,
        )
    return done.returncode, done.stderr


@pytest.mark.parametrize("as_json", [True, False])
def test_a_result_that_cannot_be_written_is_exit_2_and_the_grant_it_reports_stays(tmp_path, as_json):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    flag = ["--json"] if as_json else []
    code, stderr = _to_dev_full(url, "award", "grant", "u1", "5", "--reason", "r", "--ref", "g1", *flag)
    assert code == 2, stderr
    assert stderr.count("\n") == 1
    message = json.loads(stderr)["error"]["message"] if as_json else stderr.removeprefix("error: ")
    assert "No space left on device" in message and "stays committed" in message
    if as_json:
        assert json.loads(stderr)["error"]["code"] == "io_error"
    # the grant was committed before its result could not be printed: a repeat is a duplicate
    again = run_process(
        "--database-url", url, "award", "grant", "u1", "5", "--reason", "r", "--ref", "g1", "--json"
    )
    assert again.exit_code == 0 and json.loads(again.stdout)["duplicate"] is True
    # the read-only fast path (account show) says the same
    code, stderr = _to_dev_full(url, "account", "show", "u1", *flag)
    assert code == 2 and "No space left on device" in stderr and stderr.count("\n") == 1


# --- a URL that is not well formed is still shown without its password ----------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("CREDEX_AMQP_URL", "guest:S3cretPW@127.0.0.1"),
        ("CREDEX_AMQP_URL", "amqp:/guest:S3cretPW@127.0.0.1"),
        ("CREDEX_AMQP_URL", "amqp//guest:S3cretPW@127.0.0.1"),
        ("CREDEX_AMQP_URL", "amqp://guest:guest@127.0.0.1,other:S3cretPW@127.0.0.1:5673"),
        ("CREDEX_DATABASE_URL", "postgres:S3cretPW@127.0.0.1:5432/x"),
        ("CREDEX_DATABASE_URL", "postgresql:/u:S3cretPW@h/x"),
        ("CREDEX_DATABASE_URL", "u:S3cretPW@host/db"),
    ],
)
@pytest.mark.parametrize(
    "command", [("relay", "run", "--once", "--json"), ("warehouse", "run", "--once", "--log-format", "json")]
)
def test_a_malformed_url_is_refused_without_showing_its_password(tmp_path, setting, value, command):
    from tests.support import subprocess_env

    env = subprocess_env(CREDEX_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}", CREDEX_AMQP_PREFIX="nowhere.")
    env[setting] = value
    result = run_process(*command, env=env)
    assert result.exit_code == 2, result.stderr
    assert "S3cretPW" not in result.stdout + result.stderr
    assert ":***@" in result.stderr, result.stderr


@pytest.mark.parametrize("worker", ["relay", "warehouse"])
def test_with_json_logs_the_final_error_line_is_json_too(tmp_path, worker):
    """--log-format json promises one JSON object per line on stderr: the error a worker stops
    with (here, its metrics port taken) was the one plain `error:` line."""
    import socket

    from tests.support import subprocess_env

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = subprocess_env(
            CREDEX_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}", CREDEX_AMQP_PREFIX="nowhere."
        )
        result = run_process(worker, "run", "--once", "--metrics-port", port, "--log-format", "json", env=env)
    assert result.exit_code == 2, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines and "Address already in use" in lines[-1]["error"]["message"]


def test_a_rejects_file_beside_a_database_url_that_is_none_is_exit_2_not_70(tmp_path):
    grants = tmp_path / "grants.csv"
    grants.write_text("user_id,points,ref\nu1,5,r1\n")
    result = run_process(
        "--database-url", "sqlite:", "award", "bulk", grants, "--rejects", tmp_path / "rejects.csv", "--json"
    )
    assert result.exit_code == 2, result.stderr
    assert json.loads(result.stderr)["error"]["message"] == "not a database URL: 'sqlite:'"


def test_secrets_are_hidden_by_value_in_any_case_when_long_enough_to_be_told_from_words():
    from credex.errors import SECRET_MIN_LENGTH, redact, secret_pattern

    secrets = secret_pattern("SECRETKEY99", "CUST4242", None, "", "short7x")
    assert SECRET_MIN_LENGTH == 8 and secret_pattern("short7x", None) is None
    said = "key SecretKey99 of CUST4242 expired; short7x left; key=abc"
    assert redact(said, secrets) == "key *** of *** expired; short7x left; key=***"
    # The longer of two that overlap is hidden whole.
    assert redact("ABCDEFGH-IJ", secret_pattern("ABCDEFGH", "ABCDEFGH-IJ")) == "***"
    assert redact(said) == "key SecretKey99 of CUST4242 expired; short7x left; key=***"
