"""The warehouse consumer: for each redemption message, a shipment request (created once), a
waybill from the carrier (asked with the redemption message's id as idempotency key), an answer
published with publisher confirms, and only then the ack. A ``redemption.cancelled`` cancels the
request (and its waybill at the carrier) on the same row; credex/warehouse/lifecycle.py says how.

When the carrier cannot be reached, the message is acked without an answer: the relay publishes
it again when its answer is overdue, and the same shipment request is taken up again then. A
consumer killed at any point loses nothing: unacked messages come back, and everything done for
them is found again on the row.

Messages are handled in batches, a few in hand at once (``BATCHES_IN_HAND``): while batches'
shipment requests are written and their waybills asked for (each on a thread of its own, the
redemptions CARRIER_CALLS at a time, each redemption's messages in the order they came), the
oldest one is answered on this thread, which alone talks to the broker. Its answers' publisher
confirms are not waited for in turn: the next batches are answered meanwhile, and a batch is
acked once the broker has confirmed its answers. Batches are answered and acked in the order they
were taken, so an ack never settles a message whose shipment is not committed and answered.

(A little over 400 lines on purpose: a batch's way from delivery to ack is one pipeline whose
order of hand-overs is the consumer's guarantee; the row state machine is lifecycle.py's.)
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from credex.amqp.broker import Broker, Delivery
from credex.amqp.confirms import Outgoing
from credex.amqp.connection import RPC_TIMEOUT_S
from credex.db.engine import ensure_schema
from credex.errors import CarrierNotConfigured, CredexError, Unavailable
from credex.metrics import WarehouseMetrics, new_registry
from credex.relay.topology import Names
from credex.warehouse.answers import Handled
from credex.warehouse.batches import created_many
from credex.warehouse.lifecycle import ShippingDesk
from credex.warehouse.messages import CancelMessage, RedemptionMessage, parse_message
from credex.warehouse.metered import MeteredCarrier
from credex.warehouse.shipments import ANSWER_KEYS, new_message_id
from credex.worker import Worker

log = logging.getLogger("credex.warehouse")

CARRIER_CALLS = 4  # waybills asked for at once
# Batches shipped at once, finished in the order they were taken. Under a steady trickle batches
# are small and each waits on its commits and the carrier: four overlap those waits (two made a
# queue at 200 redemptions/s on Postgres).
BATCHES_IN_HAND = 4
# credex_warehouse_messages_total{outcome}: what happened to each message (the row state machine's
# outcomes; a carrier out of reach is "without_waybill"), "rejected" for a malformed one, and
# "confirmed" / "confirmation_failed" for each answer published.
OUTCOME_LABELS = {"carrier_unreachable": "without_waybill"}


@dataclass
class WarehouseReport:
    received: int = 0
    shipments_created: int = 0
    waybills: int = 0  # obtained from the carrier by this run
    confirmed: int = 0  # answers the broker accepted (shipment.requested, .cancelled, .failed)
    without_waybill: int = 0  # acked unanswered: the carrier could not be reached
    rejected: int = 0  # malformed messages dropped
    reconnects: int = 0
    # What the messages came to (outcomes; `requested` and `carrier_unreachable` are the two above)
    cancelled: int = 0
    refused: int = 0  # a cancel too late: the parcel is with the carrier
    failed: int = 0  # the carrier refused the shipment for good
    deferred: int = 0  # a cancel while another consumer was asking the carrier: it comes again

    def to_json(self) -> dict:
        return asdict(self)


Message = RedemptionMessage | CancelMessage


@dataclass
class _Batch:
    deliveries: list[Delivery]  # the well-formed ones, acked when the batch is done
    messages: list[Message]
    shipped: Future = field(repr=False)  # -> list[Handled], one per message


@dataclass
class _Answered:
    """A shipped batch whose answers were published: acked once the broker confirms them."""

    deliveries: list[Delivery]
    answer_ids: list[str]
    deadline: float  # monotonic: no confirm by then and the connection is given up


def warehouse_broker(
    amqp_url: str, names: Names, *, prefetch: int, publish_timeout: float = RPC_TIMEOUT_S
) -> Broker:
    """The warehouse's side of the broker: it consumes redemption messages and publishes
    confirmations."""
    name = f"{socket.gethostname()[:32]}:{os.getpid()}"
    return Broker(
        amqp_url,
        names.topology(),
        consume=names.warehouse_queue,
        prefetch=prefetch,
        connection_name=f"credex warehouse {name}",
        publish_timeout=publish_timeout,
    )


class Warehouse(Worker[WarehouseReport]):
    """Runs until ``stop()``, or until the messages waiting are handled with ``once``."""

    def __init__(
        self,
        database_url: str,
        broker: Broker,
        carrier_factory: Callable[[], object],
        *,
        report: WarehouseReport | None = None,
        once: bool = False,
        carrier_timeout: float = 15.0,
        poll_interval: float = 1.0,
        requesting_lease: float | None = None,
        metrics: WarehouseMetrics | None = None,
    ) -> None:
        super().__init__(broker, report or WarehouseReport(), log=log, once=once)
        self.metrics = metrics or WarehouseMetrics(new_registry())
        self.database_url = database_url
        self.carrier_factory = carrier_factory
        self.carrier_timeout = carrier_timeout
        self.poll_interval = poll_interval
        self._carrier = None
        self._desk: ShippingDesk | None = None
        # A `requesting` row older than this was left by a consumer that died. A hand's rows are
        # claimed as their batch starts and asked CARRIER_CALLS at a time, each call bounded by
        # carrier_timeout (retries included): the last of a full hand waits prefetch/CARRIER_CALLS
        # calls. Until then a cancel of the row waits for the consumer asking (it comes again).
        # Never under 4 calls: the lease a small hand had before it was sized by the hand.
        calls_in_turn = -(-broker.prefetch // CARRIER_CALLS)
        self.requesting_lease = (
            requesting_lease if requesting_lease is not None else max(4, calls_in_turn) * carrier_timeout + 30
        )
        self._carrier_pool: ThreadPoolExecutor | None = None
        self._shipping: ThreadPoolExecutor | None = None
        self._in_hand: deque[_Batch] = deque()
        self._answered: deque[_Answered] = deque()  # their confirms awaited, oldest first
        self._again: list[Delivery] = []  # taken, but their batch failed: handled again next

    def __str__(self) -> str:
        return "warehouse " + self.broker.connection_name.removeprefix("credex warehouse ")

    # --- the worker's life ----------------------------------------------------------------------

    def prepare(self) -> None:
        ensure_schema(self.database_url)
        self._carrier = self.carrier_factory()  # not configured: say so before consuming anything
        if not getattr(self._carrier, "issues_waybills", True):
            raise CarrierNotConfigured(
                f"the {self._carrier.provider} provider cannot issue waybills: the warehouse needs "
                "CREDEX_LOGISTICS_PROVIDER=generic and a carrier that speaks the generic contract"
            )
        self._desk = ShippingDesk(
            self.database_url,
            MeteredCarrier(self._carrier, self.metrics),
            requesting_lease=timedelta(seconds=self.requesting_lease),
        )
        self._carrier_pool = ThreadPoolExecutor(max_workers=CARRIER_CALLS, thread_name_prefix="carrier")
        self._shipping = ThreadPoolExecutor(max_workers=BATCHES_IN_HAND, thread_name_prefix="shipping")

    def one_pass(self) -> None:
        """Handle the messages that were waiting when the queue was declared."""
        left = self.broker.ready_at_open
        while (left > 0 or self._in_hand) and not self.stopping:
            self._settle_answered()
            if left > 0 and len(self._in_hand) < BATCHES_IN_HAND:
                self.broker.wait(1.0, until=self._ready_in_one_pass)
                started = self._start_batch()
                left -= started
                if started:
                    continue
                if self._answered:  # their acks make room for the deliveries still to come
                    self._settle_answered(wait=True)
                    continue
                if not self._in_hand:
                    break  # nothing came: other consumers took the rest
            self._finish_oldest()
        self.finish()

    def turn(self) -> None:
        started = self._start_batch() if len(self._in_hand) < BATCHES_IN_HAND else 0
        settled = self._settle_answered()
        if self._oldest_shipped():
            self._finish_oldest()
        elif not started and not settled:
            self.broker.wait(self.poll_interval, until=self._something_to_do)

    def finish(self) -> None:
        """Stopping: the batches in hand are answered, confirmed and acked before the worker
        leaves; one the database failed stays unacked and comes back to a consumer."""
        while self._in_hand or self._answered:
            try:
                if self._in_hand:
                    self._finish_oldest()
                else:
                    self._settle_answered(wait=True)
            except Unavailable as error:
                log.warning("%s; its messages come back", error.message)

    def broker_lost(self) -> None:
        # Their deliveries died with the channel and come again; what the shipping threads still
        # do for them is found again then, and their answers are published again.
        self._in_hand.clear()
        self._answered.clear()
        self._again = []

    def cleanup(self) -> None:
        for pool in (self._shipping, self._carrier_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if self._carrier is not None:
            self._carrier.close()

    def _something_to_do(self) -> bool:
        room = len(self._in_hand) < BATCHES_IN_HAND and (self.broker.buffered > 0 or bool(self._again))
        return self.stopping or room or self._oldest_shipped() or self._oldest_confirmed()

    def _ready_in_one_pass(self) -> bool:
        return self.broker.buffered > 0 or self._oldest_shipped() or self._oldest_confirmed()

    def _oldest_confirmed(self) -> bool:
        if not self._answered:
            return False
        oldest = self._answered[0]
        return self.broker.confirmed(oldest.answer_ids) or time.monotonic() >= oldest.deadline

    def _oldest_shipped(self) -> bool:
        return bool(self._in_hand) and self._in_hand[0].shipped.done()

    # --- a batch, from its deliveries to its ack --------------------------------------------------

    def _start_batch(self) -> int:
        """Take the deliveries waiting (those of a failed batch first), drop the malformed ones,
        and hand the rest to a shipping thread. Returns the number of deliveries taken."""
        again, self._again = self._again, []
        fresh = self.broker.take_deliveries()
        self.report.received += len(fresh)
        deliveries, messages = [], []
        for delivery in again + fresh:
            kind = delivery.properties.type or delivery.routing_key
            try:
                messages.append(parse_message(kind, delivery.body))
            except CredexError as error:
                message_id = delivery.properties.message_id
                log.error(
                    "dropped a malformed message %s (%s): %s",
                    message_id,
                    kind,
                    error.message,
                    extra={"message_id": message_id},
                )
                self.broker.reject(delivery.tag)
                self.report.rejected += 1
                self.metrics.messages.labels("rejected").inc()
                continue
            deliveries.append(delivery)
        if messages:
            shipped = self._shipping.submit(self._ship, messages)
            shipped.add_done_callback(lambda _future: self.broker.wake())
            self._in_hand.append(_Batch(deliveries, messages, shipped))
        return len(again) + len(fresh)

    def _finish_oldest(self) -> None:
        """Wait for the oldest batch's shipping and publish its answers; it is acked once they
        are confirmed (``_settle_answered``). A batch whose shipping failed (the database went
        away) keeps its deliveries for the next try."""
        batch = self._in_hand[0]
        while not batch.shipped.done():  # woken by the batch's end; the carrier bounds its calls
            self.broker.wait(self.poll_interval, until=batch.shipped.done)
        self._in_hand.popleft()
        try:
            handled = batch.shipped.result()
        except BaseException:
            self._again = batch.deliveries + self._again
            raise
        report = self.report
        for outcome in handled:
            report.shipments_created += outcome.created
            report.waybills += outcome.waybill
            if outcome.outcome == "carrier_unreachable":
                report.without_waybill += 1
            elif outcome.outcome in ("cancelled", "refused", "failed", "deferred"):
                setattr(report, outcome.outcome, getattr(report, outcome.outcome) + 1)
            self.metrics.messages.labels(OUTCOME_LABELS.get(outcome.outcome, outcome.outcome)).inc()
        answers = self._answers(handled)
        self.broker.send(answers)
        self._answered.append(
            _Answered(
                batch.deliveries,
                [a.message_id for a in answers],
                time.monotonic() + self.broker.publish_timeout,
            )
        )

    def _settle_answered(self, *, wait: bool = False) -> int:
        """Ack the batches whose answers the broker has confirmed, oldest first (with ``wait``,
        all of them, waiting for their confirms). Returns how many batches were settled. An answer
        the broker refused is not waited for again: the relay publishes its message again when
        the answer is overdue; a connection lost leaves the batch unacked (its messages come back)."""
        settled = 0
        while self._answered:
            oldest = self._answered[0]
            if not self._oldest_confirmed():
                if not wait:
                    break
                left = oldest.deadline - time.monotonic()
                self.broker.wait(min(left, self.poll_interval), until=self._oldest_confirmed)
                continue
            self._answered.popleft()
            outcomes = self.broker.collect(oldest.answer_ids, max(0.0, oldest.deadline - time.monotonic()))
            for message_id, failure in outcomes.items():
                if failure is None:
                    self.report.confirmed += 1
                    self.metrics.messages.labels("confirmed").inc()
                else:  # the relay publishes its message again and we answer then
                    self.metrics.messages.labels("confirmation_failed").inc()
                    log.warning(
                        "answer %s not published: %s", message_id, failure, extra={"message_id": message_id}
                    )
            self.broker.raise_if_lost()  # unacked: the messages come back
            self._ack(oldest.deliveries)
            settled += 1
        return settled

    def _ack(self, deliveries: list[Delivery]) -> None:
        tags = [d.tag for d in deliveries]
        waiting = [d.tag for d in self._again] + [
            d.tag for b in (*self._answered, *self._in_hand) for d in b.deliveries
        ]
        if tags and (not waiting or min(waiting) > max(tags)):
            self.broker.ack(max(tags), multiple=True)  # rejected ones are settled already
        else:  # an earlier delivery is still being worked on: settle only these
            for tag in tags:
                self.broker.ack(tag)

    # --- on a shipping thread ---------------------------------------------------------------------

    def _ship(self, messages: list[Message]) -> list[Handled]:
        """Each message through the row state machine. The first create of each redemption that
        has only creates in the batch (the common case) goes in bulk: two transactions for the
        lot and the carrier asked CARRIER_CALLS at a time. The rest (cancels, repeats) go one at
        a time, the redemptions CARRIER_CALLS at a time, the messages of one redemption in the
        order they came. Every change is committed before this returns; a database failure
        fails the batch (its messages are handled again)."""
        by_redemption: dict[int, list[int]] = {}
        for index, message in enumerate(messages):
            by_redemption.setdefault(message.redemption_id, []).append(index)
        handled: list[Handled | None] = [None] * len(messages)
        bulk = [
            indexes[0]
            for indexes in by_redemption.values()
            if all(isinstance(messages[i], RedemptionMessage) for i in indexes)
        ]
        if bulk:
            done = created_many(self._desk, [messages[i] for i in bulk], self._run_all)
            for index, outcome in zip(bulk, done, strict=True):
                handled[index] = outcome

        def one_redemption(indexes: list[int]) -> None:
            for index in indexes:
                if handled[index] is None:
                    handled[index] = self._handle(messages[index])

        rest = [indexes for indexes in by_redemption.values() if any(handled[i] is None for i in indexes)]
        futures = [self._carrier_pool.submit(one_redemption, indexes) for indexes in rest]
        # Each carrier call is bounded by the carrier client (--carrier-timeout, retries included).
        concurrent.futures.wait(futures)
        for future in futures:
            future.result()  # the first failure (the database went away) fails the batch
        return handled  # type: ignore[return-value]

    def _run_all(self, calls: list[Callable[[], object]]) -> list[object]:
        """Run the carrier calls CARRIER_CALLS at a time: each one's result, or what it raised."""
        futures = [self._carrier_pool.submit(call) for call in calls]
        concurrent.futures.wait(futures)
        return [future.exception() or future.result() for future in futures]

    def _handle(self, message: Message) -> Handled:
        if isinstance(message, CancelMessage):
            return self._desk.cancelled(message)
        return self._desk.created(message)

    # --- back on the broker's thread ------------------------------------------------------------

    def _answers(self, handled: list[Handled]) -> list[Outgoing]:
        """The answers to publish (shipment.requested, .cancelled, .failed)."""
        return [
            Outgoing(
                message_id=new_message_id(),
                routing_key=ANSWER_KEYS[h.answer.kind],
                body=h.answer.body,
                type=ANSWER_KEYS[h.answer.kind],
                correlation_id=h.answer.correlation_id,
            )
            for h in handled
            if h.answer is not None
        ]
