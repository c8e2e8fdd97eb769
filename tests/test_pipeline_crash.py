"""Whatever crashes, every redemption ships exactly once: relays and warehouse consumers killed
with SIGKILL at random moments while messages flow, and the broker cutting a connection."""

from __future__ import annotations

import random
import threading
import time

import pytest

from credex.db.engine import session_for
from credex.points.redemptions import redeem
from tests.invariants import check_points_invariants
from tests.pipeline import Pipeline, check_shipped_exactly_once
from tests.sandbox import running_sandbox
from tests.support import wait_for
from tests.test_relay_broker import close_connections

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

REDEMPTIONS = 80
KILLS = 6


def test_killed_relays_and_warehouses_and_a_cut_connection_lose_nothing_and_ship_nothing_twice(
    db_url, credex, rabbit, tmp_path
):
    rng = random.Random()
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10")
    credex("award", "grant", "u1", str(10 * REDEMPTIONS), "--reason", "opening", "--ref", "open-u1")
    # Short waits, so that what a killed process left behind comes back within the test.
    relay_options = (
        "--confirm-timeout",
        "1",
        "--max-confirm-timeout",
        "2",
        "--lease",
        "2",
        "--batch-size",
        "7",
    )
    with running_sandbox() as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        shopper_error: list[BaseException] = []

        def shop() -> None:  # redemptions keep arriving while processes die
            try:
                for n in range(REDEMPTIONS):
                    with session_for(db_url, write=True) as session:
                        redeem(session, "u1", "MUG", address=f"{n} High St", operator="shopper")
                    time.sleep(0.03)  # a steady trickle, so that kills land while messages flow
            except BaseException as error:  # noqa: BLE001 - reported by the test below
                shopper_error.append(error)

        try:
            relay, warehouse = pipeline.relay(*relay_options), pipeline.warehouse("--prefetch", "5")
            shopper = threading.Thread(target=shop)
            shopper.start()
            cut = False
            for kill in range(KILLS):
                # Wait for progress, then kill at a random moment of the flow that follows.
                before = pipeline.confirmed()
                wait_for(
                    lambda b=before: pipeline.confirmed() > b or pipeline.confirmed() == REDEMPTIONS,
                    timeout=60,
                    what="messages flowing",
                )
                time.sleep(rng.uniform(0.0, 0.4))  # the awkward moment: chosen at random, not a wait
                if kill == KILLS // 2 and not cut:
                    pipeline.wait_ready(relay)  # a relay started by the kill before may not be connected yet
                    assert close_connections(f":{relay.pid}:") == 1, "the relay's connection to cut"
                    cut = True
                if rng.random() < 0.5:
                    pipeline.kill(relay)
                    relay = pipeline.relay(*relay_options)
                else:
                    pipeline.kill(warehouse)
                    warehouse = pipeline.warehouse("--prefetch", "5")
            shopper.join(timeout=120)
            assert not shopper_error, shopper_error
            pipeline.wait_all_confirmed(REDEMPTIONS, timeout=180)
            for worker in (relay, warehouse):
                assert pipeline.stop(worker)[0] == 0, pipeline.log(worker)
        finally:
            pipeline.close()

        check_shipped_exactly_once(pipeline, REDEMPTIONS)
        totals = check_points_invariants(db_url)
        assert totals == {"redemptions": REDEMPTIONS, "messages": REDEMPTIONS}
        assert credex("account", "show", "u1", "--json").json()["balance"] == 0
        assert sum(parcel["create_calls"] for parcel in sandbox.shipments()) >= REDEMPTIONS
