"""A redemption's whole life through the real pipeline: `redeem cancel` carried by a running relay
to a running warehouse that cancels the waybill at the sandbox carrier, a cancel the carrier
refuses because the parcel was picked up, `track sync` finding parcels delivered and returned, a
carrier's final refusal (409) ending in `exception` and refunded by a cancel. Real processes, real
broker, real sockets; every rule of domain.md is checked after each test (the `db_url` teardown),
and `check_shipped_exactly_once`'s audit where everything shipped."""

from __future__ import annotations

import json

import pytest

from tests.pipeline import Pipeline
from tests.sandbox import running_sandbox
from tests.support import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

PRICE = 10


@pytest.fixture
def shop(credex):
    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", PRICE, "--stock", 20).exit_code == 0
    assert credex("award", "grant", "u1", 100, "--reason", "opening", "--ref", "open-u1").exit_code == 0

    def redeem(n: int) -> list[dict]:
        made = []
        for i in range(n):
            result = credex("redeem", "create", "u1", "MUG", "--address", f"{i} High St", "--json")
            assert result.exit_code == 0, result.stderr
            made.append(result.json())
        return made

    return redeem


def balance(credex) -> int:
    return credex("account", "show", "u1", "--json").json()["balance"]


def stock(credex) -> int:
    (item,) = [i for i in credex("catalog", "list", "--json").json() if i["sku"] == "MUG"]
    return item["stock"]


def shown(credex, redemption: dict) -> dict:
    return credex("redeem", "show", redemption["redemption_id"], "--json").json()


def parcel_of(sandbox, express_no: str) -> dict:
    (parcel,) = sandbox.shipments(tracking_number=express_no)
    return parcel


def test_a_shipped_redemption_is_cancelled_at_the_carrier_and_refunded_once(
    credex, shop, rabbit, tmp_path, db_url
):
    with running_sandbox() as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            relay, warehouse = pipeline.relay(), pipeline.warehouse()
            first, second = shop(2)
            pipeline.wait_all_confirmed(2)
            express_no = shown(credex, first)["express_no"]
            assert express_no and parcel_of(sandbox, express_no)["live"]
            assert (balance(credex), stock(credex)) == (100 - 2 * PRICE, 18)

            done = credex(
                "redeem", "cancel", first["redemption_id"], "--reason", "changed mind", "--wait", 60, "--json"
            )
            assert done.exit_code == 0, done.stderr
            assert done.json()["status"] == "cancelled", done.json()
            assert not parcel_of(sandbox, express_no)["live"], "the waybill is void at the carrier"
            assert (balance(credex), stock(credex)) == (100 - PRICE, 19)
            history = credex("account", "history", "u1", "--json").json()
            refunds = [e for e in history if e["kind"] == "redemption_refund"]
            assert [(e["points"], e["ref"]) for e in refunds] == [(PRICE, str(first["redemption_id"]))]
            events = shown(credex, first)["events"]
            assert [e["status"] for e in events][:2] == ["cancelled", "cancelling"]
            assert shown(credex, second)["status"] == "shipping"

            again = credex("redeem", "cancel", first["redemption_id"], "--reason", "again", "--json")
            assert again.exit_code == 0 and again.json()["duplicate"] is True
            assert balance(credex) == 100 - PRICE, "a repeat refunds nothing"

            exits = [pipeline.stop(relay)[0], pipeline.stop(warehouse)[0]]
            assert exits == [0, 0], [pipeline.log(relay), pipeline.log(warehouse)]
            assert {p["tracking_number"]: p["live"] for p in sandbox.shipments()} == {
                express_no: False,
                shown(credex, second)["express_no"]: True,
            }
            audit = pipeline.run("audit", "verify", "--json")
            assert audit.returncode == 0, audit.stdout + audit.stderr
        finally:
            pipeline.close()


def test_a_picked_up_parcel_is_not_cancelled_and_track_sync_sees_it_delivered_or_returned(
    credex, shop, rabbit, tmp_path, db_url
):
    with running_sandbox("--stage-seconds", "60") as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            relay, warehouse = pipeline.relay(), pipeline.warehouse()
            kept, refused = shop(2)
            pipeline.wait_all_confirmed(2)
            sandbox.refuse(parcel_of(sandbox, shown(credex, refused)["express_no"])["shipment_id"])
            sandbox.advance(90)  # both picked up: in transit

            done = credex(
                "redeem", "cancel", kept["redemption_id"], "--reason", "too late?", "--wait", 60, "--json"
            )
            assert done.exit_code == 0, done.stderr
            assert done.json()["status"] == "shipping", done.json()
            assert parcel_of(sandbox, shown(credex, kept)["express_no"])["live"]
            assert balance(credex) == 100 - 2 * PRICE, "nothing refunded for a parcel on its way"
            assert "picked up" in json.dumps(shown(credex, kept)["events"])

            sandbox.advance(3600)  # the kept one delivered, the refused one back at the sender
            env = {**pipeline.env, "CREDEX_TRACK_MIN_INTERVAL": "0s"}
            synced = pipeline.start("track", "sync", "--json", env=env)
            out, _ = synced.communicate(timeout=60)
            assert synced.returncode == 0, pipeline.log(synced)
            assert shown(credex, kept)["status"] == "delivered"
            assert shown(credex, kept)["delivery_status"] == "delivered"
            assert shown(credex, refused)["status"] == "returned"
            assert (balance(credex), stock(credex)) == (100 - PRICE, 19), "the returned one refunded"

            again = pipeline.start("track", "sync", "--json", env=env)
            again.communicate(timeout=60)
            assert again.returncode == 0 and balance(credex) == 100 - PRICE, "refunded once"
            exits = [pipeline.stop(relay)[0], pipeline.stop(warehouse)[0]]
            assert exits == [0, 0]
            not_cancellable = credex("redeem", "cancel", kept["redemption_id"], "--reason", "x", "--json")
            assert not_cancellable.exit_code == 1
            assert json.loads(not_cancellable.stderr)["error"]["code"] == "not_cancellable"
        finally:
            pipeline.close()


def test_a_carrier_refusal_ends_in_exception_at_once_and_a_cancel_refunds_it(
    credex, shop, rabbit, tmp_path, db_url
):
    with running_sandbox("--faults", "409") as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            relay, warehouse = pipeline.relay(), pipeline.warehouse()
            (refused,) = shop(1)
            wait_for(lambda: shown(credex, refused)["status"] == "exception", timeout=60, what="exception")
            (message,) = [
                m
                for m in credex("relay", "list", "--json").json()
                if m["message_id"] == refused["message_id"]
            ]
            assert (message["state"], message["attempts"]) == ("dead", 1), message
            assert "409" in message["last_error"] or "conflict" in message["last_error"].lower(), message
            assert sandbox.requests()["faults"] == {"409": 1}
            assert sandbox.shipments() == [], "no waybill was issued"

            done = credex(
                "redeem",
                "cancel",
                refused["redemption_id"],
                "--reason",
                "cannot ship",
                "--wait",
                60,
                "--json",
            )
            assert done.exit_code == 0, done.stderr
            assert done.json()["status"] == "cancelled", done.json()
            assert (balance(credex), stock(credex)) == (100, 20)
            exits = [pipeline.stop(relay)[0], pipeline.stop(warehouse)[0]]
            assert exits == [0, 0]
            audit = pipeline.run("audit", "verify", "--json")
            assert audit.returncode == 0, audit.stdout + audit.stderr
        finally:
            pipeline.close()


def test_a_redemption_no_relay_has_touched_is_cancelled_at_once_and_never_published(
    credex, shop, rabbit, tmp_path, db_url
):
    (untouched,) = shop(1)
    done = credex("redeem", "cancel", untouched["redemption_id"], "--reason", "typo in address", "--json")
    assert done.exit_code == 0, done.stderr
    assert (done.json()["status"], done.json()["cancel"]) == ("cancelled", "withdrawn")
    assert (balance(credex), stock(credex)) == (100, 20)
    with running_sandbox() as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            published = pipeline.run("relay", "run", "--once", "--json")
            assert published.returncode == 0 and json.loads(published.stdout)["published"] == 0
            assert rabbit.count(rabbit.names.warehouse_queue) == 0
        finally:
            pipeline.close()
