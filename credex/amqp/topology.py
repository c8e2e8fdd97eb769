"""Exchanges, queues and bindings as data, and their declaration on a channel. What the names are
is the messaging contract's business (``credex.relay.topology``); this module only declares them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Queue:
    """A durable queue bound to the topic exchange by each of ``routing_keys``."""

    name: str
    routing_keys: tuple[str, ...]
    arguments: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Topology:
    """One durable topic exchange and the queues bound to it."""

    exchange: str
    queues: tuple[Queue, ...]


def declare(call: Callable, channel: Any, topology: Topology) -> dict[str, int]:
    """Declare the exchange, every queue and every binding with ``call`` (one broker round trip
    each, see ``Connection.call``). Whoever starts first declares everything, so no message is lost
    to a queue that does not exist yet. Returns the messages ready in each queue."""
    exchange = topology.exchange
    call(lambda done: channel.exchange_declare(exchange, "topic", durable=True, callback=done))
    ready = {}
    for queue in topology.queues:
        arguments = dict(queue.arguments) or None
        frame = call(
            lambda done, q=queue.name, a=arguments: channel.queue_declare(
                q, durable=True, arguments=a, callback=done
            )
        )
        ready[queue.name] = frame.method.message_count
        for key in queue.routing_keys:
            call(
                lambda done, q=queue.name, k=key: channel.queue_bind(
                    q, exchange, routing_key=k, callback=done
                )
            )
    return ready
