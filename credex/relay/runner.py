"""The relay: publish due outbox messages with publisher confirms, take the warehouse's
confirmations, and publish again what is not confirmed in time, until every message is confirmed.

Everything it knows lives in the database (claims, attempts, due times), so a relay can be killed
at any moment: the next one, or another one running beside it, carries on.

Two threads: this one drives the broker (publishing, confirms, deliveries, heartbeats) and the
relay's database thread runs every database step in order, so that a batch is claimed and the one
before it recorded while another is being published.

An idle relay waits for whichever comes first: a wake-up from the database (``wakeups``: a
message became due), a confirmation from the warehouse, the next due time it knows of (a message
waiting to be published again), or the poll interval, the safety net for a wake-up lost.

(Over 400 lines on purpose: the broker thread's turn and the database steps it hands over are one
state machine, whose order of hand-overs is the relay's guarantee; claims, answers and the outbox's
statements already live in their own modules.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime

from sqlalchemy.exc import DBAPIError

from credex.amqp.broker import Broker, Delivery
from credex.amqp.confirms import Outgoing
from credex.amqp.connection import RPC_TIMEOUT_S
from credex.db.engine import ensure_schema, session_for, vacuum_warning
from credex.db.failures import translate_db_error
from credex.db.models import utcnow
from credex.errors import Unavailable, json_object
from credex.metrics import RelayMetrics, new_registry
from credex.points.planner import INT64_MAX
from credex.points.rules import CARRIER_MAX, EXPRESS_NO_MAX, MESSAGE_ID_MAX, cleaned, text_problem
from credex.relay.answers import (
    CANCEL_OUTCOMES,
    CancelAnswer,
    Confirmation,
    Dropped,
    FailedAnswer,
    record_cancel_answers,
    record_confirmations,
    record_failures,
)
from credex.relay.claims import Claim, ClaimStrategy, claim_strategy
from credex.relay.outbox import PublishTally, RedeliveryPolicy
from credex.relay.topology import (
    SHIPMENT_CANCELLED,
    SHIPMENT_FAILED,
    SHIPMENT_REQUESTED,
    Names,
)
from credex.relay.wakeups import Wakeups, outbox_wakeups
from credex.retry import Backoff
from credex.worker import Worker

_VACUUM_WARNED: set[str] = set()  # database URLs whose vacuum warning this process gave
log = logging.getLogger("credex.relay")

PIPELINE_DEPTH = 3  # batches claimed or published at once, besides those being recorded
# Polling is the safety net behind the wake-ups: a wake-up lost costs at most this.
DEFAULT_POLL_INTERVAL = 5.0
# Seconds before looking again when a due message was found held by another relay (or a
# confirmation put off for a message held right now): it is free again in a moment.
HELD_WAIT = 0.25
REASON_LONGEST = 1000  # of a warehouse's reason kept (cleaned of control characters)
PUT_OFF_WAIT = 0.01


@dataclass(frozen=True)
class RelayOptions:
    batch_size: int = 1000
    lease: float = 60.0  # SQLite: how long a claim holds if the relay dies with it
    poll_interval: float = DEFAULT_POLL_INTERVAL  # how often an idle relay looks with no wake-up
    wakeups: bool = True  # listen for due messages (Postgres NOTIFY, SQLite's data version)
    once: bool = False
    policy: RedeliveryPolicy = field(default_factory=RedeliveryPolicy)
    operator: str = "relay"  # recorded on the refunds the warehouse's cancel answers bring


@dataclass
class RelayReport:
    published: int = 0  # confirmed by the broker
    failed: int = 0  # refused, unroutable or lost on the way
    dead: int = 0
    confirmed: int = 0  # by the warehouse
    repeated_confirmations: int = 0
    unknown_confirmations: int = 0  # for a message the outbox does not know
    malformed_confirmations: int = 0  # a bad body, or one naming another redemption than its message's
    reconnects: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def new_relay_id() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def relay_broker(
    amqp_url: str,
    names: Names,
    options: RelayOptions,
    relay_id: str,
    *,
    publish_timeout: float = RPC_TIMEOUT_S,
) -> Broker:
    """The relay's side of the broker: it publishes redemption messages and consumes confirmations."""
    return Broker(
        amqp_url,
        names.topology(),
        consume=names.confirmations_queue,
        prefetch=max(100, 2 * options.batch_size),
        connection_name=f"credex relay {relay_id}",
        publish_timeout=publish_timeout,
    )


def make_relay(
    database_url: str,
    amqp_url: str,
    names: Names,
    options: RelayOptions,
    *,
    clock: Callable[[], datetime] = utcnow,
    publish_timeout: float = RPC_TIMEOUT_S,
) -> Relay:
    relay_id = new_relay_id()
    broker = relay_broker(amqp_url, names, options, relay_id, publish_timeout=publish_timeout)
    return Relay(database_url, broker, options, relay_id=relay_id, clock=clock)


@dataclass
class _Pipeline:
    """The batches of one publishing pass, oldest first at each stage."""

    claiming: deque[Future] = field(default_factory=deque)  # claims the database is taking
    in_flight: deque[Claim] = field(default_factory=deque)  # published, their confirms awaited
    recording: list[Future] = field(default_factory=list)  # outcomes the database is recording


class Relay(Worker[RelayReport]):
    """``stop()`` lets the batch in hand finish: its publishes confirmed and recorded, the
    confirmations taken so far recorded and acked."""

    def __init__(
        self,
        database_url: str,
        broker: Broker,
        options: RelayOptions,
        *,
        report: RelayReport | None = None,
        relay_id: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        metrics: RelayMetrics | None = None,
    ) -> None:
        super().__init__(broker, report or RelayReport(), log=log, once=options.once)
        self.database_url = database_url
        self.options = options
        self.clock = clock
        self.id = relay_id or new_relay_id()
        self.metrics = metrics or RelayMetrics(new_registry())
        self.claims: ClaimStrategy | None = None  # picked from the database in prepare()
        self._db: ThreadPoolExecutor | None = None
        self._put_off: list[Delivery] = []  # confirmations of messages held locked: next turn
        self._wakeups: Wakeups | None = None
        self._due = threading.Event()  # a wake-up came: claim before waiting again
        self._more = False  # the last pass claimed a full batch: claim again at once
        self._next_look = 0.0  # monotonic time of the next claim without a wake-up (0: now)
        self._known_due: float | None = None  # the earliest due time known (monotonic)

    def __str__(self) -> str:
        return f"relay {self.id}"

    # --- the worker's life ----------------------------------------------------------------------

    def prepare(self) -> None:
        engine = ensure_schema(self.database_url)  # unreachable or not migrated: say so first
        if self.database_url not in _VACUUM_WARNED and (warning := vacuum_warning(engine)) is not None:
            _VACUUM_WARNED.add(self.database_url)  # once per process, not once per `--once` pass
            log.warning(warning)
        self.claims = claim_strategy(
            engine.dialect,
            self.database_url,
            self.options.policy,
            relay_id=self.id,
            lease=self.options.lease,
        )
        self._db = ThreadPoolExecutor(max_workers=self.claims.writers, thread_name_prefix="relay-db")
        self.metrics.watch_outbox(self._outbox_status)
        if not self.once and self.options.wakeups:
            self._wakeups = outbox_wakeups(engine.dialect.name, self.database_url, self._woken)
            self._wakeups.start()

    def _woken(self) -> None:
        """From the wake-ups' thread: a message may be due now."""
        self._due.set()
        self.broker.wake()

    def _outbox_status(self) -> dict:
        """At scrape time, on the metrics server's thread."""
        from credex.relay.operators import outbox_status

        with session_for(self.database_url) as session:
            return outbox_status(session)

    def connected(self) -> None:
        log.info(
            "%s connected to %s: publishing to %s, confirmations from %s",
            self,
            self.broker.where,
            self.broker.topology.exchange,
            self.broker.queue,
        )

    def one_pass(self) -> None:
        """For cron: take the confirmations waiting, publish everything due, take what came back."""
        self._drain_confirmations(expected=self.broker.ready_at_open)
        self._publish_due()
        self._take_confirmations()

    def turn(self) -> None:
        self.broker.raise_if_lost()
        self._take_confirmations()
        if self._time_to_claim():
            self._due.clear()  # a wake-up from now on means another look
            try:
                published = self._publish_due()
            except BaseException:
                self._next_look = 0.0  # what it was about is due again: claim on the next turn
                raise
            self.broker.raise_if_lost()  # what was in flight is recorded as failed; reconnect now
            self._more = published >= self.options.batch_size
            if not self._more:
                self._plan_next_look()
        if not self._more and not self.stopping:
            wait = max(0.0, self._next_look - time.monotonic())
            self.broker.wait(min(wait, PUT_OFF_WAIT) if self._put_off else wait, until=self._work_waiting)

    def _work_waiting(self) -> bool:
        return self.stopping or self._due.is_set() or self.broker.buffered > 0 or self._time_to_claim()

    def _time_to_claim(self) -> bool:
        """A wake-up came, a full batch says there are more, or the look planned is due (a
        confirmation alone is recorded without claiming)."""
        return self._due.is_set() or self._more or time.monotonic() >= self._next_look

    def _plan_next_look(self) -> None:
        """After a pass that emptied what was due: the next look without a wake-up is at the next
        due time known, never later than the poll interval. The database is asked for it only when
        what this relay knows ran out (its own publishes tell it the rest, see ``_remember_due``)."""
        now = time.monotonic()
        if self._known_due is None or self._known_due <= now:
            due_in = self._await(self._in_db(self._seconds_to_next_due))
            # <= 0: due now but held by another relay (or just became due): look again shortly.
            self._known_due = None if due_in is None else now + (due_in if due_in > 0 else HELD_WAIT)
        poll = now + self.options.poll_interval
        self._next_look = poll if self._known_due is None else min(poll, self._known_due)

    def _remember_due(self, held: Claim, outcomes: dict[str, str | None]) -> None:
        """The earliest time the messages just published (or failed) can be due again: no later
        than this, the relay looks."""
        if not held.messages:
            return
        attempt = min(m.attempts for m in held.messages) + 1
        policy = self.options.policy  # its waits without their stretch: the earliest they can end
        wait = Backoff(policy.confirm_timeout, max(policy.confirm_timeout, policy.max_confirm_timeout)).step(
            attempt
        )
        if any(outcome is not None for outcome in outcomes.values()):
            wait = min(wait, Backoff(min(1.0, policy.confirm_timeout), policy.confirm_timeout).step(attempt))
        due = time.monotonic() + wait
        if self._known_due is None or due < self._known_due:
            self._known_due = due
        self._next_look = min(self._next_look, due)

    def _seconds_to_next_due(self) -> float | None:
        return self.claims.seconds_to_next_due(now=self.clock())

    def finish(self) -> None:
        try:
            self._take_confirmations()
        except Unavailable as error:  # they come back to a relay, unacked
            log.warning("%s; the confirmations in hand come back", error.message)

    def broker_lost(self) -> None:
        self._put_off = []
        self._next_look = 0.0  # claim as soon as the broker is back

    def cleanup(self) -> None:
        if self._wakeups is not None:
            self._wakeups.stop()
        if self._db is not None:
            self._db.shutdown(wait=True)

    # --- the database thread ------------------------------------------------------------------

    def _in_db(self, work: Callable, *args) -> Future:
        return self._db.submit(self._translated, work, *args)

    @staticmethod
    def _translated(work: Callable, *args):
        """A lost database as Unavailable: the worker waits and tries again."""
        try:
            return work(*args)
        except DBAPIError as error:
            raise translate_db_error(error) or error from None

    def _await(self, future: Future):
        """The result of database work, the broker answered meanwhile (heartbeats, confirms,
        deliveries) for as long as it takes: the database bounds its own waits."""
        future.add_done_callback(lambda _future: self.broker.wake())
        while not future.done():
            self.broker.wait(1.0, until=future.done)
        return future.result()

    # --- publishing ---------------------------------------------------------------------------

    def _publish_due(self) -> int:
        """Publish everything due, batch by batch, three kinds of work overlapping: the database
        claims the next batch while this thread publishes one and the database records the one
        before it (once the broker has confirmed or refused all of it). Returns the number of
        messages claimed."""
        pipeline = _Pipeline()
        published_before = self.report.published
        try:
            claimed_total = self._publish_loop(pipeline)
        except BaseException:
            self._release(pipeline)
            raise
        if claimed_total:
            log.info(
                "published %d of %d due message(s)",
                self.report.published - published_before,
                claimed_total,
                extra={"relay_id": self.id},
            )
        return claimed_total

    def _publish_loop(self, pipeline: _Pipeline) -> int:
        claimed_total, more, size = 0, True, self.options.batch_size
        while True:
            # One claim at first; more ahead of publishing only once a full batch says there are.
            ahead = PIPELINE_DEPTH if claimed_total else 1
            while more and len(pipeline.claiming) + len(pipeline.in_flight) < ahead:
                claiming = self._in_db(self._claim)
                claiming.add_done_callback(lambda _future: self.broker.wake())
                pipeline.claiming.append(claiming)
            if not pipeline.claiming and not pipeline.in_flight:
                break
            progressed = False
            if pipeline.claiming and pipeline.claiming[0].done():
                claim = pipeline.claiming.popleft().result()
                progressed = True
                self.report.dead += claim.buried
                self.metrics.dead.inc(claim.buried)
                # A full batch says there are more. So does any batch claimed beside another one:
                # on Postgres, claims running at once pass by each other's rows, so a short one
                # proves nothing; only an empty one ends the pass then.
                beside = claimed_total > 0
                more = (
                    (len(claim.messages) == size or (beside and bool(claim.messages)))
                    and not self.stopping
                    and not self.broker.lost
                )
                if claim.messages:
                    self.broker.send(
                        [
                            Outgoing(m.id, m.routing_key, m.body.encode(), m.routing_key)
                            for m in claim.messages
                        ]
                    )
                    pipeline.in_flight.append(claim)
                    claimed_total += len(claim.messages)
            # Each batch the broker has answered for goes to be recorded, oldest first, while the
            # next claims are under way. With no claim under way, the oldest is waited for
            # (``collect`` bounds that wait and gives up on a broker that stopped confirming).
            while pipeline.in_flight and (
                not pipeline.claiming or self.broker.confirmed(_ids(pipeline.in_flight[0]))
            ):
                oldest = pipeline.in_flight.popleft()
                outcomes = self.broker.collect(_ids(oldest))
                self._remember_due(oldest, outcomes)
                pipeline.recording.append(self._in_db(self._record, oldest, outcomes))
                progressed = True
            if self.broker.buffered >= size:
                self._take_confirmations()
            if not progressed and pipeline.claiming:
                # Until the next claim is in or the oldest batch is answered for.
                claimed = pipeline.claiming[0]
                answered = _ids(pipeline.in_flight[0]) if pipeline.in_flight else None
                self.broker.wait(1.0, until=lambda c=claimed, a=answered: self._claimed_or_answered(c, a))
        for recorded in pipeline.recording:
            self._tally(self._await(recorded))
        pipeline.recording.clear()
        return claimed_total

    def _claimed_or_answered(self, claiming: Future, answered: list[str] | None) -> bool:
        return claiming.done() or (answered is not None and self.broker.confirmed(answered))

    def _release(self, pipeline: _Pipeline) -> None:
        """After a failure: give up the batches in flight and those being claimed (on Postgres
        their locks go; on SQLite their leases are cleared), on the database threads."""
        held = list(pipeline.in_flight)
        for claiming in pipeline.claiming:
            with contextlib.suppress(BaseException):  # a claim that failed holds nothing
                held.append(claiming.result())
        for claim in held:
            self._db.submit(_quietly, self.claims.release, claim)
        for recorded in pipeline.recording:
            with contextlib.suppress(BaseException):  # a failed record ended its claim too
                self._tally(recorded.result())
        pipeline.claiming.clear()
        pipeline.in_flight.clear()
        pipeline.recording.clear()

    def _claim(self) -> Claim:
        """On a database thread: the next batch of due messages."""
        return self.claims.claim(self.options.batch_size, now=self.clock())

    def _record(self, held: Claim, outcomes: dict[str, str | None]) -> PublishTally:
        """On a database thread: what the broker said of a published batch (its claim ends)."""
        tally = self.claims.record(held, outcomes, now=self.clock())
        if tally.failed:
            for message in held.messages:
                reason = outcomes.get(message.id, "not published")
                if reason is not None:
                    self.metrics.publish_failures.labels(failure_kind(reason)).inc()
            reasons = sorted({reason for reason in outcomes.values() if reason})
            log.warning(
                "%d of %d messages not published: %s", tally.failed, len(held.messages), "; ".join(reasons)
            )
        return tally

    def _tally(self, tally: PublishTally) -> None:
        self.report.published += tally.sent
        self.report.failed += tally.failed
        self.report.dead += tally.dead
        self.metrics.published.inc(tally.sent)
        self.metrics.dead.inc(tally.dead)

    # --- confirmations ------------------------------------------------------------------------

    def _take_confirmations(self) -> int:
        """Record the confirmations received so far, then ack them. Returns how many were taken.
        Those whose message a relay holds locked right now (Postgres) wait for the next turn, and
        so do all of them when the database could not record them."""
        deliveries = self._put_off + self.broker.take_deliveries()
        self._put_off = []
        if not deliveries:
            return 0
        confirmations: dict[int, Confirmation | CancelAnswer | FailedAnswer] = {}
        for delivery in deliveries:
            confirmation = parse_answer(delivery.properties, delivery.body)
            if confirmation is None:
                self.report.malformed_confirmations += 1
                log.error(
                    "dropped a malformed confirmation (type %s, message id %s): unknown type or bad body",
                    delivery.properties.type,
                    delivery.properties.message_id,
                )
                self.broker.ack(delivery.tag)
            else:
                confirmations[delivery.tag] = confirmation
        if not confirmations:
            return len(deliveries)
        waiting = [d for d in deliveries if d.tag in confirmations]
        try:
            confirmed, put_off, dropped = self._await(
                self._in_db(self._record_confirmations, list(confirmations.values()))
            )
        except BaseException:
            self._put_off = waiting  # not recorded: tried again, never acked before they are
            raise
        self._put_off = [d for d in waiting if confirmations[d.tag].message_id in put_off]
        # Acked only after the commit: a relay killed before this point gets them again.
        held = {d.tag for d in self._put_off}
        done = [d.tag for d in waiting if d.tag not in held]
        if self._put_off:
            for tag in done:
                self.broker.ack(tag)
        elif done:
            self.broker.ack(max(done), multiple=True)
        unknown, mismatched = self._dropped(waiting, confirmations, dropped)
        self.report.confirmed += confirmed
        self.metrics.confirmed.inc(confirmed)
        self.report.unknown_confirmations += unknown
        self.report.malformed_confirmations += mismatched
        self.report.repeated_confirmations += (
            len(confirmations) - confirmed - len(self._put_off) - unknown - mismatched
        )
        if confirmed:
            log.info("recorded %d confirmation(s) from the warehouse", confirmed, extra={"relay_id": self.id})
        return len(deliveries) - len(self._put_off)

    @staticmethod
    def _dropped(waiting: list[Delivery], answers: dict, dropped: Dropped) -> tuple[int, int]:
        """Log the answers that recorded nothing for want of their message, or naming another
        redemption than their message's (ids only: an answer's body is the warehouse's). Returns
        how many of each."""
        unknown = mismatched = 0
        for delivery in waiting:
            answer = answers[delivery.tag]
            if answer.message_id in dropped.unknown:
                unknown += 1
                log.warning(
                    "dropped an answer (type %s) for message %s, which the outbox does not know",
                    delivery.properties.type,
                    answer.message_id,
                )
                continue
            own = dropped.mismatched.get(answer.message_id, answer.redemption_id)
            if answer.redemption_id is not None and answer.redemption_id != own:
                mismatched += 1
                log.error(
                    "rejected an answer (type %s) for message %s: it names redemption %s, the message"
                    " is redemption %s's; the message stays unconfirmed",
                    delivery.properties.type,
                    answer.message_id,
                    answer.redemption_id,
                    own,
                )
        return unknown, mismatched

    def _record_confirmations(self, answers: list) -> tuple[int, set[str], Dropped]:
        """One transaction for the batch: waybills, cancel answers, final refusals."""
        now = self.clock()
        shipped = [a for a in answers if isinstance(a, Confirmation)]
        cancels = [a for a in answers if isinstance(a, CancelAnswer)]
        failures = [a for a in answers if isinstance(a, FailedAnswer)]
        written: list[datetime] = []  # when each message confirmed now was written
        dead, dropped = 0, Dropped()
        with session_for(self.database_url, write=True) as session:
            confirmed, put_off = 0, []
            if shipped and not (cancels or failures):
                # A lost confirmation comes again; a refund must not be lost.
                self.claims.relax_commit(session)
            if shipped:
                confirmed, put_off = record_confirmations(
                    session, shipped, now=now, created=written, dropped=dropped
                )
            if failures:
                dead, held = record_failures(session, failures, now=now, dropped=dropped)
                confirmed, put_off = confirmed + dead, put_off + held
            if cancels:
                changed, held = record_cancel_answers(
                    session, cancels, now=now, operator=self.options.operator, dropped=dropped
                )
                confirmed, put_off = confirmed + changed, put_off + held
            session.commit()
        recorded = utcnow()
        for created_at in written:
            self.metrics.confirm_seconds.observe(max(0.0, (recorded - created_at).total_seconds()))
        self.metrics.dead.inc(dead)  # the carrier refused these for good (shipment.failed)
        return confirmed, set(put_off), dropped

    def _drain_confirmations(self, *, expected: int) -> None:
        """Take the confirmations that were waiting in the queue (other relays may take some)."""
        left = expected
        while left > 0 and not self.stopping:
            want = min(left, self.broker.prefetch)
            self.broker.wait(1.0, until=lambda w=want: self.broker.buffered >= w)
            taken = self._take_confirmations()
            if not taken:
                return
            left -= taken


def _ids(claim: Claim) -> list[str]:
    return [m.id for m in claim.messages]


def failure_kind(reason: str) -> str:
    """A failed publish's reason (``PublisherConfirms``, ``Connection``) as a metric label."""
    if reason.startswith("unroutable"):
        return "unroutable"
    if reason.startswith("nacked"):
        return "nacked"
    if reason.startswith("no publisher confirm"):
        return "timeout"
    return "connection_lost"


def _quietly(work: Callable, *args) -> None:
    with contextlib.suppress(Exception):  # cleaning up after a failure: the failure is what counts
        work(*args)


def parse_answer(properties, body: bytes) -> Confirmation | CancelAnswer | FailedAnswer | None:
    """One of the warehouse's answers by its ``type`` (messaging.md; none: shipment.requested, as
    the first warehouses sent it), or None for an unknown type or a malformed body."""
    kind = properties.type or SHIPMENT_REQUESTED
    if kind == SHIPMENT_REQUESTED:
        return parse_confirmation(properties, body)
    if kind not in (SHIPMENT_CANCELLED, SHIPMENT_FAILED):
        return None
    data = json_object(body)
    message_id = None if data is None else _message_id(properties, data)
    if message_id is None or not _names_a_redemption_or_none(data):
        return None
    reason = data.get("reason")
    reason = (cleaned(reason, REASON_LONGEST) or None) if isinstance(reason, str) else None
    if kind == SHIPMENT_FAILED:
        return FailedAnswer(
            message_id, reason or "the carrier refused the shipment", data.get("redemption_id")
        )
    outcome = data.get("outcome")
    if outcome not in CANCEL_OUTCOMES:
        return None
    return CancelAnswer(message_id, outcome, reason, data.get("redemption_id"))


def parse_confirmation(properties, body: bytes) -> Confirmation | None:
    """A shipment.requested message (messaging.md): the outbox message it confirms is its
    ``correlation_id`` (or the body's ``message_id``)."""
    data = json_object(body)
    if data is None:
        return None
    message_id = _message_id(properties, data)
    express_no, carrier = data.get("express_no"), data.get("carrier")
    if message_id is None or not _names_a_redemption_or_none(data):
        return None
    if text_problem(express_no, "express number", EXPRESS_NO_MAX):
        return None
    if text_problem(carrier, "carrier", CARRIER_MAX):
        carrier = None  # the waybill stands without the carrier's name
    return Confirmation(message_id, carrier, express_no, data.get("redemption_id"))


def _message_id(properties, data: dict) -> str | None:
    """The outbox message an answer is about: its correlation id, else the body's message_id; None
    when that is not a message id credex could have written (a NUL byte, say, which Postgres
    would refuse in the middle of a batch)."""
    message_id = properties.correlation_id or data.get("message_id")
    return None if text_problem(message_id, "message id", MESSAGE_ID_MAX) else message_id


def _names_a_redemption_or_none(data: dict) -> bool:
    """The body's ``redemption_id``, checked against its message's when recorded, is a redemption
    id or absent (the first warehouses' confirmations named none); anything else is malformed (a
    string, or past what the column holds: Postgres would refuse it in the middle of a batch)."""
    value = data.get("redemption_id")
    if value is None:
        return True
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= INT64_MAX
