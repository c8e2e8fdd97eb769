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
