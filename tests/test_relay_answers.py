"""Answers the relay must not record: one whose body names another redemption than the message it
answers (its correlation id), and one for a message the outbox does not know. The first is
rejected (acked, counted malformed, logged with ids only) and its message waits, unconfirmed, for
the right answer; the second is unknown, not a repeat. On SQLite and on Postgres."""

from __future__ import annotations

import uuid

import pytest

from credex.db.engine import session_for
from credex.db.models import utcnow
from tests.test_relay_broker import confirmation, relay_once


@pytest.fixture
def shop(credex):
    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10", "--stock", "10").exit_code == 0
    assert credex("award", "grant", "u1", "1000", "--reason", "opening", "--ref", "open-u1").exit_code == 0

    def redeem(n: int) -> list[dict]:
        made = [
            credex("redeem", "create", "u1", "MUG", "--address", f"{i} High St", "--json") for i in range(n)
        ]
        assert all(m.exit_code == 0 for m in made), [m.stderr for m in made]
        return [m.json() for m in made]

    return redeem


def shown(credex, redemption: dict) -> dict:
    return credex("redeem", "show", redemption["redemption_id"], "--json").json()


def messages(credex) -> dict[str, dict]:
    return {m["message_id"]: m for m in credex("relay", "list", "--json").json()}


def answer(rabbit, kind: str, answered: str, redemption_id: int, **body) -> None:
    """The warehouse's shipment.cancelled or shipment.failed to the message ``answered``."""
    rabbit.publish(
        kind,
        {"message_id": answered, "redemption_id": redemption_id, "created_at": utcnow().isoformat(), **body},
        type=kind,
        correlation_id=answered,
    )


@pytest.mark.rabbitmq
def test_a_waybill_or_refusal_naming_another_redemption_records_nothing_and_the_right_answer_still_does(
    credex, shop, rabbit
):
    first, second = shop(2)
    relay_once(credex)
    before = messages(credex)
    # The waybill for the first message says it is the second redemption's; the carrier's refusal
    # of the second message says it is the first's.
    rabbit.publish(
        "shipment.requested",
        confirmation(first, "SIM0000000009") | {"redemption_id": second["redemption_id"]},
        correlation_id=first["message_id"],
    )
    answer(rabbit, "shipment.failed", second["message_id"], first["redemption_id"], reason="422 bad address")
    rabbit.publish(  # not a redemption id at all: malformed
        "shipment.requested",
        confirmation(first, "SIM0000000009") | {"redemption_id": str(first["redemption_id"])},
        correlation_id=first["message_id"],
    )

    result = credex("relay", "run", "--once", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert (
        report["confirmed"],
        report["malformed_confirmations"],
        report["repeated_confirmations"],
        report["unknown_confirmations"],
    ) == (0, 3, 0, 0), report
    assert result.stderr.count("rejected an answer") == 2
    assert (
        f"for message {first['message_id']}: it names redemption {second['redemption_id']}" in result.stderr
    )
    assert "SIM0000000009" not in result.stderr and "bad address" not in result.stderr  # ids only
    assert rabbit.count(rabbit.names.confirmations_queue) == 0, "acked, not redelivered forever"
    for redemption in (first, second):
        now = shown(credex, redemption)
        assert (now["status"], now["express_no"], now["carrier"], now["message_state"]) == (
            "pending",
            None,
            None,
            "sent",
        )
        assert [e["status"] for e in now["events"]] == ["pending"]
    assert messages(credex) == before, "the messages wait for the right answer, due as before"

    rabbit.publish(
        "shipment.requested", confirmation(first, "SIM0000000001"), correlation_id=first["message_id"]
    )
    answer(rabbit, "shipment.failed", second["message_id"], second["redemption_id"], reason="422 bad address")
    report = relay_once(credex)
    assert (report["confirmed"], report["malformed_confirmations"]) == (2, 0), report
    assert (shown(credex, first)["status"], shown(credex, first)["express_no"]) == (
        "shipping",
        "SIM0000000001",
    )
    assert shown(credex, second)["status"] == "exception"
    assert {m["state"] for m in messages(credex).values()} == {"confirmed", "dead"}


@pytest.mark.rabbitmq
def test_a_cancel_answer_naming_another_redemption_refunds_nothing_until_the_right_one_comes(
    credex, shop, rabbit
):
    first, second = shop(2)
    relay_once(credex)
    for redemption in (first, second):
        done = credex("redeem", "cancel", redemption["redemption_id"], "--reason", "wrong colour", "--json")
        assert done.json()["status"] == "cancelling", done.stderr
    relay_once(credex)
    cancels = {
        body["redemption_id"]: body["message_id"]
        for properties, body in rabbit.take(rabbit.names.warehouse_queue)
        if properties.type == "redemption.cancelled"
    }
    balance = credex("account", "show", "u1", "--json").json()["balance"]

    # Each cancel answered "cancelled", in the name of the other redemption.
    answer(
        rabbit,
        "shipment.cancelled",
        cancels[first["redemption_id"]],
        second["redemption_id"],
        outcome="cancelled",
    )
    answer(
        rabbit,
        "shipment.cancelled",
        cancels[second["redemption_id"]],
        first["redemption_id"],
        outcome="cancelled",
    )
    report = relay_once(credex)
    assert (report["confirmed"], report["malformed_confirmations"], report["repeated_confirmations"]) == (
        0,
        2,
        0,
    )
    assert [shown(credex, r)["status"] for r in (first, second)] == ["cancelling", "cancelling"]
    assert credex("account", "show", "u1", "--json").json()["balance"] == balance, "nothing refunded"
    assert {messages(credex)[m]["state"] for m in cancels.values()} == {"sent"}

    answer(
        rabbit,
        "shipment.cancelled",
        cancels[first["redemption_id"]],
        first["redemption_id"],
        outcome="cancelled",
    )
    assert relay_once(credex)["confirmed"] == 1
    assert [shown(credex, r)["status"] for r in (first, second)] == ["cancelled", "cancelling"]
    assert credex("account", "show", "u1", "--json").json()["balance"] == balance + 10


@pytest.mark.rabbitmq
def test_an_answer_for_a_message_the_outbox_does_not_know_is_unknown_and_a_real_repeat_a_repeat(
    db_url, credex, shop, rabbit
):
    (first,) = shop(1)
    relay_once(credex)
    stranger = str(uuid.uuid4())
    rabbit.publish(
        "shipment.requested", confirmation(first, "SIM0000000001"), correlation_id=first["message_id"]
    )
    rabbit.publish("shipment.requested", confirmation(first, "SIM0000000002"), correlation_id=stranger)
    answer(rabbit, "shipment.failed", stranger, first["redemption_id"], reason="422")
    result = credex("relay", "run", "--once", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert (report["confirmed"], report["unknown_confirmations"], report["repeated_confirmations"]) == (
        1,
        2,
        0,
    )
    assert result.stderr.count(f"for message {stranger}, which the outbox does not know") == 2
    assert (shown(credex, first)["status"], shown(credex, first)["express_no"]) == (
        "shipping",
        "SIM0000000001",
    )

    # The same waybill again: a repeat, and it changes nothing.
    rabbit.publish(
        "shipment.requested", confirmation(first, "SIM0000000001"), correlation_id=first["message_id"]
    )
    report = relay_once(credex)
    assert (report["confirmed"], report["unknown_confirmations"], report["repeated_confirmations"]) == (
        0,
        0,
        1,
    )
    status = credex("relay", "status", "--json").json()
    assert (status["confirmed"], status["sent"], status["pending"]) == (1, 0, 0)
    assert rabbit.count(rabbit.names.confirmations_queue) == 0


def test_one_batch_records_the_answers_that_agree_with_their_message_and_drops_the_rest(db_url, credex, shop):
    """record_confirmations checks every answer of a batch against its message in the confirming
    statement itself; the cancel and failure answers against the row each one locks."""
    from credex.relay.answers import (
        CancelAnswer,
        Confirmation,
        Dropped,
        FailedAnswer,
        record_cancel_answers,
        record_confirmations,
        record_failures,
    )

    a, b, c, d = shop(4)
    stranger = str(uuid.uuid4())
    dropped = Dropped()
    with session_for(db_url, write=True) as session:
        done = record_confirmations(
            session,
            [
                Confirmation(a["message_id"], "sandbox", "SIM1", a["redemption_id"]),
                Confirmation(b["message_id"], "sandbox", "SIM2", c["redemption_id"]),  # c's, not b's
                Confirmation(c["message_id"], "sandbox", "SIM3"),  # names none: the first warehouses
                Confirmation(stranger, "sandbox", "SIM4", d["redemption_id"]),
            ],
            now=utcnow(),
            dropped=dropped,
        )
        failed = record_failures(
            session, [FailedAnswer(d["message_id"], "422", a["redemption_id"])], now=utcnow(), dropped=dropped
        )
        cancelled = record_cancel_answers(
            session,
            [CancelAnswer(stranger, "cancelled", None, d["redemption_id"])],
            now=utcnow(),
            operator="relay",
            dropped=dropped,
        )
        session.commit()
    assert (done, failed, cancelled) == ((2, []), (0, []), (0, []))
    assert dropped == Dropped(
        unknown={stranger},
        mismatched={b["message_id"]: b["redemption_id"], d["message_id"]: d["redemption_id"]},
    )
    assert [(shown(credex, r)["status"], shown(credex, r)["express_no"]) for r in (a, b, c, d)] == [
        ("shipping", "SIM1"),
        ("pending", None),
        ("shipping", "SIM3"),
        ("pending", None),
    ]
    assert [messages(credex)[r["message_id"]]["state"] for r in (a, b, c, d)] == [
        "confirmed",
        "pending",
        "confirmed",
        "pending",
    ]
