"""The outbox as the relay works it, without a broker: claims, what the broker said, confirmations,
and the operators' retry and purge. Times are passed in, so the rules can be told day by day."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from credex.db.engine import session_for
from credex.relay.answers import Confirmation, record_confirmations
from credex.relay.claims import Claim, LeaseClaims
from credex.relay.outbox import RedeliveryPolicy, bury_exhausted
from tests.invariants import check_points_invariants

LATER = datetime(2100, 1, 1, tzinfo=UTC)  # a clock the tests move by hand: every message is due by then
POLICY = RedeliveryPolicy(confirm_timeout=60, max_confirm_timeout=600)


@pytest.fixture
def redemptions(credex):
    """Three redemptions waiting in the outbox; returns their message ids, oldest first."""
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10")
    credex("award", "grant", "u1", "100", "--reason", "opening", "--ref", "open-u1")
    created = [
        credex("redeem", "create", "u1", "MUG", "--address", f"{n} High St", "--json") for n in (1, 2, 3)
    ]
    return [r.json()["message_id"] for r in created]


def claim(db_url, relay="r1", *, now=LATER, limit=100, lease=30.0):
    """The messages a relay's lease takes (the way SQLite claims; the tests run it on both)."""
    return LeaseClaims(db_url, POLICY, relay_id=relay, lease=lease).claim(limit, now=now).messages


def record(db_url, claimed, outcomes, *, relay="r1", now=LATER, policy=POLICY):
    return LeaseClaims(db_url, policy, relay_id=relay, lease=30.0).record(Claim(claimed), outcomes, now=now)


def bury(db_url, *, max_attempts: int, now=LATER) -> int:
    with session_for(db_url, write=True) as session:
        buried = bury_exhausted(session, max_attempts=max_attempts, now=now)
        session.commit()
        return buried


def confirm(db_url, *confirmations: Confirmation, now=LATER) -> int:
    with session_for(db_url, write=True) as session:
        confirmed, put_off = record_confirmations(session, confirmations, now=now)
        session.commit()
        assert put_off == []  # nobody holds a lock here
        return confirmed


def messages(credex) -> dict[str, dict]:
    return {m["message_id"]: m for m in credex("relay", "list", "--json").json()}


def test_two_relays_never_claim_the_same_due_message_until_a_lease_runs_out(db_url, redemptions):
    first = claim(db_url, "r1", limit=2)
    second = claim(db_url, "r2", limit=10)
    assert [m.id for m in first] == redemptions[:2]  # oldest first
    assert [m.id for m in second] == redemptions[2:]
    assert claim(db_url, "r3") == []
    # r1 died holding its claims: they are due again when the lease has run out, not before.
    assert claim(db_url, "r3", now=LATER + timedelta(seconds=29)) == []
    retaken = claim(db_url, "r3", now=LATER + timedelta(seconds=31))
    assert sorted(m.id for m in retaken) == sorted(redemptions)


def test_a_confirmed_publish_is_sent_and_due_again_after_the_confirm_timeout(db_url, credex, redemptions):
    claimed = claim(db_url)
    tally = record(db_url, claimed, dict.fromkeys(redemptions))
    assert (tally.sent, tally.failed) == (3, 0)
    for message in messages(credex).values():
        assert message["state"] == "sent" and message["attempts"] == 1 and message["last_error"] is None
        due = datetime.fromisoformat(message["next_attempt_at"])
        assert timedelta(seconds=60) <= due - LATER <= timedelta(seconds=66)  # up to 10 % jitter
    assert claim(db_url, now=LATER + timedelta(seconds=59)) == []
    assert len(claim(db_url, now=LATER + timedelta(seconds=67))) == 3


def test_the_wait_for_a_confirmation_doubles_with_each_attempt_up_to_its_cap():
    policy = RedeliveryPolicy(confirm_timeout=10, max_confirm_timeout=35)
    for attempt, expected in ((1, 10), (2, 20), (3, 35), (4, 35), (60, 35)):
        wait = policy.confirm_wait(attempt).total_seconds()
        assert expected <= wait <= expected * 1.1, (attempt, wait)


def test_an_overdue_message_is_published_again_and_says_so(db_url, credex, redemptions):
    record(db_url, claim(db_url), dict.fromkeys(redemptions))
    overdue = LATER + timedelta(seconds=67)
    again = claim(db_url, now=overdue)
    assert [m.attempts for m in again] == [1, 1, 1]
    record(db_url, again, dict.fromkeys(redemptions), now=overdue)
    for message in messages(credex).values():
        assert message["state"] == "sent" and message["attempts"] == 2
        assert message["last_error"] == "not confirmed by its due time: published again"
        due = datetime.fromisoformat(message["next_attempt_at"])
        assert timedelta(seconds=120) <= due - overdue <= timedelta(seconds=132)


def test_a_refused_publish_is_a_failed_attempt_with_its_reason_and_never_sent(db_url, credex, redemptions):
    claimed = claim(db_url)
    outcomes = {
        redemptions[0]: None,
        redemptions[1]: "unroutable: 312 NO_ROUTE (redemption.created)",
        redemptions[2]: "nacked by the broker",
    }
    tally = record(db_url, claimed, outcomes)
    assert (tally.sent, tally.failed, tally.dead) == (1, 2, 0)
    listed = messages(credex)
    assert listed[redemptions[0]]["state"] == "sent"
    assert listed[redemptions[1]]["state"] == "pending" and listed[redemptions[1]]["attempts"] == 1
    assert "NO_ROUTE" in listed[redemptions[1]]["last_error"]
    assert listed[redemptions[2]]["last_error"] == "nacked by the broker"
    # a refused message is due again soon (about a second), long before a sent one
    again = claim(db_url, now=LATER + timedelta(seconds=2))
    assert sorted(m.id for m in again) == sorted(redemptions[1:])


def test_past_max_attempts_a_message_is_dead_and_listed_for_an_operator(db_url, credex, redemptions):
    policy = RedeliveryPolicy(confirm_timeout=1, max_confirm_timeout=1, max_attempts=2)
    first = claim(db_url)
    record(
        db_url,
        first,
        dict.fromkeys(redemptions[1:]) | {redemptions[0]: "nacked by the broker"},
        policy=policy,
    )
    now = LATER + timedelta(seconds=5)
    second = claim(db_url, now=now)
    assert len(second) == 3
    tally = record(
        db_url,
        second,
        dict.fromkeys(redemptions[1:]) | {redemptions[0]: "nacked by the broker"},
        now=now,
        policy=policy,
    )
    assert tally.dead == 1  # its second publish was refused: no attempts left
    later = now + timedelta(seconds=5)
    assert bury(db_url, max_attempts=2, now=later) == 2  # published twice, never confirmed
    assert claim(db_url, now=later) == []
    status = credex("relay", "status", "--json").json()
    assert (status["dead"], status["pending"], status["sent"]) == (3, 0, 0)
    dead = credex("relay", "list", "--state", "dead", "--json").json()
    assert {m["last_error"] for m in dead} == {"nacked by the broker", "no confirmation after 2 attempts"}


def test_a_confirmation_ships_the_redemption_once_and_a_repeat_changes_nothing(db_url, credex, redemptions):
    record(db_url, claim(db_url), dict.fromkeys(redemptions))
    confirmation = Confirmation(redemptions[0], "sandbox", "SIM0000000001")
    assert confirm(db_url, confirmation, confirmation) == 1
    assert confirm(db_url, Confirmation(redemptions[0], "other", "X")) == 0
    redemption = credex("redeem", "show", "1", "--json").json()
    assert (redemption["status"], redemption["carrier"], redemption["express_no"]) == (
        "shipping",
        "sandbox",
        "SIM0000000001",
    )
    assert redemption["message_state"] == "confirmed"
    assert credex("redeem", "show", "2", "--json").json()["status"] == "pending"
    status = credex("relay", "status", "--json").json()
    assert (status["confirmed"], status["sent"]) == (1, 2)
    # a confirmed message is never claimed again, and the publish recorded late does not undo it
    assert all(m.id != redemptions[0] for m in claim(db_url, now=LATER + timedelta(days=1)))
    check_points_invariants(db_url)


def test_one_batch_of_confirmations_ships_each_redemption_it_may_and_gives_each_its_own_waybill(
    db_url, credex, redemptions
):
    """In one batch: a pending redemption ships, one in exception ships (the carrier took it
    after all), one being cancelled keeps waiting for the warehouse's answer to the cancel but
    gets its waybill; a shipping event is written for the two that moved, and for them only."""
    from sqlalchemy import text

    record(db_url, claim(db_url), dict.fromkeys(redemptions))
    with session_for(db_url, write=True) as session:
        session.execute(text("UPDATE redemption SET status = 'exception' WHERE id = 2"))
        session.commit()
    cancel = credex("redeem", "cancel", "3", "--reason", "changed my mind", "--json")
    assert cancel.exit_code == 0, cancel.stderr
    assert cancel.json()["status"] == "cancelling"  # its message is at the broker: the warehouse decides

    numbers = [f"SIM00000000{n}" for n in (1, 2, 3)]
    batch = [Confirmation(m, "sandbox", number) for m, number in zip(redemptions, numbers, strict=True)]
    assert confirm(db_url, *batch) == 3
    shown = [credex("redeem", "show", str(n), "--json").json() for n in (1, 2, 3)]
    assert [(r["status"], r["express_no"]) for r in shown] == [
        ("shipping", numbers[0]),
        ("shipping", numbers[1]),
        ("cancelling", numbers[2]),
    ]
    shipping_events = [
        [e for e in r["events"] if e["status"] == "shipping" and e["source"] == "relay"] for r in shown
    ]
    assert [len(events) for events in shipping_events] == [1, 1, 0]
    assert all(r["message_state"] == "confirmed" for r in shown)
    check_points_invariants(db_url)


def test_a_late_confirmation_of_a_dead_message_still_ships_it(db_url, credex, redemptions):
    bury(db_url, max_attempts=0)
    assert confirm(db_url, Confirmation(redemptions[1], "sandbox", "SIM2")) == 1
    assert credex("redeem", "show", "2", "--json").json()["express_no"] == "SIM2"
    assert messages(credex)[redemptions[1]]["state"] == "confirmed"


def test_relay_retry_makes_dead_messages_due_now_with_fresh_attempts(db_url, credex, redemptions):
    bury(db_url, max_attempts=0)
    confirm(db_url, Confirmation(redemptions[2], "sandbox", "SIM3"))

    one = credex("relay", "retry", redemptions[0], redemptions[2], "--json")
    assert one.exit_code == 0, one.stderr
    assert one.json() == {"retried": [redemptions[0]], "already_confirmed": [redemptions[2]]}
    listed = messages(credex)
    assert listed[redemptions[0]]["state"] == "pending" and listed[redemptions[0]]["attempts"] == 0
    assert listed[redemptions[1]]["state"] == "dead"

    rest = credex("relay", "retry", "--dead")
    assert rest.exit_code == 0 and "due now: 1 message(s)" in rest.stdout
    assert credex("relay", "status", "--json").json()["dead"] == 0
    assert {m.id for m in claim(db_url, now=datetime.now(UTC))} == set(redemptions[:2])


def test_relay_retry_with_an_unknown_id_changes_nothing(db_url, credex, redemptions):
    bury(db_url, max_attempts=0)
    result = credex("relay", "retry", redemptions[0], "no-such-message", "--json")
    assert result.exit_code == 1
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "unknown_message" and "no-such-message" in error["message"]
    assert credex("relay", "status", "--json").json()["dead"] == 3
    usage = credex("relay", "retry")
    assert usage.exit_code == 2 and "give message ids or --dead" in usage.stderr


def test_relay_purge_deletes_only_messages_confirmed_before_the_age(db_url, credex, redemptions):
    old = datetime.now(UTC) - timedelta(days=40)
    confirm(db_url, Confirmation(redemptions[0], "sandbox", "SIM1"), now=old)
    confirm(db_url, Confirmation(redemptions[1], "sandbox", "SIM2"), now=datetime.now(UTC))

    dry = credex("relay", "purge", "--confirmed-before", "30d", "--dry-run", "--json").json()
    assert (dry["purged"], dry["dry_run"]) == (1, True)
    assert len(messages(credex)) == 3
    done = credex("relay", "purge", "--confirmed-before", "30d")
    assert done.exit_code == 0 and "deleted 1 message(s)" in done.stdout
    assert set(messages(credex)) == set(redemptions[1:])
    assert credex("redeem", "show", "1", "--json").json()["message_id"] == redemptions[0]


@pytest.mark.parametrize("age", ["30", "thirty days", "-3d", "", "5y"])
def test_relay_purge_refuses_an_age_it_cannot_read(db_url, credex, redemptions, age):
    result = credex("relay", "purge", "--confirmed-before", age)
    assert result.exit_code == 2
    assert "--confirmed-before must look like 30d" in result.stderr
    assert len(messages(credex)) == 3


def test_the_message_body_in_the_outbox_is_what_the_warehouse_parses(db_url, credex, redemptions):
    from credex.warehouse.messages import parse_redemption_message

    (message,) = [m for m in claim(db_url, limit=1)]
    parsed = parse_redemption_message(message.body.encode())
    assert (parsed.message_id, parsed.redemption_id, parsed.sku, parsed.quantity) == (
        redemptions[0],
        1,
        "MUG",
        1,
    )
    assert parsed.address == "1 High St" and parsed.user_id == "u1"


# --- how a relay holds a batch: picked from the database, claimed, recorded or released ---------


def test_the_claim_strategy_is_picked_once_from_the_database(db_url, backend):
    from credex.db.engine import ensure_schema
    from credex.relay.claims import LockClaims, claim_strategy

    strategy = claim_strategy(ensure_schema(db_url).dialect, db_url, POLICY, relay_id="r1", lease=30.0)
    expected = LockClaims if backend == "postgres" else LeaseClaims
    assert type(strategy) is expected


def test_a_released_lease_is_due_again_at_once_for_every_relay(db_url, credex, redemptions):
    r1 = LeaseClaims(db_url, POLICY, relay_id="r1", lease=30.0)
    held = r1.claim(2, now=LATER)
    assert [m.id for m in claim(db_url, "r2")] == redemptions[2:]
    r1.release(held)  # r1 failed before recording: its claim goes, nothing is marked
    retaken = claim(db_url, "r3")
    assert [m.id for m in retaken] == redemptions[:2]
    assert all(m["state"] == "pending" and m["attempts"] == 0 for m in messages(credex).values())


@pytest.fixture
def postgres_only(backend):
    if backend != "postgres":
        pytest.skip("row locks held by an open transaction are Postgres's way to claim")


def test_row_lock_claims_pass_each_other_by_and_end_with_their_transaction(
    db_url, credex, redemptions, postgres_only
):
    from credex.relay.claims import LockClaims

    relay_a, relay_b = LockClaims(db_url, POLICY), LockClaims(db_url, POLICY)
    first = relay_a.claim(2, now=LATER)
    second = relay_b.claim(10, now=LATER)  # passes the locked rows by, never waits for them
    assert [m.id for m in first.messages] == redemptions[:2]
    assert [m.id for m in second.messages] == redemptions[2:]
    assert relay_b.claim(10, now=LATER).messages == []
    # Nothing was written to claim: the rows look untouched from outside.
    assert all(m["state"] == "pending" for m in messages(credex).values())

    # A confirmation for a held message is put off, not waited for.
    with session_for(db_url, write=True) as session:
        confirmed, put_off = record_confirmations(
            session, [Confirmation(redemptions[0], "sandbox", "SIM1")], now=LATER
        )
        session.commit()
    assert (confirmed, put_off) == (0, [redemptions[0]])

    relay_a.release(first)  # rolled back: the locks go, the messages are due for anyone
    tally = relay_b.record(second, dict.fromkeys(redemptions[2:]), now=LATER)
    assert tally.sent == 1
    again = relay_b.claim(10, now=LATER)
    assert [m.id for m in again.messages] == redemptions[:2]
    relay_b.release(again)
    listed = messages(credex)
    assert listed[redemptions[2]]["state"] == "sent" and listed[redemptions[0]]["state"] == "pending"


def test_a_relay_that_dies_holding_row_locks_leaves_nothing_claimed(db_url, redemptions, postgres_only):
    from sqlalchemy import text

    from credex.relay.claims import LockClaims
    from tests.support import pg_admin

    dying = LockClaims(db_url, POLICY).claim(10, now=LATER)
    assert len(dying.messages) == 3
    pid = dying.session.execute(text("SELECT pg_backend_pid()")).scalar()
    with pg_admin() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))  # as if the relay were killed
        # The signal is only sent: the backend ends its transaction and lets go of its locks
        # (the row locks ride on its transaction's own lock) a moment later.
        deadline = time.monotonic() + 30
        while admin.execute("SELECT 1 FROM pg_locks WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, "the terminated backend is still there after 30 s"
            time.sleep(0.01)
    survivor = LockClaims(db_url, POLICY).claim(10, now=LATER)
    assert [m.id for m in survivor.messages] == redemptions
    LockClaims(db_url, POLICY).release(survivor)
    dying.session.invalidate()
