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


NAME_BYTES = 255  # the broker's limit on an exchange or queue name (an AMQP short string), UTF-8
_LONGEST_NAME = "credex.warehouse.redemptions"  # without the prefix
PREFIX_BYTES = NAME_BYTES - len(_LONGEST_NAME)  # the most a prefix may take, in UTF-8
RESERVED = "amq."  # names the broker keeps for itself


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` (CREDEX_AMQP_PREFIX) cannot begin the broker's names (None: it can)."""
    if not prefix:
        return None
    from credex.points.rules import text_problem

    problem = text_problem(prefix, "CREDEX_AMQP_PREFIX", PREFIX_BYTES)
    if problem is not None:
        return problem
    if len(prefix.encode()) > PREFIX_BYTES:
        return (
            f"CREDEX_AMQP_PREFIX is longer than {PREFIX_BYTES} bytes (UTF-8): "
            f"the broker takes names of at most {NAME_BYTES}"
        )
    if prefix.startswith(RESERVED):
        return f"CREDEX_AMQP_PREFIX must not begin with {RESERVED!r}: the broker keeps those names for itself"
    return None


@dataclass(frozen=True)
class Names:
    """Exchange and queue names with the installation's prefix; routing keys are never prefixed."""

    prefix: str = ""

    @classmethod
    def configured(cls, prefix: str) -> Names:
        """The names for the setting CREDEX_AMQP_PREFIX: spaces around it dropped, as with every
        identifier; one the broker would refuse is bad input (exit 2), found before anything
        connects (a worker would otherwise retry it for ever as a broker error)."""
        from credex.errors import InvalidInput

        prefix = prefix.strip()
        problem = prefix_problem(prefix)
        if problem is not None:
            raise InvalidInput(problem)
        return cls(prefix)

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
