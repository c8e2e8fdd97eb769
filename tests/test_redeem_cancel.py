"""`redeem cancel` and the answers that end a cancel: a redemption whose message never left is
cancelled on the spot; one the broker may have goes `cancelling` and waits for the warehouse's
shipment.cancelled (published here by the test, as the warehouse would); points and stock come
back exactly once, into the lots they came from. On SQLite and on Postgres."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import text

from credex.db.engine import get_engine, session_for
from credex.db.models import utcnow

pytestmark = []


def rows(db_url: str, sql: str, **params) -> list:
    with get_engine(db_url).connect() as connection:
        return connection.execute(text(sql), params).all()


@pytest.fixture
def shop(credex):
    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", "30", "--stock", "5").exit_code == 0
    assert credex("award", "grant", "u1", "100", "--reason", "opening", "--ref", "open-u1").exit_code == 0

    def redeem(quantity: int = 1) -> dict:
        done = credex(
            "redeem", "create", "u1", "MUG", "--address", "1 High St", "--quantity", quantity, "--json"
        )
        assert done.exit_code == 0, done.stderr
        return done.json()

    return redeem


def balance(credex) -> int:
    return credex("account", "show", "u1", "--json").json()["balance"]


def stock(credex) -> int:
    return credex("catalog", "list", "--json").json()[0]["stock"]


def test_a_redemption_never_handed_to_the_broker_is_cancelled_at_once_and_refunded_once(db_url, credex, shop):
    first = shop(2)
    assert (balance(credex), stock(credex)) == (40, 3)

    done = credex("redeem", "cancel", first["redemption_id"], "--reason", "ordered by mistake", "--json")
    assert done.exit_code == 0, done.stderr
    result = done.json()
    assert (result["status"], result["duplicate"], result["cancel"]) == ("cancelled", False, "withdrawn")
    assert (balance(credex), stock(credex)) == (100, 5)
    assert [e["status"] for e in result["events"]] == ["cancelled", "pending"]
    assert result["events"][0]["source"] == "cancel" and result["events"][0]["detail"] == "ordered by mistake"

    history = credex("account", "history", "u1", "--json").json()
    refund = history[0]
    assert (refund["kind"], refund["ref"], refund["points"]) == (
        "redemption_refund",
        str(first["redemption_id"]),
        60,
    )
    (message,) = credex("relay", "list", "--json").json()
    assert message["state"] == "cancelled"
    assert credex("relay", "status", "--json").json()["pending"] == 0

    again = credex("redeem", "cancel", first["redemption_id"], "--reason", "again", "--json")
    assert again.exit_code == 0 and again.json()["duplicate"] is True
    assert (balance(credex), stock(credex)) == (100, 5)
    assert (
        len(
            [
                e
                for e in credex("account", "history", "u1", "--json").json()
                if e["kind"] == "redemption_refund"
            ]
        )
        == 1
    )
    movements = rows(db_url, "SELECT kind, delta, stock_after FROM stock_movement ORDER BY id")
    assert [tuple(m) for m in movements] == [("set", 5, 5), ("redeem", -2, 3), ("cancel", 2, 5)]


def test_bad_input_and_unknown_or_delivered_redemptions_are_refused_and_change_nothing(db_url, credex, shop):
    created = shop()
    unknown = credex("redeem", "cancel", "999", "--reason", "x", "--json")
    assert unknown.exit_code == 1 and json.loads(unknown.stderr)["error"]["code"] == "unknown_redemption"
    for bad in (
        ["abc", "--reason", "x"],
        [created["redemption_id"], "--reason", ""],
        [created["redemption_id"], "--reason", "a\x00b"],
    ):
        refused = credex("redeem", "cancel", *bad, "--json")
        code = json.loads(refused.stderr)["error"]["code"]
        assert (refused.exit_code, code) == (2, "invalid_input"), refused.stderr
    missing = credex("redeem", "cancel", created["redemption_id"])
    assert missing.exit_code == 2 and "--reason" in missing.stderr
    with get_engine(db_url).begin() as connection:  # as track sync leaves a delivered one
        connection.execute(
            text(
                "UPDATE redemption SET status = 'delivered', express_no = 'SIM1', carrier = 'sandbox'"
                " WHERE id = :id"
            ),
            {"id": created["redemption_id"]},
        )
        connection.execute(
            text("UPDATE outbox_message SET state = 'confirmed', attempts = 1, first_claimed_at = created_at")
        )
    done = credex("redeem", "cancel", created["redemption_id"], "--reason", "too late", "--json")
    assert done.exit_code == 1 and json.loads(done.stderr)["error"]["code"] == "not_cancellable"
    plain = credex("redeem", "cancel", created["redemption_id"], "--reason", "too late")
    assert (
        plain.exit_code == 1
        and plain.stderr.startswith("error: redemption")
        and plain.stderr.count("\n") == 1
    )
    assert (balance(credex), stock(credex)) == (70, 4)
    assert credex("redeem", "show", created["redemption_id"], "--json").json()["status"] == "delivered"


def test_points_go_back_into_the_lots_they_came_from_and_pay_the_debt_first(
    db_url, credex, shop, monkeypatch
):
    monkeypatch.setenv("CREDEX_EXPIRY_DAYS", "30")
    credex("award", "grant", "u1", "50", "--reason", "second", "--ref", "g-2")
    spent = shop(5)  # 150: the 100 first (oldest), then 50 of the second lot
    assert balance(credex) == 0
    # An order's points, spent, then the order refunded: a debt of 20.
    credex("award", "purchase", "u1", "--order", "o-1", "--amount", "20")
    credex("award", "grant", "u1", "-20", "--reason", "spent elsewhere", "--ref", "g-neg")
    refund = credex("award", "refund", "u1", "--order", "o-1", "--refund", "rf-1", "--json").json()
    assert refund["debt"] == 20
    lots_before = dict(rows(db_url, "SELECT id, expires_at FROM point_lot"))

    done = credex("redeem", "cancel", spent["redemption_id"], "--reason", "out of stock at the warehouse")
    assert done.exit_code == 0, done.stderr
    account = credex("account", "show", "u1", "--json").json()
    assert (account["balance"], account["debt"]) == (130, 0)  # 150 back, 20 of it paid the debt
    assert dict(rows(db_url, "SELECT id, expires_at FROM point_lot")) == lots_before  # expiry kept
    put_back = rows(
        db_url,
        "SELECT u.lot_id, u.points FROM lot_use u JOIN ledger_entry e ON e.id = u.entry_id "
        "WHERE e.kind = 'redemption_refund' ORDER BY u.lot_id",
    )
    assert sum(p for _, p in put_back) == -130 and all(p < 0 for _, p in put_back)
    assert stock(credex) == 5


def test_an_expired_lot_gets_its_points_back_and_lapses_again_at_the_next_expiry(
    db_url, credex, shop, monkeypatch
):
    monkeypatch.setenv("CREDEX_EXPIRY_DAYS", "1")
    spent = shop()
    credex("award", "grant", "u1", "5", "--reason", "keep the account busy", "--ref", "g-5")
    with get_engine(db_url).begin() as connection:  # a day and more later
        connection.execute(
            text("UPDATE point_lot SET expires_at = :past"), {"past": utcnow() - timedelta(days=1)}
        )
    assert credex("award", "expire").exit_code == 0
    assert balance(credex) == 0
    assert credex("redeem", "cancel", spent["redemption_id"], "--reason", "changed mind").exit_code == 0
    assert balance(credex) == 30  # back, until the next expiry run
    assert credex("award", "expire").exit_code == 0
    assert balance(credex) == 0
    kinds = [e["kind"] for e in credex("account", "history", "u1", "--json").json()]
    assert kinds.count("expiry") == 3 and kinds.count("redemption_refund") == 1


# --- the long path, with the broker -----------------------------------------------------------


def relay_once(credex) -> dict:
    done = credex("relay", "run", "--once", "--json")
    assert done.exit_code == 0, done.stderr
    return done.json()


def answer(rabbit, kind: str, answered: str, redemption_id: int, **body) -> None:
    rabbit.publish(
        kind,
        {
            "message_id": f"answer-{answered}",
            "redemption_id": redemption_id,
            "created_at": utcnow().isoformat(),
            **body,
        },
        type=kind,
        correlation_id=answered,
        message_id=f"answer-{answered}",
    )


@pytest.mark.rabbitmq
def test_a_published_redemption_is_cancelled_when_the_warehouse_answers_and_only_then(
    db_url, credex, shop, rabbit
):
    created = shop()
    relay_once(credex)  # the broker has it now
    queue = rabbit.names.warehouse_queue
    assert [b["redemption_id"] for _, b in rabbit.take(queue)] == [created["redemption_id"]]

    done = credex("redeem", "cancel", created["redemption_id"], "--reason", "wrong colour", "--json")
    assert done.exit_code == 0, done.stderr
    assert (done.json()["status"], done.json()["cancel"]) == ("cancelling", "requested")
    assert (balance(credex), stock(credex)) == (70, 4)  # nothing back until the warehouse answers
    repeat = credex("redeem", "cancel", created["redemption_id"], "--reason", "wrong colour", "--json")
    assert repeat.exit_code == 0 and repeat.json()["duplicate"] is True

    relay_once(credex)
    ((properties, body),) = rabbit.take(queue)
    assert (properties.type, body["redemption_id"], body["reason"]) == (
        "redemption.cancelled",
        created["redemption_id"],
        "wrong colour",
    )
    assert properties.message_id == body["message_id"] != created["message_id"]

    answer(
        rabbit,
        "shipment.cancelled",
        body["message_id"],
        created["redemption_id"],
        outcome="cancelled",
        reason="",
    )
    answer(
        rabbit,
        "shipment.cancelled",
        body["message_id"],
        created["redemption_id"],
        outcome="cancelled",
        reason="",
    )
    report = relay_once(credex)
    assert report["confirmed"] == 1
    shown = credex("redeem", "show", created["redemption_id"], "--json").json()
    assert shown["status"] == "cancelled" and [e["source"] for e in shown["events"]][:2] == [
        "warehouse",
        "cancel",
    ]
    assert (balance(credex), stock(credex)) == (100, 5)
    refund = credex("account", "history", "u1", "--json").json()[0]
    assert (refund["kind"], refund["points"], refund["operator"]) == ("redemption_refund", 30, "tester")
    states = dict(rows(db_url, "SELECT routing_key, state FROM outbox_message"))
    assert states == {"redemption.created": "cancelled", "redemption.cancelled": "confirmed"}
    assert rabbit.count(rabbit.names.confirmations_queue) == 0


@pytest.mark.rabbitmq
def test_a_refused_cancel_goes_back_to_shipping_and_a_carrier_refusal_to_exception_until_retried(
    db_url, credex, shop, rabbit
):
    shipped, failed = shop(), shop()
    relay_once(credex)
    rabbit.take(rabbit.names.warehouse_queue)
    rabbit.publish(
        "shipment.requested",
        {
            "message_id": "w-1",
            "redemption_id": shipped["redemption_id"],
            "shipment_id": 1,
            "carrier": "sandbox",
            "express_no": "SIM0000000001",
            "created_at": utcnow().isoformat(),
        },
        type="shipment.requested",
        correlation_id=shipped["message_id"],
    )
    answer(
        rabbit, "shipment.failed", failed["message_id"], failed["redemption_id"], reason="422 invalid address"
    )
    rabbit.publish("shipment.failed", b"{not json", type="shipment.failed")
    rabbit.publish("shipment.requested", {"message_id": "x"}, type="shipment.lost")  # a type it does not know
    report = relay_once(credex)
    assert report["malformed_confirmations"] == 2
    assert rabbit.count(rabbit.names.confirmations_queue) == 0
    shown = credex("redeem", "show", failed["redemption_id"], "--json").json()
    assert shown["status"] == "exception" and "422 invalid address" in shown["events"][0]["detail"]
    dead = credex("relay", "list", "--state", "dead", "--json").json()
    assert [(m["message_id"], m["last_error"]) for m in dead] == [
        (failed["message_id"], "422 invalid address")
    ]

    assert credex("relay", "retry", failed["message_id"]).exit_code == 0
    assert credex("redeem", "show", failed["redemption_id"], "--json").json()["status"] == "pending"

    assert credex("redeem", "cancel", shipped["redemption_id"], "--reason", "please stop").exit_code == 0
    relay_once(credex)
    cancels = [b for p, b in rabbit.take(rabbit.names.warehouse_queue) if p.type == "redemption.cancelled"]
    answer(
        rabbit,
        "shipment.cancelled",
        cancels[0]["message_id"],
        shipped["redemption_id"],
        outcome="refused",
        reason="already picked up",
    )
    relay_once(credex)
    shown = credex("redeem", "show", shipped["redemption_id"], "--json").json()
    assert shown["status"] == "shipping" and "already picked up" in shown["events"][0]["detail"]
    assert (balance(credex), stock(credex)) == (40, 3)  # nothing came back
    # A late "cancelled" for the same cancel changes nothing now.
    answer(
        rabbit, "shipment.cancelled", cancels[0]["message_id"], shipped["redemption_id"], outcome="cancelled"
    )
    relay_once(credex)
    assert credex("redeem", "show", shipped["redemption_id"], "--json").json()["status"] == "shipping"
    assert balance(credex) == 40


def test_the_record_functions_change_nothing_on_a_repeat(db_url, credex, shop):
    from credex.points.cancels import cancel_redemption
    from credex.relay.answers import CancelAnswer, FailedAnswer, record_cancel_answers, record_failures

    created = shop()
    with get_engine(db_url).begin() as connection:  # a relay claimed and published it
        connection.execute(
            text("UPDATE outbox_message SET state = 'sent', attempts = 1, first_claimed_at = created_at")
        )
    with session_for(db_url, write=True) as session:
        result = cancel_redemption(session, created["redemption_id"], reason="r", operator="tester")
    assert result["status"] == "cancelling"
    cancel_id = rows(db_url, "SELECT id FROM outbox_message WHERE routing_key = 'redemption.cancelled'")[0][0]
    for expected in (1, 0):
        with session_for(db_url, write=True) as session:
            changed, put_off = record_cancel_answers(
                session, [CancelAnswer(cancel_id, "cancelled", None)], now=utcnow(), operator="relay"
            )
            failed = record_failures(session, [FailedAnswer(created["message_id"], "late")], now=utcnow())
            session.commit()
        assert (changed, put_off, failed) == (expected, [], (0, []))
    assert (balance(credex), stock(credex)) == (100, 5)
    assert rows(db_url, "SELECT count(*) FROM ledger_entry WHERE kind = 'redemption_refund'")[0][0] == 1


def test_a_message_a_relay_claimed_and_gave_up_is_never_taken_for_an_untouched_one(db_url, credex, shop):
    """A relay that claimed a batch, may have published it, and died or failed before recording
    (its lease cleared, or on Postgres its row locks gone with it) leaves the claim it committed
    first: the cancel takes the long path."""
    from credex.db.engine import ensure_schema
    from credex.relay.claims import claim_strategy
    from credex.relay.outbox import RedeliveryPolicy

    created, untouched = shop(), shop()
    with get_engine(db_url).begin() as connection:  # the second one is not due yet
        connection.execute(
            text("UPDATE outbox_message SET next_attempt_at = :later WHERE id = :id"),
            {"later": utcnow() + timedelta(hours=1), "id": untouched["message_id"]},
        )
    claims = claim_strategy(
        ensure_schema(db_url).dialect, db_url, RedeliveryPolicy(), relay_id="relay-that-dies", lease=60
    )
    claim = claims.claim(10, now=utcnow())
    assert [m.id for m in claim.messages] == [created["message_id"]]
    claims.release(claim)  # as after a failure, or a crash: nothing recorded

    done = credex("redeem", "cancel", created["redemption_id"], "--reason", "r", "--wait", "0.2", "--json")
    assert done.exit_code == 0 and (done.json()["status"], done.json()["cancel"]) == (
        "cancelling",
        "requested",
    )
    other = credex("redeem", "cancel", untouched["redemption_id"], "--reason", "r", "--json").json()
    assert (other["status"], other["cancel"]) == ("cancelled", "withdrawn")
    listed = credex("redeem", "list", "--status", "cancelling", "--json").json()
    assert [r["redemption_id"] for r in listed] == [created["redemption_id"]]
    assert [r["status"] for r in credex("redeem", "list", "--status", "cancelled", "--json").json()] == [
        "cancelled"
    ]
    unknown = credex("redeem", "list", "--status", "lost")
    assert unknown.exit_code == 2 and "exception" in unknown.stderr


def test_a_late_waybill_for_a_withdrawn_message_changes_nothing_and_is_not_put_off(db_url, credex, shop):
    from credex.relay.answers import Confirmation, record_confirmations

    created = shop()
    assert credex("redeem", "cancel", created["redemption_id"], "--reason", "r").exit_code == 0
    with session_for(db_url, write=True) as session:
        done = record_confirmations(
            session, [Confirmation(created["message_id"], "sandbox", "SIM9")], now=utcnow()
        )
        session.commit()
    assert done == (0, [])
    shown = credex("redeem", "show", created["redemption_id"], "--json").json()
    assert (shown["status"], shown["express_no"], shown["message_state"]) == ("cancelled", None, "cancelled")


def test_a_cancelled_answer_to_a_pending_redemptions_create_refunds_and_cancels_it(
    db_url, credex, shop, rabbit
):
    """A stray redemption.cancelled on the broker (one the points side never wrote) made the
    warehouse answer the create `cancelled`: the message was confirmed and the redemption stayed
    `pending` for good, its points and stock neither shipped nor back."""
    created = shop()
    relay_once(credex)  # the create is published: the warehouse has it
    answer(rabbit, "shipment.cancelled", created["message_id"], created["redemption_id"], outcome="cancelled")
    relay_once(credex)
    shown = credex("redeem", "show", created["redemption_id"], "--json").json()
    assert (shown["status"], shown["message_state"]) == ("cancelled", "confirmed")
    assert (balance(credex), stock(credex)) == (100, 5)
    # the same answer again refunds nothing more
    answer(rabbit, "shipment.cancelled", created["message_id"], created["redemption_id"], outcome="cancelled")
    relay_once(credex)
    assert (balance(credex), stock(credex)) == (100, 5)
    assert rows(db_url, "SELECT count(*) FROM ledger_entry WHERE kind = 'redemption_refund'")[0][0] == 1
    audit = credex("audit", "verify", "--json")
    assert audit.exit_code == 0, audit.stdout
