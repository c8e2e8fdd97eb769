"""The relay: publish due outbox messages with publisher confirms, take the warehouse's
confirmations, and publish again what is not confirmed in time, until every message is confirmed.

Everything it knows lives in the database (claims with a lease, attempts, due times), so a relay
can be killed at any moment: the next one, or another one running beside it, carries on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from credex.broker import Broker, BrokerLost, Delivery, Outgoing, Worker, display_amqp_url
from credex.db.engine import open_session, session_for, translate_db_error
from credex.db.models import utcnow
from credex.errors import Unavailable
from credex.relay.outbox import (
    ClaimedMessage,
    Confirmation,
    PublishTally,
    RetryPolicy,
    bury_exhausted,
    claim_due_messages,
    lock_due_messages,
    record_confirmations,
    record_publish_outcomes,
)
from credex.relay.topology import REDEMPTION_CREATED, Names

log = logging.getLogger("credex.relay")

PIPELINE_DEPTH = 2  # batches in flight at once


@dataclass(frozen=True)
class RelayOptions:
    batch_size: int = 1000
    lease: float = 60.0  # how long a claim holds if the relay dies with it
    poll_interval: float = 0.5  # how often an idle relay looks for due messages
    once: bool = False
    policy: RetryPolicy = RetryPolicy()


@dataclass
class RelayReport:
    published: int = 0  # confirmed by the broker
    failed: int = 0  # refused, unroutable or lost on the way
    dead: int = 0
    confirmed: int = 0  # by the warehouse
    repeated_confirmations: int = 0
    malformed_confirmations: int = 0
    reconnects: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def relay_id() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Claim:
    """A batch taken for publishing. On Postgres its session stays open: the transaction's row
    locks are the claim, until the outcome is recorded and committed in it."""

    messages: list[ClaimedMessage]
    session: Session | None = None


class Relay(Worker):
    """``run()`` until ``stop()`` (or one pass with ``once``); ``stop()`` lets the batch in hand
    finish: its publishes confirmed and recorded, the confirmations taken so far recorded and acked."""

    def __init__(
        self,
        database_url: str,
        amqp_url: str,
        names: Names,
        options: RelayOptions,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.database_url = database_url
        self.options = options
        self.clock = clock
        self.id = relay_id()
        self.report = RelayReport()
        self.log = log
        self._put_off: list[Delivery] = []  # confirmations of messages held locked: next turn
        self._holds_locks = database_url.startswith(("postgresql", "postgres"))
        self.broker = Broker(
            amqp_url,
            names,
            queue=names.confirmations_queue,
            prefetch=max(100, 2 * options.batch_size),
            connection_name=f"credex relay {self.id}",
        )

    def run(self) -> RelayReport:
        from credex.db.engine import ensure_schema

        ensure_schema(self.database_url)  # unreachable or not migrated: say so before anything else
        self.broker.open()  # unreachable at start: Unavailable, exit 69
        log.info(
            "relay %s connected to %s: publishing to %s, confirmations from %s",
            self.id,
            display_amqp_url(self.broker.url),
            self.broker.names.exchange,
            self.broker.queue,
        )
        # The database work runs on a thread of its own, in order, while this thread keeps the
        # broker busy: a batch is claimed while the one before is being stored and confirmed.
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-db")
        try:
            if self.options.once:
                self._one_pass()
            else:
                self._until_stopped()
        except BrokerLost as lost:
            raise Unavailable(f"lost the broker {display_amqp_url(self.broker.url)}: {lost}") from None
        finally:
            self._db.shutdown(wait=True)
            self.broker.close()
        return self.report

    def _in_db(self, work: Callable, *args) -> Future:
        return self._db.submit(work, *args)

    def _await(self, future: Future):
        return self.broker.wait_for(future)

    # --- the two ways to run ------------------------------------------------------------------

    def _one_pass(self) -> None:
        """For cron: take the confirmations waiting, publish everything due, take what came back."""
        self._drain_confirmations(expected=self.broker.ready_at_open)
        self._publish_due()
        self._take_confirmations()
        if self.broker.lost:
            raise BrokerLost(self.broker.lost)

    def _until_stopped(self) -> None:
        self.run_until_stopped(self._one_turn)
        if not self.broker.lost:
            self._take_confirmations()

    def _one_turn(self) -> None:
        if self.broker.lost:
            raise BrokerLost(self.broker.lost)
        self._take_confirmations()
        published = self._publish_due()
        if self.broker.lost:
            raise BrokerLost(self.broker.lost)
        if published < self.options.batch_size and not self._stopping:
            self.broker.wait(
                self.options.poll_interval,
                until=lambda: self._stopping or self.broker.buffered >= self.options.batch_size,
            )

    def forget_deliveries(self) -> None:
        self._put_off = []

    # --- the work -----------------------------------------------------------------------------

    def _publish_due(self) -> int:
        """Publish everything due, batch by batch. The database thread and this one work at once:
        while this thread publishes a batch, the database records the batch published before it
        (once the broker has confirmed or refused all of it) and claims the next. Returns the
        number of messages claimed."""
        in_flight: deque[Claim] = deque()
        published_before = self.report.published
        steps: list[Future] = [self._in_db(self._database_step, None, True)]  # the one under way, if any
        try:
            claimed_total = self._publish_loop(in_flight, steps)
        except BaseException:
            self._release(in_flight, steps)
            raise
        if claimed_total:
            log.info(
                "published %d of %d due message(s)", self.report.published - published_before, claimed_total
            )
        return claimed_total

    def _publish_loop(self, in_flight: deque[Claim], steps: list[Future]) -> int:
        claimed_total, more = 0, True
        while steps:
            tally, claim = self._await(steps.pop())
            self._tally(tally)
            batch = claim.messages
            more = (
                more and len(batch) == self.options.batch_size and not self._stopping and not self.broker.lost
            )
            if batch and in_flight and len(in_flight) + 1 >= PIPELINE_DEPTH:
                steps.append(self._record_oldest(in_flight, claim=more))
            elif batch and more:
                steps.append(self._in_db(self._database_step, None, True))
            if batch:
                self.broker.send(
                    [Outgoing(m.id, m.routing_key, m.body.encode(), REDEMPTION_CREATED) for m in batch]
                )
                in_flight.append(claim)
                claimed_total += len(batch)
            elif claim.session is not None:
                self._in_db(claim.session.close)
            if not steps and in_flight:
                steps.append(self._record_oldest(in_flight, claim=more))
            if self.broker.buffered >= self.options.batch_size:
                self._take_confirmations()
        return claimed_total

    def _release(self, in_flight: deque[Claim], steps: list[Future]) -> None:
        """After a failure: end the transactions of the batches in flight and of the one being
        claimed (their locks go; on SQLite their leases run out)."""
        for step in steps:
            with contextlib.suppress(BaseException):  # the step's own failure closed its session
                in_flight.append(step.result()[1])
        for claim in in_flight:
            if claim.session is not None:
                self._in_db(claim.session.close)
        in_flight.clear()

    def _record_oldest(self, in_flight: deque[Claim], *, claim: bool) -> Future:
        """Hand the database the oldest batch in flight, with what the broker said of it."""
        oldest = in_flight.popleft()
        outcomes = self.broker.collect([m.id for m in oldest.messages])
        return self._in_db(self._database_step, (oldest, outcomes), claim)

    def _database_step(
        self, published: tuple[Claim, dict[str, str | None]] | None, claim: bool
    ) -> tuple[PublishTally, Claim]:
        """On the database thread: record what the broker said of a published batch, bury messages
        out of attempts, claim the next batch. SQLite: one transaction, the claim a lease.
        Postgres: the record commits the published batch's own transaction, and the next batch is
        locked in a new one that stays open until its own record."""
        try:
            return self._database_step_in(published, claim)
        except DBAPIError as error:
            for held in [published[0]] if published else []:
                if held.session is not None:
                    held.session.close()
            raise translate_db_error(error) or error from None

    def _database_step_in(
        self, published: tuple[Claim, dict[str, str | None]] | None, claim: bool
    ) -> tuple[PublishTally, Claim]:
        policy = self.options.policy
        tally, claimed = PublishTally(), Claim([])
        if self._holds_locks:
            if published is not None:
                held, outcomes = published
                with held.session as session:  # closed afterwards: its locks go with the commit
                    tally = self._record(session, held, outcomes, relay_id=None)
                    session.commit()
            if claim:
                session = open_session(self.database_url, write=True)
                try:
                    relaxed_commit(session)
                    if policy.max_attempts:
                        tally.dead += bury_exhausted(
                            session, max_attempts=policy.max_attempts, now=self.clock()
                        )
                    messages = lock_due_messages(session, limit=self.options.batch_size, now=self.clock())
                except BaseException:
                    session.close()
                    raise
                claimed = Claim(messages, session)
            return tally, claimed
        with session_for(self.database_url, write=True) as session:
            if published is not None:
                held, outcomes = published
                tally = self._record(session, held, outcomes, relay_id=self.id)
            if claim:
                if policy.max_attempts:
                    tally.dead += bury_exhausted(session, max_attempts=policy.max_attempts, now=self.clock())
                claimed = Claim(
                    claim_due_messages(
                        session,
                        relay_id=self.id,
                        limit=self.options.batch_size,
                        lease=self.options.lease,
                        now=self.clock(),
                    )
                )
            session.commit()
        return tally, claimed

    def _record(
        self, session: Session, held: Claim, outcomes: dict[str, str | None], *, relay_id
    ) -> PublishTally:
        tally = record_publish_outcomes(
            session,
            relay_id=relay_id,
            claimed=held.messages,
            outcomes=outcomes,
            policy=self.options.policy,
            now=self.clock(),
        )
        if tally.failed:
            reasons = sorted({reason for reason in outcomes.values() if reason})
            log.warning(
                "%d of %d messages not published: %s", tally.failed, len(held.messages), "; ".join(reasons)
            )
        return tally

    def _tally(self, tally: PublishTally) -> None:
        self.report.published += tally.sent
        self.report.failed += tally.failed
        self.report.dead += tally.dead

    def _take_confirmations(self) -> int:
        """Record the confirmations received so far, then ack them. Returns how many were taken.
        Those whose message a relay holds locked right now (Postgres) wait for the next turn."""
        deliveries = self._put_off + self.broker.take_deliveries()
        self._put_off = []
        if not deliveries:
            return 0
        confirmations: dict[int, Confirmation] = {}
        for delivery in deliveries:
            confirmation = parse_confirmation(delivery.properties, delivery.body)
            if confirmation is None:
                self.report.malformed_confirmations += 1
                log.error("dropped a malformed confirmation (message id %s)", delivery.properties.message_id)
            else:
                confirmations[delivery.tag] = confirmation
        confirmed, put_off = self._await(
            self._in_db(self._record_confirmations, list(confirmations.values()))
        )
        self._put_off = [
            d for d in deliveries if d.tag in confirmations and confirmations[d.tag].message_id in put_off
        ]
        # Acked only after the commit: a relay killed before this point gets them again.
        waiting = {d.tag for d in self._put_off}
        done = [d.tag for d in deliveries if d.tag not in waiting]
        if self._put_off:
            for tag in done:
                self.broker.ack(tag)
        elif done:
            self.broker.ack(max(done), multiple=True)
        self.report.confirmed += confirmed
        self.report.repeated_confirmations += len(confirmations) - confirmed - len(self._put_off)
        if confirmed:
            log.info("recorded %d confirmation(s) from the warehouse", confirmed)
        return len(done)

    def _record_confirmations(self, confirmations: list[Confirmation]) -> tuple[int, set[str]]:
        with session_for(self.database_url, write=True) as session:
            relaxed_commit(session)
            confirmed, put_off = record_confirmations(session, confirmations, now=self.clock())
            session.commit()
        return confirmed, set(put_off)

    def _drain_confirmations(self, *, expected: int) -> None:
        """Take the confirmations that were waiting in the queue (other relays may take some)."""
        left = expected
        while left > 0 and not self._stopping:
            want = min(left, self.broker.prefetch)
            self.broker.wait(1.0, until=lambda w=want: self.broker.buffered >= w)
            taken = self._take_confirmations()
            if not taken:
                return
            left -= taken


def relaxed_commit(session) -> None:
    """Postgres need not flush the relay's commits to disk before answering: everything the relay
    writes can be lost in a server crash without harm (a lost claim or "sent" means one more
    publish, a lost "confirmed" one more confirmation from the warehouse), and never half-way."""
    if session.bind.dialect.name == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))


def parse_confirmation(properties, body: bytes) -> Confirmation | None:
    """A shipment.requested message (messaging.md): the outbox message it confirms is its
    ``correlation_id`` (or the body's ``message_id``)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    message_id = properties.correlation_id or data.get("message_id")
    express_no, carrier = data.get("express_no"), data.get("carrier")
    if not isinstance(message_id, str) or not message_id:
        return None
    if not isinstance(express_no, str) or not express_no:
        return None
    return Confirmation(message_id, carrier if isinstance(carrier, str) else None, express_no)
