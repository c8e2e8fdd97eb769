"""Publishing in confirm mode: every message persistent and mandatory, many in flight at once, and
what the broker said of each collected by message id (None: it has it; else why not).

Delivery tags start again at 1 on every channel, so a new channel gets a new ``PublisherConfirms``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pika
from pika import spec

from credex.amqp.params import describe


@dataclass
class Outgoing:
    """One message to publish. ``message_id`` names it in the outcomes."""

    message_id: str
    routing_key: str
    body: bytes
    type: str
    correlation_id: str | None = None


class PublisherConfirms:
    """The confirm-mode bookkeeping of one channel. ``on_settled`` is called whenever outcomes
    arrive, so that a waiting caller can look again."""

    def __init__(self, channel: Any, exchange: str, on_settled: Callable[[], None]) -> None:
        self.channel = channel
        self.exchange = exchange
        self._on_settled = on_settled
        self._next_tag = 0
        self._in_flight: dict[int, str] = {}  # delivery tag -> message id, in publishing order
        self._outcomes: dict[str, str | None] = {}  # message id -> None or why it failed
        self._returned: dict[str, str] = {}  # message id -> why the broker returned it
        channel.add_on_return_callback(self._on_return)

    def start(self, call: Callable) -> None:
        """Put the channel in confirm mode (one round trip through ``call``)."""
        call(lambda done: self.channel.confirm_delivery(self._on_confirm, callback=done))

    def send(self, messages: Iterable[Outgoing]) -> str | None:
        """Publish ``messages`` (persistent, mandatory) without waiting. Returns why publishing
        stopped part way (the channel closed under us), or None."""
        now = int(time.time())
        publish = self.channel.basic_publish
        exchange = self.exchange
        for message in messages:
            properties = pika.BasicProperties(
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                content_type="application/json",
                delivery_mode=2,  # persistent
                type=message.type,
                timestamp=now,
            )
            try:
                publish(exchange, message.routing_key, message.body, properties, mandatory=True)
            except Exception as error:
                return f"publish failed: {describe(error)}"
            self._next_tag += 1
            self._in_flight[self._next_tag] = message.message_id
        return None

    def settled(self, message_ids: Iterable[str]) -> bool:
        outcomes = self._outcomes
        return all(m in outcomes for m in message_ids)

    def take(self, message_ids: Iterable[str], unsettled: str) -> dict[str, str | None]:
        """The outcomes of ``message_ids``, forgotten here; ``unsettled`` for those still open."""
        outcomes = self._outcomes
        return {m: outcomes.pop(m, unsettled) for m in message_ids}

    def fail_in_flight(self, reason: str) -> None:
        """Every message still waiting for its confirm failed for ``reason``."""
        for message_id in self._in_flight.values():
            self._outcomes[message_id] = reason
        self._in_flight.clear()
        self._on_settled()

    def _on_return(self, _channel, method, properties, _body) -> None:
        # A mandatory message no queue took: the broker returns it, then acks it.
        if properties.message_id:
            self._returned[properties.message_id] = (
                f"unroutable: {method.reply_code} {method.reply_text} ({method.routing_key})"
            )

    def _on_confirm(self, frame) -> None:
        method = frame.method
        nacked = isinstance(method, spec.Basic.Nack)
        in_flight = self._in_flight
        if method.multiple:
            tags = []
            for tag in in_flight:  # in publishing order: stop at the first one not covered
                if tag > method.delivery_tag:
                    break
                tags.append(tag)
        else:
            tags = [method.delivery_tag]
        for tag in tags:
            message_id = in_flight.pop(tag, None)
            if message_id is None:
                continue
            if nacked:
                self._outcomes[message_id] = "nacked by the broker"
            else:
                self._outcomes[message_id] = self._returned.pop(message_id, None)
        self._on_settled()
