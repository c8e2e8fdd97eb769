"""Two warehouse consumers as real processes take the creates and cancels of the same redemptions
at once, in shuffled order with repeats, round after round: every cancelled redemption ends with
no live waybill at the carrier, every other one with exactly one."""

from __future__ import annotations

import json
import time

import pytest

from tests.pipeline import Pipeline
from tests.sandbox import running_sandbox
from tests.support import wait_for
from tests.warehouse_messages import answers, cancel_body, created_body, rows, send

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

ROUNDS = 3
CANCELLED_PER_ROUND = 4
SHIPPED_PER_ROUND = 2
RESEND_AFTER = 1.5  # seconds: as the relay sends an unanswered cancel again


def test_two_consumers_never_leave_a_live_waybill_for_a_cancelled_redemption(db_url, rabbit, tmp_path, rng):
    # Slow carrier answers now and then, so that cancels arrive while a waybill is being asked for.
    with running_sandbox(
        "--slow-share", "0.3", "--slow-seconds", "0.3", "--seed", rng.randrange(2**31)
    ) as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            warehouses = [pipeline.warehouse("--prefetch", "4"), pipeline.warehouse("--prefetch", "4")]
            for process in warehouses:
                pipeline.wait_ready(process)
            heard: dict[str, list[tuple[str, dict]]] = {}
            cancelled, shipped = {}, {}
            next_id = 1
            for _ in range(ROUNDS):
                this_round = []
                for n in range(CANCELLED_PER_ROUND + SHIPPED_PER_ROUND):
                    create = created_body(next_id)
                    messages = [create, create] if rng.random() < 0.5 else [create]
                    if n < CANCELLED_PER_ROUND:
                        cancel = cancel_body(next_id)
                        messages += [cancel, cancel] if rng.random() < 0.5 else [cancel]
                        cancelled[next_id] = (create, cancel)
                    else:
                        shipped[next_id] = create
                    this_round += messages
                    next_id += 1
                for body in rng.sample(this_round, len(this_round)):
                    send(rabbit, body)
                round_cancels = {rid: c for rid, c in cancelled.items() if rid >= next_id - len(this_round)}
                _answer_every_cancel(rabbit, heard, round_cancels, shipped)
            codes = [pipeline.stop(process) for process in warehouses]
        finally:
            pipeline.close()

        assert [code for code, _ in codes] == [0, 0]
        reports = [json.loads(out) for _, out in codes]
        assert all(report["received"] > 0 for report in reports), "both consumers took part"

        # The carrier: no live waybill for a cancelled redemption, one for each shipped one.
        parcels = sandbox.shipments()
        by_key: dict[str, list[dict]] = {}
        for parcel in parcels:
            by_key.setdefault(parcel["idempotency_key"], []).append(parcel)
        assert all(len(found) == 1 for found in by_key.values()), "two waybills for one key"
        for rid, (create, _) in cancelled.items():
            live = [p for p in by_key.get(create["message_id"], []) if p["live"]]
            assert live == [], f"redemption {rid} was cancelled, yet its waybill is live"
        for create in shipped.values():
            (parcel,) = by_key[create["message_id"]]
            assert parcel["live"]

    # What the warehouse answered and stored.
    for rid, (create, cancel) in cancelled.items():
        outcomes = {body["outcome"] for _, body in heard[cancel["message_id"]]}
        assert outcomes == {"cancelled"}, f"redemption {rid}: {outcomes}"
        for kind, body in heard.get(create["message_id"], []):
            assert kind != "shipment.failed", body
    for create in shipped.values():
        assert {kind for kind, _ in heard[create["message_id"]]} == {"shipment.requested"}
    stored = rows(db_url)
    assert {stored[rid]["status"] for rid in cancelled} == {"cancelled"}
    assert {stored[rid]["status"] for rid in shipped} == {"waybill"}


def _answer_every_cancel(rabbit, heard: dict, cancels: dict, shipped: dict) -> None:
    """Act as the relay: keep the answers, send a cancel again while it has none, until every
    cancel of the round is answered and every create to ship is confirmed."""
    last_sent = {rid: time.monotonic() for rid in cancels}

    def settled() -> bool:
        for kind, body, correlation in answers(rabbit):
            heard.setdefault(correlation, []).append((kind, body))
        waiting = [rid for rid, (_, cancel) in cancels.items() if cancel["message_id"] not in heard]
        now = time.monotonic()
        for rid in waiting:
            if now - last_sent[rid] > RESEND_AFTER:
                send(rabbit, cancels[rid][1])
                last_sent[rid] = now
        unshipped = [rid for rid, create in shipped.items() if create["message_id"] not in heard]
        return not waiting and not unshipped

    wait_for(settled, timeout=90, interval=0.1, what="every cancel answered and every create confirmed")


def test_a_consumer_killed_while_asking_the_carrier_leaves_nothing_live_for_a_cancel(
    db_url, rabbit, tmp_path
):
    """SIGKILL while waybills are being asked for (rows `requesting`, messages unacked): the next
    consumer gets the messages again, and every cancelled redemption ends without a live waybill."""
    with running_sandbox("--slow-share", "1", "--slow-seconds", "1.5") as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        try:
            first = pipeline.warehouse()
            pipeline.wait_ready(first)
            creates = {rid: created_body(rid) for rid in (1, 2, 3)}
            for body in creates.values():
                send(rabbit, body)
            wait_for(
                lambda: sandbox.requests()["by_route"].get("POST /v1/shipments", 0) >= 3,
                timeout=30,
                what="the carrier asked for every waybill",
            )
            cancels = {rid: cancel_body(rid) for rid in creates}
            for body in cancels.values():
                send(rabbit, body)
            pipeline.kill(first)
            assert "requesting" in {row["status"] for row in rows(db_url).values()}  # killed mid-call

            second = pipeline.warehouse()
            heard: dict[str, list] = {}
            _answer_every_cancel(rabbit, heard, {rid: (creates[rid], c) for rid, c in cancels.items()}, {})
            assert pipeline.stop(second)[0] == 0
        finally:
            pipeline.close()
        assert sandbox.live_waybills() == []
        assert len(sandbox.shipments()) == 3  # asked again with the same keys: no second waybill
    for rid, cancel in cancels.items():
        assert {body["outcome"] for _, body in heard[cancel["message_id"]]} == {"cancelled"}, rid
    assert {row["status"] for row in rows(db_url).values()} == {"cancelled"}
