"""`credex track`: where is my gift, asked of the sandbox carrier over real sockets, by express
number or by redemption, with faults, a carrier that is down, and time moving on."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.sandbox import running_sandbox
from tests.support import Outcome, run_process, subprocess_env

API_KEY = "sbx-live-TOPSECRET-99"


@pytest.fixture
def cli(tmp_path):
    """credex through CliRunner, for commands that touch no database."""
    from typer.testing import CliRunner

    from credex.cli import app

    runner = CliRunner()

    def run(*args: object, env: dict[str, str] | None = None) -> Outcome:
        result = runner.invoke(
            app,
            ["--database-url", f"sqlite:///{tmp_path / 'unused.db'}", *map(str, args)],
            env=env,
            catch_exceptions=False,
        )
        return Outcome(result.exit_code, result.stdout, result.stderr)

    return run


def carrier_env(sandbox, **extra: str) -> dict[str, str]:
    return {"CREDEX_LOGISTICS_URL": sandbox.url, **extra}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- by express number --------------------------------------------------------------------------


def test_track_by_express_number_prints_the_contract_json(cli, carrier_sandbox):
    waybill = carrier_sandbox.create_shipment("redemption-1")
    result = cli(
        "track", "--express-no", waybill["tracking_number"], "--json", env=carrier_env(carrier_sandbox)
    )
    assert result.exit_code == 0, result.stderr
    assert result.json() == {
        "redemption_id": None,
        "express_no": waybill["tracking_number"],
        "carrier": "sandbox",
        "status": "info_received",
        "checkpoints": [
            {
                "time": waybill["created_at"],
                "status": "info_received",
                "message": "Shipment information received",
                "location": "Sandbox warehouse",
            }
        ],
    }


def test_the_timeline_shows_the_header_and_checkpoints_newest_first(cli, carrier_sandbox):
    number = carrier_sandbox.create_shipment("redemption-1", address="8 Long Road, Hangzhou")[
        "tracking_number"
    ]
    carrier_sandbox.advance(3 * 60)
    result = cli("track", "--express-no", number, "--carrier", "sandbox", env=carrier_env(carrier_sandbox))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{number}  carrier sandbox  delivered"
    points = [line for line in lines[1:] if "●" in line or "○" in line]
    assert [line.split()[2] for line in points] == [
        "delivered",
        "out_for_delivery",
        "in_transit",
        "info_received",
    ]
    assert points[0].lstrip().startswith("●") and points[0].endswith("8 Long Road, Hangzhou")
    assert all(line == line.rstrip() for line in lines)


def test_track_by_express_number_creates_no_database(cli, carrier_sandbox, tmp_path):
    """It looks the number up among the redemptions, but a database that does not exist has none:
    no credex.db is left behind wherever someone tracks a parcel."""
    number = carrier_sandbox.create_shipment("redemption-1")["tracking_number"]
    result = cli("track", "--express-no", number, "--json", env=carrier_env(carrier_sandbox))
    assert result.exit_code == 0 and result.json()["redemption_id"] is None
    assert not (tmp_path / "unused.db").exists()


def test_track_runs_as_a_real_process(carrier_sandbox):
    number = carrier_sandbox.create_shipment("redemption-1")["tracking_number"]
    carrier_sandbox.advance(60)
    result = run_process("track", "--express-no", number, "--json", env=carrier_sandbox.env())
    assert result.exit_code == 0, result.stderr
    document = result.json()
    assert document["status"] == "in_transit" and len(document["checkpoints"]) == 2
    assert [point["status"] for point in document["checkpoints"]] == ["in_transit", "info_received"]


def test_the_status_follows_the_sandbox_clock(cli, carrier_sandbox):
    number = carrier_sandbox.create_shipment("redemption-1")["tracking_number"]
    env = carrier_env(carrier_sandbox)
    seen = []
    for _ in range(4):
        seen.append(cli("track", "--express-no", number, "--json", env=env).json()["status"])
        carrier_sandbox.advance(60)
    assert seen == ["info_received", "in_transit", "out_for_delivery", "delivered"]


def test_an_unknown_parcel_exits_1(cli, carrier_sandbox):
    result = cli("track", "--express-no", "SIM0000000404", "--json", env=carrier_env(carrier_sandbox))
    assert result.exit_code == 1 and result.stdout == ""
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "unknown_parcel" and "SIM0000000404" in error["message"]


# --- faults and a carrier that is down -----------------------------------------------------------


def test_injected_faults_are_retried_until_the_answer_comes():
    with running_sandbox("--faults", "503,429,drop", "--retry-after", "1") as sandbox:
        number = sandbox.create_shipment("redemption-1")["tracking_number"]
        started = time.monotonic()
        result = run_process("track", "--express-no", number, "--json", env=sandbox.env())
        elapsed = time.monotonic() - started
        seen = sandbox.requests()
    assert result.exit_code == 0, result.stderr
    assert result.json()["express_no"] == number and result.json()["status"] == "info_received"
    # A 503, a 429 (Retry-After: 1), a dropped connection, then the carrier's answer.
    assert seen["faults"] == {"503": 1, "429": 1, "drop": 1} and seen["by_route"] == {"GET /v1/trackings": 4}
    assert elapsed >= 1.0  # the Retry-After was waited


def test_the_warehouse_gets_its_waybill_past_faults_and_track_finds_it(cli):
    from credex.config import Settings
    from credex.logistics import carrier_client

    with running_sandbox("--faults", "503,drop,503,429") as sandbox:
        with carrier_client(Settings(logistics_url=sandbox.url)) as client:
            waybill = client.create_shipment(
                idempotency_key="redemption-1",
                order_ref="redemption-1",
                recipient={"name": "u-1001", "phone": "", "address": "8 Long Road"},
                items=[{"sku": "SHAMPOO-500", "quantity": 1}],
            )
        result = cli("track", "--express-no", waybill.express_no, "--json", env=carrier_env(sandbox))
        seen = sandbox.requests()
        [parcel] = sandbox.shipments()
    assert result.exit_code == 0, result.stderr
    assert result.json()["status"] == "info_received"
    assert seen["faults"] == {"503": 2, "drop": 1, "429": 1}
    assert seen["by_route"] == {"POST /v1/shipments": 5, "GET /v1/trackings": 1}
    assert parcel["create_calls"] == 1  # the faulted attempts never reached the carrier's books


def test_a_slow_answer_is_abandoned_and_asked_again():
    with running_sandbox("--faults", "slow", "--slow-seconds", "30") as sandbox:
        env = sandbox.env(CREDEX_LOGISTICS_READ_TIMEOUT="0.5")
        started = time.monotonic()
        result = run_process("track", "--express-no", "SIM0000000001", "--json", env=env)
        elapsed = time.monotonic() - started
        seen = sandbox.requests()
    assert result.exit_code == 1 and "unknown_parcel" in result.stderr  # answered, on the second try
    assert seen["faults"] == {"slow": 1} and seen["total"] == 2
    assert elapsed < 15


def test_a_carrier_that_is_down_gives_exit_69_within_the_bound():
    env = subprocess_env(
        CREDEX_LOGISTICS_URL=f"http://127.0.0.1:{free_port()}", CREDEX_LOGISTICS_TOTAL_TIMEOUT="2"
    )
    started = time.monotonic()
    result = run_process("track", "--express-no", "SIM0000000001", env=env)
    elapsed = time.monotonic() - started
    assert result.exit_code == 69, result.stderr
    assert result.stderr.startswith("error: the carrier at http://127.0.0.1:")
    assert "within 2 s" in result.stderr and "connection refused" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert elapsed < 10


def test_a_carrier_that_only_answers_503_gives_exit_69_after_retrying(cli):
    with running_sandbox("--unavailable-share", "1") as sandbox:
        env = carrier_env(sandbox, CREDEX_LOGISTICS_TOTAL_TIMEOUT="2")
        result = cli("track", "--express-no", "SIM0000000001", "--json", env=env)
        seen = sandbox.requests()
    assert result.exit_code == 69
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "unavailable" and "HTTP 503" in error["message"]
    assert seen["total"] >= 2 and seen["faults"] == {"503": seen["total"]}


# --- configuration, usage and secrets ---------------------------------------------------------


TIMEOUTS = (
    "CREDEX_LOGISTICS_TOTAL_TIMEOUT",
    "CREDEX_LOGISTICS_CONNECT_TIMEOUT",
    "CREDEX_LOGISTICS_READ_TIMEOUT",
)
NOT_A_TIMEOUT = ("inf", "Infinity", "-inf", "nan", "1e3", "1_0", "１０", "", "-1", "0", "3601")


def test_a_carrier_timeout_that_is_no_plain_number_of_seconds_is_bad_usage_before_any_call(
    cli, carrier_sandbox
):
    """CREDEX_LOGISTICS_TOTAL_TIMEOUT=inf (or Infinity) made `track` wait for ever for a carrier that
    is down instead of exit 69; 1e3 and 1_0 were taken as numbers. Numbers are ASCII digits (cli.md),
    and a timeout is more than 0 and at most an hour."""
    for name in TIMEOUTS:
        for value in NOT_A_TIMEOUT:
            env = carrier_env(carrier_sandbox, **{name: value})
            result = cli("track", "--express-no", "SIM0000000001", "--json", env=env)
            assert result.exit_code == 2 and result.stdout == "", (name, value, result.stderr)
            error = json.loads(result.stderr)["error"]
            assert error["code"] == "invalid_input" and error["message"].startswith(f"{name}: "), error
            assert value not in ("inf", "1e3") or "ASCII digits" in error["message"]
    assert carrier_sandbox.requests()["total"] == 0  # said before anything was asked
    env = carrier_env(carrier_sandbox, **(dict.fromkeys(TIMEOUTS, "3600") | {TIMEOUTS[2]: " 2.5 "}))
    assert cli("track", "--express-no", "SIM0000000001", env=env).exit_code == 1  # asked: no such parcel
    assert carrier_sandbox.requests()["total"] == 1


def test_without_a_carrier_track_says_how_to_start_the_sandbox(cli):
    result = cli("track", "--express-no", "SIM0000000001")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no carrier API is configured")
    assert (
        "credex logistics sandbox" in result.stderr
        and "CREDEX_LOGISTICS_URL=http://127.0.0.1:8700" in result.stderr
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "give a REDEMPTION_ID or --express-no"),
        (["3", "--express-no", "SIM0000000001"], "not both"),
        (["3", "--carrier", "sandbox"], "--carrier goes with --express-no"),
        (["--express-no", "SIM 1"], "not an express number"),
        (["--express-no", "SIM1", "--carrier", "../x"], "not a carrier code"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(cli, args, words):
    result = cli("track", *args, env={"CREDEX_LOGISTICS_URL": "http://127.0.0.1:9"})
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


HOSTILE = {
    "unit-separator": "SIM1\x1f",  # whitespace to str.strip(), a control character all the same
    "newline": "SIM1\nerror: forged",
    "nul": "SIM\x001",
    "del": "SIM1\x7f",
    "c1": "SIM1\x85",
    "bidi-override": "SIM\u202e1",
    "bidi-isolate": "\u2066SIM1",
    "tab": "SIM\t1",
    "full-width": "ＳＩＭ１",
    "overlong": "S" * 65,
    "very-long": "S" * 100_000,
    "empty": "",
}


@pytest.mark.parametrize("option", ["--express-no", "--carrier"])
@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_express_number_or_carrier_is_refused_naming_the_field(cli, option, value):
    args = (
        ["--express-no", value] if option == "--express-no" else ["--express-no", "SIM1", "--carrier", value]
    )
    result = cli("track", *args, env={"CREDEX_LOGISTICS_URL": "http://127.0.0.1:9"})
    assert result.exit_code == 2 and result.stdout == ""  # refused before any carrier is asked
    assert result.stderr.startswith(f"error: {option} is not ")
    assert len(result.stderr.splitlines()) == 1 and len(result.stderr) < 300
    assert not any(char in result.stderr for char in "\x00\x1f\x7f\x85\u202e\u2066\t")
    as_json = cli("track", *args, "--json", env={"CREDEX_LOGISTICS_URL": "http://127.0.0.1:9"})
    error = json.loads(as_json.stderr)["error"]
    assert as_json.exit_code == 2 and error["code"] == "invalid_input" and option in error["message"]


def test_plain_spaces_around_an_express_number_are_forgiven():
    from credex.logistics.tracking import check_carrier_code, check_express_no

    assert check_express_no("  SF1234-5 ") == "SF1234-5" and check_carrier_code(" shunfeng ") == "shunfeng"
    assert check_express_no("S" * 64) == "S" * 64


def test_the_api_key_is_sent_and_never_shown():
    with running_sandbox(env={"CREDEX_LOGISTICS_API_KEY": API_KEY}) as sandbox:
        number = sandbox.create_shipment("redemption-1")["tracking_number"]
        wrong = run_process(
            "track", "--express-no", number, env=sandbox.env(CREDEX_LOGISTICS_API_KEY="nope-123")
        )
        missing = run_process("track", "--express-no", number, "--json", env=sandbox.env())
        right = run_process(
            "track", "--express-no", number, "--json", env=sandbox.env(CREDEX_LOGISTICS_API_KEY=API_KEY)
        )
    assert (
        wrong.exit_code == 1 and "CREDEX_LOGISTICS_API_KEY" in wrong.stderr and "nope-123" not in wrong.stderr
    )
    assert missing.exit_code == 1 and json.loads(missing.stderr)["error"]["code"] == "carrier_rejected"
    assert right.exit_code == 0 and right.json()["express_no"] == number
    for outcome in (wrong, missing, right):
        assert API_KEY not in outcome.stdout + outcome.stderr


# --- by redemption ------------------------------------------------------------------------------


@pytest.fixture
def shop(credex):
    credex("catalog", "add", "SHAMPOO-500", "--name", "Shampoo", "--points", "20000")
    credex("award", "grant", "u-1001", "50000", "--reason", "opening balance")
    return credex


def redeem(shop) -> int:
    result = shop("redeem", "create", "u-1001", "SHAMPOO-500", "--address", "8 Long Road", "--json")
    assert result.exit_code == 0, result.stderr
    return result.json()["redemption_id"]


def ship(db_url: str, redemption_id: int, carrier: str, express_no: str) -> None:
    """What the relay does when the warehouse confirms: the waybill copied onto the redemption."""
    from sqlalchemy import text

    from credex.db.engine import get_engine

    with get_engine(db_url).begin() as connection:
        connection.execute(
            text(
                "UPDATE redemption SET carrier = :carrier, express_no = :express_no, status = 'shipping' "
                "WHERE id = :id"
            ),
            {"carrier": carrier, "express_no": express_no, "id": redemption_id},
        )
        connection.execute(
            text("UPDATE outbox_message SET state = 'confirmed' WHERE redemption_id = :id"),
            {"id": redemption_id},
        )


def set_message_state(db_url: str, redemption_id: int, state: str) -> None:
    from sqlalchemy import text

    from credex.db.engine import get_engine

    with get_engine(db_url).begin() as connection:
        connection.execute(
            text("UPDATE outbox_message SET state = :state WHERE redemption_id = :id"),
            {"state": state, "id": redemption_id},
        )


def test_track_a_redemption_once_its_waybill_is_recorded(shop, db_url, carrier_sandbox):
    redemption_id = redeem(shop)
    waybill = carrier_sandbox.create_shipment(f"redemption-{redemption_id}")
    ship(db_url, redemption_id, waybill["carrier"], waybill["tracking_number"])
    carrier_sandbox.advance(2 * 60)
    env = carrier_env(carrier_sandbox)

    document = shop("track", str(redemption_id), "--json", env=env)
    assert document.exit_code == 0, document.stderr
    assert document.json()["redemption_id"] == redemption_id
    assert document.json()["express_no"] == waybill["tracking_number"]
    assert document.json()["status"] == "out_for_delivery"

    table = shop("track", str(redemption_id), env=env)
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0] == (
        f"{waybill['tracking_number']}  carrier sandbox  out_for_delivery  (redemption {redemption_id})"
    )


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ("pending", "its message is pending (not yet delivered to the warehouse)"),
        ("sent", "its message was sent to the warehouse, which has not confirmed a waybill yet"),
        (
            "dead",
            "its message is dead (delivery was given up: see `credex relay list --state dead`, "
            "then `credex relay retry`)",
        ),
    ],
)
def test_a_redemption_without_an_express_number_says_where_it_stands(shop, db_url, state, words):
    redemption_id = redeem(shop)
    if state != "pending":
        set_message_state(db_url, redemption_id, state)
    # No carrier is configured: the answer comes from the database alone.
    result = shop("track", str(redemption_id))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == f"error: redemption {redemption_id} has no express number yet: {words}\n"
    as_json = shop("track", str(redemption_id), "--json")
    error = json.loads(as_json.stderr)["error"]
    assert as_json.exit_code == 1 and error["code"] == "not_shipped" and words in error["message"]


def test_an_unknown_redemption_exits_1(shop):
    result = shop("track", "999", "--json")
    assert result.exit_code == 1 and json.loads(result.stderr)["error"]["code"] == "unknown_redemption"


def test_track_by_redemption_as_a_real_process(shop, db_url, carrier_sandbox):
    redemption_id = redeem(shop)
    waybill = carrier_sandbox.create_shipment(f"redemption-{redemption_id}")
    ship(db_url, redemption_id, "sandbox", waybill["tracking_number"])
    result = run_process(
        "--database-url", db_url, "track", redemption_id, "--json", env=carrier_sandbox.env()
    )
    assert result.exit_code == 0, result.stderr
    assert result.json()["redemption_id"] == redemption_id and result.json()["status"] == "info_received"
