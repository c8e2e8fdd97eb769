"""`track sync` against the sandbox carrier: delivered parcels make their redemptions
`delivered`, returned ones `returned` and refunded once; no express number is asked about twice
within CREDEX_TRACK_MIN_INTERVAL, even by two runs at once; `track REDEMPTION_ID` answers from the
stored status while it is fresh. On SQLite and on Postgres."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from urllib.parse import parse_qs

import pytest

from credex.db.engine import session_for
from credex.db.models import utcnow
from credex.logistics import CarrierKeyRefused
from credex.relay.answers import Confirmation, record_confirmations
from tests.sandbox import running_sandbox
from tests.support import credex_command, subprocess_env

TRACKINGS = "GET /v1/trackings"


SANDBOX_KEY = "sbx-sync-TOPSECRET-1"


@pytest.fixture
def sandbox(request):
    """The sandbox carrier; ``indirect`` parametrization passes {"key": its API key, "args": [options]}."""
    options = getattr(request, "param", {})
    key = options.get("key")
    env = None if key is None else {"CREDEX_LOGISTICS_API_KEY": key}
    with running_sandbox(*options.get("args", ()), env=env) as running:
        yield running


@pytest.fixture
def ship(db_url, credex, sandbox):
    """Redemptions the warehouse shipped: a sandbox parcel each, its waybill recorded by the relay."""
    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "20").exit_code == 0
    assert credex("award", "grant", "u1", "1000", "--reason", "opening", "--ref", "open-u1").exit_code == 0

    def ship_one() -> dict:
        created = credex("redeem", "create", "u1", "MUG", "--address", "1 High St", "--json").json()
        parcel = sandbox.create_shipment(created["message_id"], address="1 High St", sku="MUG")
        with session_for(db_url, write=True) as session:
            record_confirmations(
                session,
                [Confirmation(created["message_id"], "sandbox", parcel["tracking_number"])],
                now=utcnow(),
            )
            session.commit()
        return created | {"parcel": parcel}

    return ship_one


def trackings(sandbox) -> int:
    return sandbox.requests()["by_route"].get(TRACKINGS, 0)


def delivery_rows(db_url: str) -> dict[int, dict]:
    """Each redemption's status, delivery status and claim, by id."""
    from sqlalchemy import select

    from credex.db import tables

    r = tables.redemption
    with session_for(db_url) as session:
        rows = session.execute(select(r.c.id, r.c.status, r.c.delivery_status, r.c.delivery_asked_at))
        return {row.id: row._asdict() for row in rows}


def test_sync_records_delivered_and_returned_and_refunds_a_return_once(credex, ship, sandbox):
    env = {"CREDEX_LOGISTICS_URL": sandbox.url}
    delivered, returned = ship(), ship()
    sandbox.refuse(returned["parcel"]["shipment_id"])
    sandbox.advance(10 * 60)  # both at the end of their road
    on_its_way = ship()
    assert credex("account", "show", "u1", "--json").json()["balance"] == 970

    done = credex("track", "sync", "--json", env=env)
    assert done.exit_code == 0, done.stderr
    assert done.json() == {
        "checked": 3,
        "delivered": 1,
        "returned": 1,
        "unchanged": 1,
        "skipped": 0,
        "failed": 0,
    }
    shown = {r["redemption_id"]: r for r in (delivered, returned, on_its_way)}
    for rid in shown:
        shown[rid] = credex("redeem", "show", rid, "--json").json()
    assert [shown[r["redemption_id"]]["status"] for r in (delivered, returned, on_its_way)] == [
        "delivered",
        "returned",
        "shipping",
    ]
    assert shown[on_its_way["redemption_id"]]["delivery_status"] == "info_received"
    assert shown[returned["redemption_id"]]["events"][0]["source"] == "sync"
    assert credex("account", "show", "u1", "--json").json()["balance"] == 980  # the return's 10 back
    assert credex("catalog", "list", "--json").json()[0]["stock"] == 18
    assert trackings(sandbox) == 3

    # Within the interval nothing is asked again, by sync or by track.
    again = credex("track", "sync", "--json", env=env).json()
    assert again["checked"] == 0 and trackings(sandbox) == 3
    stored = credex("track", on_its_way["redemption_id"], "--json", env=env)
    assert stored.exit_code == 0 and stored.json()["stored"] is True and trackings(sandbox) == 3
    assert stored.json()["status"] == "info_received"
    # The stored answer says where the parcel is, as the carrier did (its checkpoints too).
    assert [c["status"] for c in stored.json()["checkpoints"]] == ["info_received"]
    fresh = credex("track", on_its_way["redemption_id"], "--fresh", "--json", env=env)
    assert fresh.exit_code == 0 and "stored" not in fresh.json() and trackings(sandbox) == 4
    assert fresh.json()["checkpoints"] == stored.json()["checkpoints"]
    by_hand = credex("track", on_its_way["redemption_id"], "--json", env=env)  # kept from --fresh
    assert by_hand.json()["stored"] is True and by_hand.json()["checkpoints"] == fresh.json()["checkpoints"]
    # A delivered redemption cannot be cancelled; the returned one was refunded once.
    refused = credex("redeem", "cancel", delivered["redemption_id"], "--reason", "late")
    assert refused.exit_code == 1
    history = credex("account", "history", "u1", "--json").json()
    assert [e["ref"] for e in history if e["kind"] == "redemption_refund"] == [str(returned["redemption_id"])]

    # With no minimum interval, the parcels still on their way are asked about again.
    sandbox.advance(10 * 60)
    env["CREDEX_TRACK_MIN_INTERVAL"] = "0s"
    last = credex("track", "sync", "--json", env=env).json()
    assert (last["checked"], last["delivered"]) == (1, 1)
    bad = credex("track", "sync", "--json", env=env | {"CREDEX_TRACK_MIN_INTERVAL": "soon"})
    assert bad.exit_code == 2 and "CREDEX_TRACK_MIN_INTERVAL" in bad.stderr


def test_two_syncs_at_once_never_ask_the_carrier_twice_about_one_number(db_url, ship, sandbox):
    parcels = [ship() for _ in range(6)]
    sandbox.advance(10 * 60)
    env = subprocess_env(CREDEX_DATABASE_URL=db_url, CREDEX_LOGISTICS_URL=sandbox.url)
    runs = [
        subprocess.Popen(
            credex_command("track", "sync", "--json"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    reports = []
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        reports.append(json.loads(out))
    assert sum(r["checked"] for r in reports) == len(parcels) == trackings(sandbox)
    assert sum(r["delivered"] for r in reports) == len(parcels)


def test_two_syncs_racing_to_refund_the_same_returns_refund_each_once(db_url, credex, ship, sandbox):
    """With no minimum interval both runs may ask about every parcel and both try to refund it:
    the conditional move to `returned` lets one of them, the ledger's unique ref stands behind it."""
    parcels = [ship() for _ in range(4)]
    for parcel in parcels:
        sandbox.refuse(parcel["parcel"]["shipment_id"])
    sandbox.advance(10 * 60)
    env = subprocess_env(
        CREDEX_DATABASE_URL=db_url, CREDEX_LOGISTICS_URL=sandbox.url, CREDEX_TRACK_MIN_INTERVAL="0s"
    )
    runs = [
        subprocess.Popen(
            credex_command("track", "sync", "--json"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    reports, logs = [], []
    for run in runs:
        out, err = run.communicate(timeout=120)
        logs.append(err)
        assert run.returncode == 0, err
        reports.append(json.loads(out))
    assert sum(r["returned"] for r in reports) == len(parcels), (reports, logs)
    history = credex("account", "history", "u1", "--json").json()
    refunds = sorted(e["ref"] for e in history if e["kind"] == "redemption_refund")
    assert refunds == sorted(str(p["redemption_id"]) for p in parcels)
    assert credex("account", "show", "u1", "--json").json()["balance"] == 1000
    assert credex("catalog", "list", "--json").json()[0]["stock"] == 20


def test_a_carrier_that_cannot_be_reached_exits_69_and_one_not_configured_exits_2(credex, ship):
    shipped = ship()
    down = {"CREDEX_LOGISTICS_URL": "http://127.0.0.1:9", "CREDEX_LOGISTICS_TOTAL_TIMEOUT": "1"}
    done = credex("track", "sync", "--json", env=down)
    assert done.exit_code == 69 and json.loads(done.stderr)["error"]["code"] == "unavailable"
    assert credex("redeem", "show", shipped["redemption_id"], "--json").json()["status"] == "shipping"
    unset = credex("track", "sync")
    assert unset.exit_code == 2 and unset.stderr.startswith("error: ") and unset.stderr.count("\n") == 1


def shown_checked_at(credex, redemption_id: int) -> str | None:
    return credex("redeem", "show", redemption_id, "--json").json()["delivery_checked_at"]


def test_a_check_that_found_no_answer_leaves_the_time_of_the_last_answer(credex, ship, sandbox):
    """The claim is written before the carrier is asked: after a check that failed, `track` said
    "in_transit (as the carrier said at <the failed attempt>)". The time shown is the answer's."""
    env = {"CREDEX_LOGISTICS_URL": sandbox.url}
    shipped = ship()
    rid = shipped["redemption_id"]
    sandbox.advance(60)
    assert credex("track", "sync", "--json", env=env).json()["checked"] == 1
    answered = shown_checked_at(credex, rid)
    assert answered is not None

    every_time = {"CREDEX_TRACK_MIN_INTERVAL": "0s"}
    down = {"CREDEX_LOGISTICS_URL": "http://127.0.0.1:9", "CREDEX_LOGISTICS_TOTAL_TIMEOUT": "1"}
    assert credex("track", "sync", "--json", env=every_time | down).exit_code == 69
    with running_sandbox() as forgetful:  # a carrier that knows no parcel: 404
        lost = credex("track", "sync", "--json", env=every_time | {"CREDEX_LOGISTICS_URL": forgetful.url})
    assert lost.exit_code == 0 and lost.json()["failed"] == 1

    assert shown_checked_at(credex, rid) == answered
    stored = credex("track", rid, "--json", env=env)
    assert stored.json()["stored"] is True and stored.json()["status"] == "in_transit"
    assert stored.json()["checked_at"] == answered
    table = credex("track", rid, env=env)
    assert f"(as the carrier said at {answered[:19]}" in table.stdout
    assert trackings(sandbox) == 1  # the failed attempts were claims all the same: nothing asked here

    # An answer again: its time is shown.
    fresh = credex("track", "sync", "--json", env=env | every_time)
    assert fresh.json()["checked"] == 1 and shown_checked_at(credex, rid) > answered


EVERY_COUNT = ("checked", "delivered", "returned", "unchanged", "skipped", "failed")


@pytest.mark.parametrize("sandbox", [{"key": SANDBOX_KEY}], indirect=True, ids=["with-a-key"])
def test_a_refused_api_key_stops_the_sync_and_the_next_run_checks_every_parcel(credex, ship, sandbox):
    """It exited 0 with every parcel counted as failed, said nothing, and used up every parcel's
    interval: the first run after the key was fixed checked nothing."""
    parcels = [ship() for _ in range(3)]
    sandbox.advance(10 * 60)
    wrong = {"CREDEX_LOGISTICS_URL": sandbox.url, "CREDEX_LOGISTICS_API_KEY": "wrong-key-123"}

    refused = credex("track", "sync", "--json", env=wrong)
    assert refused.exit_code == 1 and refused.stdout == ""
    error = json.loads(refused.stderr)["error"]
    assert error["code"] == "carrier_rejected" and "CREDEX_LOGISTICS_API_KEY" in error["message"]
    # As `track` by hand says about the same key.
    by_hand = credex("track", parcels[0]["redemption_id"], "--json", env=wrong)
    assert by_hand.exit_code == 1 and json.loads(by_hand.stderr) == {"error": error}
    plain = credex("track", "sync", env=wrong)
    assert plain.exit_code == 1 and plain.stdout == "" and plain.stderr.count("\n") == 1
    assert plain.stderr == f"error: {error['message']}\n"
    for outcome in (refused, by_hand, plain):
        assert "wrong-key-123" not in outcome.stderr and SANDBOX_KEY not in outcome.stderr
    assert trackings(sandbox) == 3  # one question per run: the first refusal stopped each

    fixed = credex("track", "sync", "--json", env=wrong | {"CREDEX_LOGISTICS_API_KEY": SANDBOX_KEY})
    assert fixed.exit_code == 0, fixed.stderr
    assert fixed.json() == dict.fromkeys(EVERY_COUNT, 0) | {"checked": 3, "delivered": 3}
    statuses = [credex("redeem", "show", p["redemption_id"], "--json").json()["status"] for p in parcels]
    assert statuses == ["delivered"] * 3


@pytest.mark.parametrize(("code", "words"), [("601", "expired"), ("503", "signature")])
def test_a_kuaidi100_key_refusal_gives_back_the_claim_of_the_parcel_it_was_asked_about(
    db_url, ship, code, words
):
    """kuaidi100 refuses a key with HTTP 200: returnCode 503 (bad signature) or 601 (expired, or
    no queries left, which may happen halfway through a run)."""
    import httpx

    from credex.points.deliveries import sync_deliveries
    from tests.logistics_fakes import kuaidi100_client

    first, second, third = (ship() for _ in range(3))
    asked = []

    def signed(request: httpx.Request) -> httpx.Response:  # the parcel asked about, signed for
        param = json.loads(parse_qs(request.content.decode())["param"][0])
        echo = {"com": param["com"], "nu": param["num"]}
        return httpx.Response(200, json={"message": "ok", "status": "200", "state": "3", "data": [], **echo})

    def quota_runs_out_after_one(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        if len(asked) > 1:
            return httpx.Response(200, json={"result": False, "returnCode": code, "message": "no"})
        return signed(request)

    def sync(handler):
        with kuaidi100_client(handler) as client:
            return sync_deliveries(db_url, client, limit=10, interval=timedelta(minutes=30), operator="cron")

    with pytest.raises(CarrierKeyRefused) as refused:
        sync(quota_runs_out_after_one)
    assert words in refused.value.message and len(asked) == 2
    rows = delivery_rows(db_url)
    assert rows[first["redemption_id"]]["status"] == "delivered"  # answered before the refusal
    assert rows[second["redemption_id"]]["delivery_asked_at"] is None  # given back
    assert rows[third["redemption_id"]]["delivery_asked_at"] is None  # never claimed

    report = sync(signed)
    assert (report.checked, report.delivered, report.failed) == (2, 2, 0)


def test_a_parcel_the_carrier_will_not_answer_about_counts_as_failed_and_says_why(credex, ship):
    parcels = [ship() for _ in range(2)]
    with running_sandbox() as forgetful:  # knows no parcel: 404 for each
        lost = credex("track", "sync", "--json", env={"CREDEX_LOGISTICS_URL": forgetful.url})
    assert lost.exit_code == 0
    assert lost.json() == dict.fromkeys(EVERY_COUNT, 0) | {"failed": 2}
    lines = lost.stderr.splitlines()
    assert lines == [
        f"warning: redemption {p['redemption_id']} not checked: carrier sandbox knows no parcel "
        f"{p['parcel']['tracking_number']}"
        for p in parcels
    ]


def kept_final(redemption_id: int, final: str, said: str) -> str:
    return (
        f"warning: redemption {redemption_id} is {final}, but the carrier now says {said}: "
        "a final status is kept, and nothing else changes\n"
    )


@pytest.mark.parametrize(
    "sandbox", [{"args": ["--numbering", "sequential"]}], indirect=True, ids=["sequential-numbers"]
)
def test_a_final_status_stays_when_the_carrier_later_says_otherwise(credex, ship, sandbox):
    """A delivered redemption went on to show delivery_status `returned`, then `in_transit`, as
    the carrier handed its number out again."""
    shipped = ship()
    rid = shipped["redemption_id"]
    sandbox.advance(10 * 60)
    assert (
        credex("track", "sync", "--json", env={"CREDEX_LOGISTICS_URL": sandbox.url}).json()["delivered"] == 1
    )
    before = credex("redeem", "show", rid, "--json").json()
    assert (before["status"], before["delivery_status"]) == ("delivered", "delivered")
    balance = credex("account", "show", "u1", "--json").json()["balance"]

    # Restarted, the carrier hands the number out again: first to a parcel that is refused and
    # comes back, then to one on its way.
    seen = []
    for refused, stages in ((True, 10), (False, 1)):
        with running_sandbox("--numbering", "sequential") as again:
            other = again.create_shipment(f"someone-else-{refused}")
            assert other["tracking_number"] == shipped["parcel"]["tracking_number"]
            if refused:
                again.refuse(other["shipment_id"])
            again.advance(stages * 60)
            seen.append(credex("track", rid, "--fresh", "--json", env={"CREDEX_LOGISTICS_URL": again.url}))
    assert [said.exit_code for said in seen] == [0, 0]
    after = credex("redeem", "show", rid, "--json").json()
    assert after == before  # status, delivery status, its time and events: as the sync left them
    assert credex("account", "show", "u1", "--json").json()["balance"] == balance  # no refund
    assert [said.json()["status"] for said in seen] == ["returned", "in_transit"]  # as the carrier said
    assert [said.stderr for said in seen] == [
        kept_final(rid, "delivered", "returned"),
        kept_final(rid, "delivered", "in_transit"),
    ]
    stored = credex("track", rid, "--json", env={"CREDEX_LOGISTICS_URL": sandbox.url}).json()
    assert stored["stored"] is True and stored["status"] == "delivered"
    assert stored["checkpoints"][0]["status"] == "delivered"


def test_a_sync_answer_that_contradicts_a_final_status_is_an_event_and_changes_nothing(db_url, credex, ship):
    """Two runs at once (CREDEX_TRACK_MIN_INTERVAL=0s): the other one recorded `delivered` while
    this one was asking, and this one hears `returned`."""
    import httpx

    from credex.points.deliveries import record_delivery, sync_deliveries
    from tests.logistics_fakes import make_client

    shipped = ship()
    rid = shipped["redemption_id"]
    balance = credex("account", "show", "u1", "--json").json()["balance"]

    def the_other_run_records_first(request: httpx.Request) -> httpx.Response:
        with session_for(db_url, write=True) as session:
            record_delivery(session, rid, "delivered", operator="other-run", now=utcnow())
            session.commit()
        number = shipped["parcel"]["tracking_number"]
        return httpx.Response(
            200,
            json={"tracking_number": number, "carrier": "sandbox", "status": "returned", "checkpoints": []},
        )

    warnings: list[str] = []
    with make_client(the_other_run_records_first) as client:
        report = sync_deliveries(
            db_url, client, limit=10, interval=timedelta(0), operator="cron", warn=warnings.append
        )
    assert (report.checked, report.unchanged, report.returned) == (1, 1, 0)
    shown = credex("redeem", "show", rid, "--json").json()
    assert (shown["status"], shown["delivery_status"]) == ("delivered", "delivered")
    assert warnings == [kept_final(rid, "delivered", "returned").removeprefix("warning: ").rstrip("\n")]
    said, moved = shown["events"][:2]
    assert (said["status"], said["source"]) == ("delivered", "sync")
    assert said["detail"] == "the carrier now says returned; delivered is final and is kept"
    assert (moved["status"], moved["detail"]) == ("delivered", "the carrier says delivered")
    assert credex("account", "show", "u1", "--json").json()["balance"] == balance  # no refund


def test_track_by_the_express_number_of_a_known_redemption_keeps_to_the_interval(credex, ship, sandbox):
    """`track --express-no` asked the carrier on every call, four questions in as many seconds
    about a number kuaidi100 locks when asked more often than every 30 minutes."""
    shipped = ship()
    rid, number = shipped["redemption_id"], shipped["parcel"]["tracking_number"]
    env = {"CREDEX_LOGISTICS_URL": sandbox.url}

    first = credex("track", "--express-no", number, "--json", env=env)
    assert first.exit_code == 0, first.stderr
    assert first.json()["redemption_id"] == rid and "stored" not in first.json()
    for carrier in ([], ["--carrier", "sandbox"]):
        again = credex("track", "--express-no", number, *carrier, "--json", env=env)
        assert again.exit_code == 0 and again.json()["stored"] is True
        assert again.json()["redemption_id"] == rid and again.json()["status"] == first.json()["status"]
        assert again.json()["checkpoints"] == first.json()["checkpoints"]
    table = credex("track", "--express-no", number, env=env)
    assert "(as the carrier said at " in table.stdout
    assert trackings(sandbox) == 1
    # The answer is the redemption's: `track REDEMPTION_ID` and `track sync` keep to it too.
    assert credex("track", rid, "--json", env=env).json()["stored"] is True
    assert credex("track", "sync", "--json", env=env).json()["checked"] == 0
    assert trackings(sandbox) == 1

    fresh = credex("track", "--express-no", number, "--fresh", "--json", env=env)
    assert fresh.json()["redemption_id"] == rid and "stored" not in fresh.json()
    assert trackings(sandbox) == 2
    # A number no redemption has, or a known number at another carrier, is the carrier's to answer.
    other = sandbox.create_shipment("not-a-redemption")["tracking_number"]
    for _ in range(2):
        asked = credex("track", "--express-no", other, "--json", env=env)
        assert asked.json()["redemption_id"] is None and "stored" not in asked.json()
    elsewhere = credex("track", "--express-no", number, "--carrier", "shunfeng", "--json", env=env)
    assert elsewhere.exit_code == 1 and json.loads(elsewhere.stderr)["error"]["code"] == "unknown_parcel"
    assert trackings(sandbox) == 5
    every_time = credex(
        "track", "--express-no", number, "--json", env=env | {"CREDEX_TRACK_MIN_INTERVAL": "0s"}
    )
    assert "stored" not in every_time.json() and trackings(sandbox) == 6


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_two_returns_of_one_shopper_refunded_at_once_wait_for_each_other(db_url, credex, ship, monkeypatch):
    """Two `track sync` runs each hear of a different return of the same shopper. Each writes its
    redemption row twice (the answer, then the status), and Postgres checks the row's key to the
    account the second time (FOR KEY SHARE). Then both lock the account to refund: the second
    must wait for the first to commit, not deadlock with it (it did, as a lock upgrade, exit 70)."""
    import threading

    import credex.points.cancels as cancels
    from credex.points.deliveries import record_delivery

    first, second = ship(), ship()
    balance = credex("account", "show", "u1", "--json").json()["balance"]
    both_hold_their_rows = threading.Barrier(2, timeout=30)
    real_lock = cancels.lock_account

    def lock_when_both_are_here(session, user_id):
        both_hold_their_rows.wait()
        return real_lock(session, user_id)

    monkeypatch.setattr(cancels, "lock_account", lock_when_both_are_here)
    outcomes: dict[int, object] = {}

    def refund(redemption_id: int) -> None:
        try:
            with session_for(db_url, write=True) as session:
                outcomes[redemption_id] = record_delivery(
                    session, redemption_id, "returned", operator="cron", now=utcnow()
                )
                session.commit()
        except Exception as error:  # reported below, with the other run's outcome
            outcomes[redemption_id] = error

    runs = [threading.Thread(target=refund, args=(p["redemption_id"],)) for p in (first, second)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=60)
    assert outcomes == {first["redemption_id"]: "returned", second["redemption_id"]: "returned"}
    refunded = first["points"] + second["points"]
    assert credex("account", "show", "u1", "--json").json()["balance"] == balance + refunded
