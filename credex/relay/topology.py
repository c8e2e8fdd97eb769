"""Names on the broker: one place for exchanges, queues and routing keys (messaging.md), and the
topology the workers declare from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from credex.amqp.topology import Topology

REDEMPTION_CREATED = "redemption.created"
REDEMPTION_CANCELLED = "redemption.cancelled"
SHIPMENT_REQUESTED = "shipment.requested"
SHIPMENT_CANCELLED = "shipment.cancelled"
SHIPMENT_FAILED = "shipment.failed"
ANSWERS = (SHIPMENT_REQUESTED, SHIPMENT_CANCELLED, SHIPMENT_FAILED)  # the warehouse's, to the relay


@dataclass(frozen=True)
class Names:
    """Exchange and queue names with the installation's prefix; routing keys are never prefixed."""

    prefix: str = ""

    @property
    def exchange(self) -> str:
        return f"{self.prefix}credex"

    @property
    def warehouse_queue(self) -> str:
        return f"{self.prefix}credex.warehouse.redemptions"

    @property
    def confirmations_queue(self) -> str:
        return f"{self.prefix}credex.relay.confirmations"

    def topology(self) -> Topology:
        """Everything either worker declares on start (whoever starts first declares it all)."""
        from credex.amqp.topology import Queue, Topology

        return Topology(
            exchange=self.exchange,
            queues=(
                Queue(
                    self.warehouse_queue,
                    (REDEMPTION_CREATED, REDEMPTION_CANCELLED),
                    {"x-queue-type": "quorum"},
                ),
                Queue(self.confirmations_queue, ANSWERS, {"x-queue-type": "quorum"}),
            ),
        )
