"""The relay: publish due outbox messages with publisher confirms, take the warehouse's
confirmations, and publish again what is not confirmed in time, until every message is confirmed.

Everything it knows lives in the database (claims with a lease, attempts, due times), so a relay
can be killed at any moment: the next one, or another one running beside it, carries on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime

from credex.broker import Broker, BrokerLost, Outgoing, backoff, display_amqp_url
from credex.db.engine import session_for
from credex.db.models import utcnow
from credex.errors import Unavailable
from credex.relay.outbox import (
    Confirmation,
    RetryPolicy,
    bury_exhausted,
    claim_due_messages,
    record_confirmations,
    record_publish_outcomes,
)
from credex.relay.topology import REDEMPTION_CREATED, Names

log = logging.getLogger("credex.relay")

RECONNECT_CAP_S = 30.0


@dataclass(frozen=True)
class RelayOptions:
    batch_size: int = 500
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


class Relay:
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
        self._stopping = False
        self.broker = Broker(
            amqp_url,
            names,
            queue=names.confirmations_queue,
            prefetch=max(100, 2 * options.batch_size),
            connection_name=f"credex relay {self.id}",
        )

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> RelayReport:
        from credex.db.engine import ensure_schema

        ensure_schema(self.database_url)  # unreachable or not migrated: say so before anything else
        self.broker.open()  # unreachable at start: Unavailable, exit 69
        try:
            if self.options.once:
                self._one_pass()
            else:
                self._until_stopped()
        except BrokerLost as lost:
            raise Unavailable(f"lost the broker {display_amqp_url(self.broker.url)}: {lost}") from None
        finally:
            self.broker.close()
        return self.report

    # --- the two ways to run ------------------------------------------------------------------

    def _one_pass(self) -> None:
        """For cron: take the confirmations waiting, publish everything due, take what came back."""
        self._drain_confirmations(expected=self.broker.ready_at_open)
        while not self._stopping and self._publish_due() == self.options.batch_size:
            self._take_confirmations()
        self._take_confirmations()
        if self.broker.lost:
            raise BrokerLost(self.broker.lost)

    def _until_stopped(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                if self.broker.lost:
                    raise BrokerLost(self.broker.lost)
                self._take_confirmations()
                published = self._publish_due()
                failures = 0
                if published < self.options.batch_size and not self._stopping:
                    self.broker.wait(
                        self.options.poll_interval,
                        until=lambda: self._stopping or self.broker.buffered >= self.options.batch_size,
                    )
            except BrokerLost as lost:
                failures += 1
                self._reconnect(str(lost), failures)
            except Unavailable as error:  # the database went away for a moment: keep the broker, wait
                failures += 1
                log.warning("%s; trying again", error.message)
                self._pause(backoff(failures, base=0.5, cap=RECONNECT_CAP_S))
        if not self.broker.lost:
            self._take_confirmations()

    def _pause(self, seconds: float) -> None:
        """Wait, answering the broker if connected, and wake up at once when told to stop."""
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            step = min(0.1, max(0.0, deadline - time.monotonic()))
            try:
                self.broker.wait(step, until=lambda: self._stopping)
            except BrokerLost:
                time.sleep(step)

    def _reconnect(self, why: str, failures: int) -> None:
        log.warning("broker lost (%s); reconnecting", why)
        self.broker.close()
        while not self._stopping:
            self._pause(backoff(failures, base=0.5, cap=RECONNECT_CAP_S))
            if self._stopping:
                return
            try:
                self.broker.open()
            except Unavailable as error:
                log.warning("%s; trying again", error.message)
                failures += 1
                continue
            self.report.reconnects += 1
            log.info("reconnected to the broker")
            return

    # --- the work -----------------------------------------------------------------------------

    def _publish_due(self) -> int:
        """Claim one batch of due messages, publish it, record what the broker said. Returns the
        number claimed."""
        options, policy = self.options, self.options.policy
        with session_for(self.database_url, write=True) as session:
            if policy.max_attempts:
                self.report.dead += bury_exhausted(
                    session, max_attempts=policy.max_attempts, now=self.clock()
                )
            claimed = claim_due_messages(
                session, relay_id=self.id, limit=options.batch_size, lease=options.lease, now=self.clock()
            )
        if not claimed:
            return 0
        outcomes = self.broker.publish(
            [Outgoing(m.id, m.routing_key, m.body.encode(), REDEMPTION_CREATED) for m in claimed]
        )
        with session_for(self.database_url, write=True) as session:
            tally = record_publish_outcomes(
                session, relay_id=self.id, claimed=claimed, outcomes=outcomes, policy=policy, now=self.clock()
            )
        self.report.published += tally.sent
        self.report.failed += tally.failed
        self.report.dead += tally.dead
        if tally.failed:
            reasons = sorted({reason for reason in outcomes.values() if reason})
            log.warning("%d of %d messages not published: %s", tally.failed, len(claimed), "; ".join(reasons))
        log.info("published %d message(s)", tally.sent)
        return len(claimed)

    def _take_confirmations(self) -> int:
        """Record the confirmations received so far, then ack them. Returns how many were taken."""
        deliveries = self.broker.take_deliveries()
        if not deliveries:
            return 0
        confirmations = []
        for delivery in deliveries:
            confirmation = parse_confirmation(delivery.properties, delivery.body)
            if confirmation is None:
                self.report.malformed_confirmations += 1
                log.error("dropped a malformed confirmation (message id %s)", delivery.properties.message_id)
            else:
                confirmations.append(confirmation)
        with session_for(self.database_url, write=True) as session:
            confirmed = record_confirmations(session, confirmations, now=self.clock())
        # Acked only after the commit: a relay killed before this point gets them again.
        self.broker.ack(deliveries[-1].tag, multiple=True)
        self.report.confirmed += confirmed
        self.report.repeated_confirmations += len(confirmations) - confirmed
        if confirmed:
            log.info("recorded %d confirmation(s) from the warehouse", confirmed)
        return len(deliveries)

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
