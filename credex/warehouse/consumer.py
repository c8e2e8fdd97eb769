"""The warehouse consumer: for each redemption message, a shipment request (created once), a
waybill from the carrier (asked with the redemption as idempotency key), a confirmation published
with publisher confirms, and only then the ack.

When the carrier cannot issue a waybill, the message is acked without a confirmation: the relay
publishes it again when its confirmation is overdue, and the same shipment request is completed
then. A consumer killed at any point loses nothing: unacked messages come back, and everything
done for them is found again.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from credex.amqp.broker import Broker
from credex.amqp.confirms import Outgoing
from credex.db.engine import ensure_schema, session_for
from credex.db.models import utcnow
from credex.errors import CarrierNotConfigured, CredexError
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
    ) -> None:
        super().__init__(broker, report or WarehouseReport(), log=log, once=once)
        self.database_url = database_url
        self.carrier_factory = carrier_factory
        self.carrier_timeout = carrier_timeout
        self.poll_interval = poll_interval
        self._carrier = None
        self._pool: ThreadPoolExecutor | None = None

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
        self._pool = ThreadPoolExecutor(max_workers=CARRIER_CALLS, thread_name_prefix="carrier")

    def one_pass(self) -> None:
        """Handle the messages that were waiting when the queue was declared."""
        left = self.broker.ready_at_open
        while left > 0 and not self.stopping:
            self.broker.wait(1.0, until=lambda: self.broker.buffered > 0)
            handled = self._handle_batch()
            if not handled:
                return
            left -= handled

    def turn(self) -> None:
        # A database away for a moment leaves the messages in hand unacked: they come back.
        self.broker.wait(self.poll_interval, until=lambda: self.stopping or self.broker.buffered > 0)
        self._handle_batch()

    def cleanup(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._carrier is not None:
            self._carrier.close()

    # --- the work -----------------------------------------------------------------------------

    def _handle_batch(self) -> int:
        """Handle the messages in hand together: their shipment requests in one transaction, the
        missing waybills asked for in parallel and saved in one transaction, the confirmations
        published together; then the ack."""
        deliveries = self.broker.take_deliveries()
        if not deliveries:
            return 0
        messages, handled = [], []
        for delivery in deliveries:
            self.report.received += 1
            try:
                messages.append(parse_redemption_message(delivery.body))
            except CredexError as error:
                message_id = delivery.properties.message_id
                log.error("dropped a malformed redemption message %s: %s", message_id, error.message)
                self.broker.reject(delivery.tag)
                self.report.rejected += 1
                continue
            handled.append(delivery.tag)
        if messages:
            self._confirm(self._ship(messages), messages)
        if handled:
            self.broker.ack(max(handled), multiple=True)  # rejected ones are settled already
        return len(deliveries)

    def _ship(self, messages: list[RedemptionMessage]) -> dict[int, object]:
        """Shipment requests with their waybills where the carrier gave one: redemption id -> row."""
        with session_for(self.database_url, write=True) as session:
            requests, created = open_shipment_requests(session, messages, now=utcnow())
            session.commit()
        self.report.shipments_created += created
        missing = {m.redemption_id: m for m in messages if requests[m.redemption_id].express_no is None}
        asked = {
            redemption_id: self._pool.submit(self._ask_carrier, message)
            for redemption_id, message in missing.items()
        }
        waybills = []
        for redemption_id, future in asked.items():
            waybill = self._waybill(future, redemption_id)
            if waybill is not None:
                waybills.append((requests[redemption_id].id, waybill.carrier, waybill.express_no))
        if waybills:
            with session_for(self.database_url, write=True) as session:
                saved = save_waybills(session, waybills, now=utcnow())
                session.commit()
            for row in saved.values():
                requests[row.redemption_id] = row
                log.info("redemption %s: waybill %s %s", row.redemption_id, row.carrier, row.express_no)
            self.report.waybills += len(waybills)
        return requests

    def _ask_carrier(self, message: RedemptionMessage):
        key = f"redemption-{message.redemption_id}"
        return self._carrier.create_shipment(
            idempotency_key=key,
            order_ref=key,
            recipient={"name": message.user_id, "phone": "", "address": message.address},
            items=[{"sku": message.sku, "quantity": message.quantity}],
        )

    def _waybill(self, future, redemption_id: int):
        """The carrier's answer, or None (logged) when it gave no waybill this time."""
        try:
            return self.broker.wait_for(future, timeout=self.carrier_timeout + 5)
        except CredexError as error:
            reason = error.message
        except TimeoutError:
            reason = "the carrier did not answer in time"
        self.report.without_waybill += 1
        log.warning(
            "redemption %s: no waybill yet (%s); acked without confirming, the relay will send it again",
            redemption_id,
            reason,
        )
        return None

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
            else:  # the relay publishes the redemption again and we confirm then
                log.warning("confirmation %s not published: %s", message_id, failure)
        self.broker.raise_if_lost()  # unacked: the messages come back
