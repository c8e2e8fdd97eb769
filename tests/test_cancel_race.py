"""`redeem cancel` racing a relay that is publishing the same redemption, as real processes: a
redemption is either cancelled on the spot and its message never reaches the broker, or it goes
the long way (cancelling, a redemption.cancelled, the warehouse's answer); never refunded and
shipped. The warehouse is played by the test: it takes what reaches its queue and answers each
cancel with shipment.cancelled "cancelled". On SQLite and on Postgres."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from credex.db.engine import get_engine
from credex.db.models import utcnow
from tests.invariants import check_invariants
from tests.pipeline import Pipeline
from tests.support import credex_command, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

ROUNDS = 4
PER_ROUND = 3


def test_cancel_racing_a_publishing_relay_never_refunds_a_message_the_broker_has(
    db_url, credex, rabbit, tmp_path, rng, monkeypatch
):
    from credex.points import redemptions as redeeming

    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "100")
    credex("award", "grant", "u1", "1000", "--reason", "opening", "--ref", "open-u1")
    pipeline = Pipeline(db_url, rabbit, SimpleNamespace(url="http://127.0.0.1:9"), tmp_path)
    at_broker: dict[str, dict] = {}  # message id -> (type, body) of everything the warehouse got

    def play_warehouse() -> None:
        for properties, body in rabbit.take(rabbit.names.warehouse_queue):
            at_broker[properties.message_id] = {"type": properties.type, "body": body}
            if properties.type == "redemption.cancelled":
                rabbit.publish(
                    "shipment.cancelled",
                    {"message_id": f"a-{body['message_id']}", "redemption_id": body["redemption_id"],
                     "outcome": "cancelled", "reason": "", "created_at": utcnow().isoformat()},
                    type="shipment.cancelled",
                    correlation_id=body["message_id"],
                )  # fmt: skip

    try:
        relay = pipeline.relay()
        pipeline.wait_ready(relay)
        redemptions = []
        for _round in range(ROUNDS):
            # One message due now (the relay has it before the cancel starts), one due long after
            # (the cancel withdraws it), one due somewhere in the time a cancel process takes to
            # start and commit: the race. Written due then, in the redemption's own transaction.
            batch = []
            for offset in (0.0, 600.0, rng.uniform(0.2, 1.5)):
                with monkeypatch.context() as patch:
                    patch.setattr(redeeming, "utcnow", lambda o=offset: utcnow() + timedelta(seconds=o))
                    done = credex("redeem", "create", "u1", "MUG", "--address", "1 High St", "--json")
                batch.append(done.json() | {"offset": offset})
            cancels = [
                subprocess.Popen(
                    credex_command("redeem", "cancel", r["redemption_id"], "--reason", "race", "--json"),
                    env=pipeline.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for r in batch
            ]
            for process, r in zip(cancels, batch, strict=True):
                out, err = process.communicate(timeout=120)
                assert process.returncode == 0, err
                r["cancel"] = json.loads(out)["cancel"]
            redemptions += batch
            play_warehouse()

        def all_cancelled() -> bool:
            play_warehouse()
            return pipeline.scalar("SELECT count(*) FROM redemption WHERE status <> 'cancelled'") == 0

        wait_for(all_cancelled, timeout=120, interval=0.2, what="every redemption cancelled")
        assert pipeline.stop(relay)[0] == 0
    finally:
        pipeline.close()

    paths = {r["cancel"] for r in redemptions}
    print(f"cancel paths: {[(r['offset'], r['cancel']) for r in redemptions]}")
    assert paths == {"withdrawn", "requested"}
    for r in redemptions:
        if r["cancel"] == "withdrawn":
            assert r["message_id"] not in at_broker, f"redemption {r['redemption_id']} refunded and published"
    with get_engine(db_url).connect() as connection:
        refunds = connection.execute(
            text("SELECT count(*), count(DISTINCT ref) FROM ledger_entry WHERE kind = 'redemption_refund'")
        ).one()
    assert tuple(refunds) == (len(redemptions), len(redemptions))
    assert credex("account", "show", "u1", "--json").json()["balance"] == 1000
    assert credex("catalog", "list", "--json").json()[0]["stock"] == 100
    check_invariants(db_url)


def test_a_cancel_answer_and_a_return_racing_refund_once(db_url, credex, rabbit, tmp_path):
    """Redemptions `cancelling` with a waybill whose parcels came back: the relay records the
    warehouse's "cancelled" while `track sync` runs reach `returned`; each ends one or the other,
    refunded once."""
    from credex.db.engine import session_for
    from credex.relay.answers import Confirmation, record_confirmations
    from tests.sandbox import running_sandbox
    from tests.support import subprocess_env

    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "100")
    credex("award", "grant", "u1", "1000", "--reason", "opening", "--ref", "open-u1")
    with running_sandbox() as sandbox:
        created = []
        for _ in range(4):
            r = credex("redeem", "create", "u1", "MUG", "--address", "1 High St", "--json").json()
            parcel = sandbox.create_shipment(r["message_id"], address="1 High St", sku="MUG")
            with session_for(db_url, write=True) as session:
                record_confirmations(
                    session,
                    [Confirmation(r["message_id"], "sandbox", parcel["tracking_number"])],
                    now=utcnow(),
                )
                session.commit()
            sandbox.refuse(parcel["shipment_id"])
            cancel = credex("redeem", "cancel", r["redemption_id"], "--reason", "race", "--json")
            assert cancel.json()["cancel"] == "requested"
            created.append(r)
        sandbox.advance(10 * 60)
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            relay = pipeline.relay()
            wait_for(lambda: rabbit.count(rabbit.names.warehouse_queue) == 4, timeout=60, what="the cancels")
            cancels = rabbit.take(rabbit.names.warehouse_queue)

            def answer(taken) -> None:
                for properties, body in taken:
                    rabbit.publish(
                        "shipment.cancelled",
                        {"message_id": f"a-{body['message_id']}", "redemption_id": body["redemption_id"],
                         "outcome": "cancelled", "reason": "", "created_at": utcnow().isoformat()},
                        type="shipment.cancelled",
                        correlation_id=properties.message_id,
                    )  # fmt: skip

            # Two answered before the syncs start; the other two while they run.
            answer(cancels[:2])
            wait_for(
                lambda: pipeline.scalar("SELECT count(*) FROM redemption WHERE status = 'cancelled'") == 2,
                what="the first answers",
            )
            syncs = [
                subprocess.Popen(
                    credex_command("track", "sync", "--json"),
                    env=subprocess_env(
                        CREDEX_DATABASE_URL=db_url,
                        CREDEX_LOGISTICS_URL=sandbox.url,
                        CREDEX_TRACK_MIN_INTERVAL="0s",
                    ),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            wait_for(lambda: sandbox.requests()["by_route"].get("GET /v1/trackings"), what="a sync asking")
            answer(cancels[2:])
            for run in syncs:
                _, err = run.communicate(timeout=120)
                assert run.returncode == 0, err
            wait_for(
                lambda: pipeline.scalar("SELECT count(*) FROM redemption WHERE status = 'cancelling'") == 0,
                timeout=60,
                what="every cancel answered or returned",
            )
            assert pipeline.stop(relay)[0] == 0
        finally:
            pipeline.close()
    with get_engine(db_url).connect() as connection:
        statuses = connection.execute(text("SELECT status FROM redemption")).scalars().all()
        refunds = connection.execute(
            text("SELECT count(*), count(DISTINCT ref) FROM ledger_entry WHERE kind = 'redemption_refund'")
        ).one()
    print(f"ended: {sorted(statuses)}")
    assert set(statuses) <= {"cancelled", "returned"} and statuses.count("cancelled") >= 2
    assert tuple(refunds) == (4, 4)
    assert credex("account", "show", "u1", "--json").json()["balance"] == 1000
    assert credex("catalog", "list", "--json").json()[0]["stock"] == 100
    check_invariants(db_url)
