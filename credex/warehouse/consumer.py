"""The warehouse consumer: for each redemption message, a shipment request (created once), a
waybill from the carrier (asked with the redemption as idempotency key), a confirmation published
with publisher confirms, and only then the ack.

When the carrier cannot issue a waybill, the message is acked without a confirmation: the relay
publishes it again when its confirmation is overdue, and the same shipment request is completed
then. A consumer killed at any point loses nothing: unacked messages come back, and everything
done for them is found again.

Messages are handled in batches, a few in hand at once (``BATCHES_IN_HAND``): while batches'
shipment requests are written and their waybills asked for (each on a thread of its own), the
oldest one is confirmed and acked on this thread, which alone talks to the broker. Batches are
finished in the order they were taken, so an ack never settles a message whose work is not done.
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

from credex.amqp.broker import Broker, Delivery
from credex.amqp.confirms import Outgoing
from credex.db.engine import ensure_schema, session_for
from credex.db.models import utcnow
from credex.errors import CarrierNotConfigured, CredexError, Unavailable
from credex.metrics import WarehouseMetrics, new_registry
from credex.relay.topology import SHIPMENT_REQUESTED, Names
from credex.warehouse.shipments import (
    RedemptionMessage,
    confirmation_body,
    new_message_id,
    open_shipment_requests,
    parse_redemption_message,
    save_waybills,
)
from credex.worker import Worker

log = logging.getLogger("credex.warehouse")

CARRIER_CALLS = 4  # waybills asked for at once
# Batches shipped at once, finished in the order they were taken. Under a steady trickle batches
# are small and each waits on its commits and the carrier: four overlap those waits (two made a
# queue at 200 redemptions/s on Postgres).
BATCHES_IN_HAND = 4


@dataclass
class WarehouseReport:
    received: int = 0
    shipments_created: int = 0
    waybills: int = 0  # obtained from the carrier by this run
    confirmed: int = 0  # confirmations the broker accepted
    without_waybill: int = 0  # acked unconfirmed: the carrier could not issue a waybill yet
    rejected: int = 0  # malformed messages dropped
    reconnects: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _Shipped:
    """What a batch's shipping thread did: the requests by redemption id, with their waybills
    where the carrier gave one."""

    requests: dict[int, object]
    created: int = 0
    waybills: int = 0
    without_waybill: int = 0


@dataclass
class _Batch:
    deliveries: list[Delivery]  # the well-formed ones, acked when the batch is done
    messages: list[RedemptionMessage]
    shipped: Future = field(repr=False)


def warehouse_broker(amqp_url: str, names: Names, *, prefetch: int) -> Broker:
    """The warehouse's side of the broker: it consumes redemption messages and publishes
    confirmations."""
    name = f"{socket.gethostname()[:32]}:{os.getpid()}"
    return Broker(
        amqp_url,
        names.topology(),
        consume=names.warehouse_queue,
        prefetch=prefetch,
        connection_name=f"credex warehouse {name}",
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
        metrics: WarehouseMetrics | None = None,
    ) -> None:
        super().__init__(broker, report or WarehouseReport(), log=log, once=once)
        self.metrics = metrics or WarehouseMetrics(new_registry())
        self.database_url = database_url
        self.carrier_factory = carrier_factory
        self.carrier_timeout = carrier_timeout
        self.poll_interval = poll_interval
        self._carrier = None
        self._carrier_pool: ThreadPoolExecutor | None = None
        self._shipping: ThreadPoolExecutor | None = None
        self._in_hand: deque[_Batch] = deque()
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
        self._carrier_pool = ThreadPoolExecutor(max_workers=CARRIER_CALLS, thread_name_prefix="carrier")
        self._shipping = ThreadPoolExecutor(max_workers=BATCHES_IN_HAND, thread_name_prefix="shipping")

    def one_pass(self) -> None:
        """Handle the messages that were waiting when the queue was declared."""
        left = self.broker.ready_at_open
        while (left > 0 or self._in_hand) and not self.stopping:
            if left > 0 and len(self._in_hand) < BATCHES_IN_HAND:
                self.broker.wait(1.0, until=lambda: self.broker.buffered > 0 or self._oldest_shipped())
                started = self._start_batch()
                left -= started
                if started:
                    continue
                if not self._in_hand:
                    return  # nothing came: other consumers took the rest
            self._finish_oldest()
        self.finish()

    def turn(self) -> None:
        started = self._start_batch() if len(self._in_hand) < BATCHES_IN_HAND else 0
        if self._oldest_shipped():
            self._finish_oldest()
        elif not started:
            self.broker.wait(self.poll_interval, until=self._something_to_do)

    def finish(self) -> None:
        """Stopping: the batches in hand are confirmed and acked before the worker leaves; one
        the database failed stays unacked and comes back to a consumer."""
        while self._in_hand:
            try:
                self._finish_oldest()
            except Unavailable as error:
                log.warning("%s; its messages come back", error.message)

    def broker_lost(self) -> None:
        # Their deliveries died with the channel and come again; what the shipping threads still
        # do for them is found again then.
        self._in_hand.clear()
        self._again = []

    def cleanup(self) -> None:
        for pool in (self._shipping, self._carrier_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if self._carrier is not None:
            self._carrier.close()

    def _something_to_do(self) -> bool:
        room = len(self._in_hand) < BATCHES_IN_HAND and (self.broker.buffered > 0 or bool(self._again))
        return self.stopping or room or self._oldest_shipped()

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
            try:
                messages.append(parse_redemption_message(delivery.body))
            except CredexError as error:
                message_id = delivery.properties.message_id
                log.error(
                    "dropped a malformed redemption message %s: %s",
                    message_id,
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
        """Wait for the oldest batch's shipping, publish its confirmations, then ack it. A batch
        whose shipping failed (the database went away) keeps its deliveries for the next try."""
        batch = self._in_hand[0]
        while not batch.shipped.done():  # woken by the batch's end; the carrier bounds its calls
            self.broker.wait(self.poll_interval, until=batch.shipped.done)
        self._in_hand.popleft()
        try:
            shipped = batch.shipped.result()
        except BaseException:
            self._again = batch.deliveries + self._again
            raise
        report = self.report
        report.shipments_created += shipped.created
        report.waybills += shipped.waybills
        report.without_waybill += shipped.without_waybill
        self.metrics.messages.labels("without_waybill").inc(shipped.without_waybill)
        self._confirm(shipped.requests, batch.messages)
        self._ack(batch.deliveries)

    def _ack(self, deliveries: list[Delivery]) -> None:
        tags = [d.tag for d in deliveries]
        waiting = [d.tag for d in self._again] + [d.tag for b in self._in_hand for d in b.deliveries]
        if tags and (not waiting or min(waiting) > max(tags)):
            self.broker.ack(max(tags), multiple=True)  # rejected ones are settled already
        else:  # an earlier delivery is still being worked on: settle only these
            for tag in tags:
                self.broker.ack(tag)

    # --- on a shipping thread ---------------------------------------------------------------------

    def _ship(self, messages: list[RedemptionMessage]) -> _Shipped:
        """Shipment requests with their waybills where the carrier gave one."""
        with session_for(self.database_url, write=True) as session:
            requests, created = open_shipment_requests(session, messages, now=utcnow())
            session.commit()
        shipped = _Shipped(requests, created)
        missing = {m.redemption_id: m for m in messages if requests[m.redemption_id].express_no is None}
        asked = {
            redemption_id: self._carrier_pool.submit(self._ask_carrier, message)
            for redemption_id, message in missing.items()
        }
        if asked:
            # Each call is bounded by the carrier client (--carrier-timeout, retries included);
            # they run CARRIER_CALLS at a time, and the last round gets a few seconds more.
            rounds = -(-len(asked) // CARRIER_CALLS)
            concurrent.futures.wait(asked.values(), timeout=rounds * self.carrier_timeout + 5)
        waybills = []
        for redemption_id, future in asked.items():
            waybill = self._waybill(future, redemption_id)
            if waybill is None:
                shipped.without_waybill += 1
            else:
                waybills.append((requests[redemption_id].id, waybill.carrier, waybill.express_no))
        if waybills:
            with session_for(self.database_url, write=True) as session:
                saved = save_waybills(session, waybills, now=utcnow())
                session.commit()
            for row in saved.values():
                requests[row.redemption_id] = row
                log.info(
                    "redemption %s: waybill %s %s",
                    row.redemption_id,
                    row.carrier,
                    row.express_no,
                    extra={"redemption_id": row.redemption_id, "express_no": row.express_no},
                )
            shipped.waybills = len(waybills)
        return shipped

    def _ask_carrier(self, message: RedemptionMessage):
        key = f"redemption-{message.redemption_id}"
        started = time.perf_counter()
        try:
            return self._carrier.create_shipment(
                idempotency_key=key,
                order_ref=key,
                recipient={"name": message.user_id, "phone": "", "address": message.address},
                items=[{"sku": message.sku, "quantity": message.quantity}],
            )
        finally:
            self.metrics.carrier_seconds.labels("create_shipment").observe(time.perf_counter() - started)

    def _waybill(self, future: Future, redemption_id: int):
        """The carrier's answer, or None (logged) when it gave no waybill this time."""
        if not future.done():
            future.cancel()
            reason = "the carrier did not answer in time"
            self.metrics.carrier_errors.labels("timeout").inc()
        else:
            try:
                return future.result()
            except CredexError as error:
                reason = error.message
                self.metrics.carrier_errors.labels(carrier_error_kind(error)).inc()
        log.warning(
            "redemption %s: no waybill yet (%s); acked without confirming, the relay will send it again",
            redemption_id,
            reason,
            extra={"redemption_id": redemption_id},
        )
        return None

    # --- back on the broker's thread ------------------------------------------------------------

    def _confirm(self, requests: dict[int, object], messages: list[RedemptionMessage]) -> None:
        """Publish a confirmation for every message whose request has its waybill."""
        now = utcnow()
        confirmations = [
            Outgoing(
                message_id=new_message_id(),
                routing_key=SHIPMENT_REQUESTED,
                body=confirmation_body(requests[m.redemption_id], message_id=m.message_id, now=now),
                type=SHIPMENT_REQUESTED,
                correlation_id=m.message_id,
            )
            for m in messages
            if requests[m.redemption_id].express_no is not None
        ]
        if not confirmations:
            return
        outcomes = self.broker.publish(confirmations)
        for message_id, failure in outcomes.items():
            if failure is None:
                self.report.confirmed += 1
                self.metrics.messages.labels("confirmed").inc()
            else:  # the relay publishes the redemption again and we confirm then
                self.metrics.messages.labels("confirmation_failed").inc()
                log.warning(
                    "confirmation %s not published: %s", message_id, failure, extra={"message_id": message_id}
                )
        self.broker.raise_if_lost()  # unacked: the messages come back


def carrier_error_kind(error: CredexError) -> str:
    """A carrier's failure as a metric label: worth retrying (unavailable) or final (rejected)."""
    return "unavailable" if isinstance(error, Unavailable) else "rejected"
