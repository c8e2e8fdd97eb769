"""Names on the broker: one place for exchanges, queues and routing keys (messaging.md)."""

from __future__ import annotations

from dataclasses import dataclass

REDEMPTION_CREATED = "redemption.created"
SHIPMENT_REQUESTED = "shipment.requested"


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
