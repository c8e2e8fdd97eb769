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
