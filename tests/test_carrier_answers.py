"""Carrier answers that must change nothing, through the CLI against a real local HTTP server that
stands in for the carrier (generic or kuaidi100): `track sync` records what an answer says only
when it is an answer credex can trust (on SQLite and on Postgres), and `track` prints no secret a
carrier quotes back."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

import pytest

from credex.db.engine import session_for
from credex.db.models import utcnow
from credex.relay.answers import Confirmation, record_confirmations
from tests.support import run_process, subprocess_env

KUAIDI100_KEY = "kd100-KEY-TOPSECRET"
KUAIDI100_CUSTOMER = "CUST4242"

# (method, path, request body) -> (HTTP status, JSON document)
Reply = Callable[[str, str, bytes], tuple[int, dict]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.command, self.path))  # type: ignore[attr-defined]
        status, document = self.server.reply(self.command, self.path, body)  # type: ignore[attr-defined]
        raw = json.dumps(document, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = _answer

    def log_message(self, *_args: object) -> None:
        pass


class StandIn:
    """A carrier on a real socket: every request is answered by ``reply``, and recorded in ``seen``."""

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.seen = []  # type: ignore[attr-defined]
        self._server.reply = lambda *_: (500, {})  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def seen(self) -> list[tuple[str, str]]:
        return self._server.seen  # type: ignore[attr-defined]

    def answer(self, reply: Reply) -> None:
        self._server.reply = reply  # type: ignore[attr-defined]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    try:
        yield server
    finally:
        server.close()


def kuaidi100_env(stand_in: StandIn) -> dict[str, str]:
    return {
        "CREDEX_LOGISTICS_PROVIDER": "kuaidi100",
        "CREDEX_LOGISTICS_URL": stand_in.url,
        "CREDEX_KUAIDI100_CUSTOMER": KUAIDI100_CUSTOMER,
        "CREDEX_KUAIDI100_KEY": KUAIDI100_KEY,
    }


def kuaidi100_reply(state: str, **change: object) -> Reply:
    """kuaidi100's success for whichever parcel is asked (its ``com`` and ``nu`` echoed), in ``state``."""

    def reply(_method: str, _path: str, body: bytes) -> tuple[int, dict]:
        param = json.loads(parse_qs(body.decode())["param"][0])
        document = {
            "message": "ok",
            "status": "200",
            "com": param["com"],
            "nu": param["num"],
            "ischeck": "0",
            "state": state,
            "condition": "F00",
            "data": [{"time": "2026-11-24 18:30:00", "context": "退回中", "statusCode": state}],
        }
        return 200, {**document, **change}

    return reply


def generic_reply(status: str, **change: object) -> Reply:
    """The generic contract's tracking of whichever parcel is asked (echoed), in ``status``."""

    def reply(_method: str, path: str, _body: bytes) -> tuple[int, dict]:
        carrier, number = (unquote(part) for part in path.split("?")[0].split("/")[3:5])
        point = {"time": "2026-11-24T12:00:00Z", "status": status, "message": "back", "location": "Hub"}
        document = {
            "tracking_number": number,
            "carrier": carrier,
            "status": status,
            "updated_at": "2026-11-24T12:00:00Z",
            "checkpoints": [point],
        }
        return 200, {**document, **change}

    return reply


@pytest.fixture
def shipped(credex, db_url) -> Callable[..., int]:
    """A redemption on its way (status `shipping`) with the given waybill; u1 keeps 90 points."""
    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "5").exit_code == 0
    assert credex("award", "grant", "u1", "100", "--reason", "opening", "--ref", "open-u1").exit_code == 0

    def ship(carrier: str, express_no: str) -> int:
        created = credex("redeem", "create", "u1", "MUG", "--address", "1 High St", "--json").json()
        with session_for(db_url, write=True) as session:
            record_confirmations(
                session, [Confirmation(created["message_id"], carrier, express_no)], now=utcnow()
            )
            session.commit()
        return created["redemption_id"]

    return ship


def report(**counts: int) -> dict[str, int]:
    """`track sync --json`: every count 0 but those given."""
    return dict.fromkeys(("checked", "delivered", "returned", "unchanged", "skipped", "failed"), 0) | counts


def still_on_its_way(credex, redemption_id: int, delivery_status: str | None) -> None:
    shown = credex("redeem", "show", redemption_id, "--json").json()
    assert (shown["status"], shown["delivery_status"]) == ("shipping", delivery_status)
    assert credex("account", "show", "u1", "--json").json()["balance"] == 90
    assert credex("catalog", "list", "--json").json()[0]["stock"] == 4
    history = credex("account", "history", "u1", "--json").json()
    assert not [entry for entry in history if entry["kind"] == "redemption_refund"]


def test_a_kuaidi100_sub_state_of_a_return_it_does_not_list_refunds_nothing(credex, shipped, stand_in):
    redemption_id = shipped("yuantong", "YT9693083639795")
    stand_in.answer(kuaidi100_reply("402"))
    done = credex("track", "sync", "--json", env=kuaidi100_env(stand_in))
    assert done.exit_code == 0, done.stderr
    assert done.json() == report(checked=1, unchanged=1)
    still_on_its_way(credex, redemption_id, "exception")
    assert len(stand_in.seen) == 1


@pytest.mark.parametrize(
    "change",
    [{"tracking_number": "SIM0000000002"}, {"carrier": "zto"}, {"tracking_number": None}],
    ids=["other-number", "other-carrier", "no-number"],
)
def test_a_return_about_another_parcel_refunds_nothing_and_track_says_why(credex, shipped, stand_in, change):
    """The audit's case: the carrier answers about another parcel that did come back; the gift asked
    about is still on its way."""
    redemption_id = shipped("sandbox", "SIM0000000001")
    stand_in.answer(generic_reply("returned", **change))
    env = {"CREDEX_LOGISTICS_URL": stand_in.url}
    done = credex("track", "sync", "--json", env=env)
    assert done.exit_code == 0, done.stderr
    assert done.json() == report(failed=1)
    still_on_its_way(credex, redemption_id, None)

    for args in ([redemption_id, "--fresh"], ["--express-no", "SIM0000000001"]):
        asked = credex("track", *args, "--json", env=env)
        error = json.loads(asked.stderr)["error"]
        assert asked.exit_code == 1 and asked.stdout == "" and error["code"] == "invalid_carrier_answer"
        assert "another parcel" in error["message"] or "missing" in error["message"]
    still_on_its_way(credex, redemption_id, None)
    assert [path for _method, path in stand_in.seen] == ["/v1/trackings/sandbox/SIM0000000001"] * 3


def test_the_same_parcel_echoed_as_asked_is_still_refunded_once(credex, shipped, stand_in):
    redemption_id = shipped("sandbox", "SIM0000000001")
    stand_in.answer(generic_reply("returned"))
    done = credex("track", "sync", "--json", env={"CREDEX_LOGISTICS_URL": stand_in.url})
    assert done.exit_code == 0 and done.json() == report(checked=1, returned=1)
    assert credex("redeem", "show", redemption_id, "--json").json()["status"] == "returned"
    assert credex("account", "show", "u1", "--json").json()["balance"] == 100


@pytest.mark.parametrize(
    "change",
    [{"nu": "YT9693083639796"}, {"com": "zhongtong"}, {"status": "201", "message": "单号不存在或者已经过期"}],
    ids=["other-number", "other-carrier", "not-a-success"],
)
def test_a_kuaidi100_return_that_is_not_a_success_about_the_parcel_refunds_nothing(
    credex, shipped, stand_in, change
):
    redemption_id = shipped("yuantong", "YT9693083639795")
    stand_in.answer(kuaidi100_reply("4", **change))
    done = credex("track", "sync", "--json", env=kuaidi100_env(stand_in))
    assert done.exit_code == 0, done.stderr
    assert done.json() == report(failed=1)
    still_on_its_way(credex, redemption_id, None)


def test_a_key_the_carrier_quotes_back_is_not_printed_by_track(stand_in):
    """The audit's case, as a real process: a 400 whose words quote the API key printed it whole."""
    key = "GENERICSECRET77"
    words = f"the api_key {key} may not track parcels of this account"
    stand_in.answer(lambda *_: (400, {"error": {"code": "invalid_request", "message": words}}))
    env = subprocess_env(CREDEX_LOGISTICS_URL=stand_in.url, CREDEX_LOGISTICS_API_KEY=key)
    as_json = run_process("track", "--express-no", "SIM0000000001", "--json", env=env)
    as_text = run_process("track", "--express-no", "SIM0000000001", env=env)
    error = json.loads(as_json.stderr)["error"]
    assert as_json.exit_code == as_text.exit_code == 1 and error["code"] == "carrier_rejected"
    assert "the api_key *** may not track" in error["message"]
    assert as_text.stderr.startswith("error: ") and "the api_key *** may not track" in as_text.stderr
    for outcome in (as_json, as_text):
        assert key not in outcome.stdout + outcome.stderr


def test_a_key_kuaidi100_quotes_back_is_not_printed_by_track(stand_in):
    key = "SUPERSECRETKEY99"
    stand_in.answer(lambda *_: (200, {"result": False, "returnCode": "601", "message": f"key {key} expired"}))
    env = subprocess_env(**(kuaidi100_env(stand_in) | {"CREDEX_KUAIDI100_KEY": key}))
    done = run_process("track", "--express-no", "YT9693083639795", "--carrier", "yuantong", "--json", env=env)
    error = json.loads(done.stderr)["error"]
    assert done.exit_code == 1 and "key *** expired" in error["message"]
    assert key not in done.stdout + done.stderr
