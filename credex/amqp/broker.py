"""What a worker holds of the broker: one connection, one channel in confirm mode that publishes
to the topology's exchange, and one consumer whose deliveries wait in a buffer until the worker
takes them (acknowledged by the worker, after its database work has committed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pika import spec

from credex.amqp.confirms import Outgoing, PublisherConfirms
from credex.amqp.connection import RPC_TIMEOUT_S, BrokerLost, Connection
from credex.amqp.params import CONNECT_TIMEOUT_S, display_amqp_url
from credex.amqp.topology import Topology, declare
from credex.errors import QueueTypeMismatch, Unavailable


@dataclass
class Delivery:
    tag: int
    properties: spec.BasicProperties
    body: bytes
    routing_key: str = ""


class Broker:
    """Publishes with confirms to ``topology.exchange`` and consumes ``consume`` (``prefetch``
    unacknowledged at most). ``open()`` declares the whole topology first."""

    def __init__(
        self,
        url: str,
        topology: Topology,
        *,
        consume: str,
        prefetch: int,
        connection_name: str,
        publish_timeout: float = RPC_TIMEOUT_S,
    ) -> None:
        self.url = url
        # How long ``collect`` waits for publisher confirms before the connection is given up
        # (CREDEX_AMQP_PUBLISH_TIMEOUT).
        self.publish_timeout = publish_timeout
        self.topology = topology
        self.queue = consume
        self.prefetch = prefetch
        self.connection_name = connection_name
        self.ready_at_open = 0  # messages waiting in the consumed queue when it was declared
        self._connection = Connection(url, name=connection_name)
        self._confirms: PublisherConfirms | None = None
        self._deliveries: list[Delivery] = []

    def __repr__(self) -> str:
        return f"<Broker {self.where} consuming {self.queue}>"

    @property
    def where(self) -> str:
        """The URL of the node connected to (or tried last) as it may be shown (no password)."""
        return display_amqp_url(self._connection.url)

    # --- connecting ---------------------------------------------------------------------------

    def open(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Connect, put the channel in confirm mode, declare the topology, start consuming.
        Raises Unavailable when the broker cannot be reached."""
        self._deliveries = []
        self._confirms = None
        connection = self._connection
        try:
            channel = connection.open(timeout)
            channel.add_on_cancel_callback(self._on_cancelled)
            confirms = PublisherConfirms(channel, self.topology.exchange, connection.poke)
            confirms.start(connection.call)
            ready = declare(connection.call, channel, self.topology)
            self.ready_at_open = ready.get(self.queue, 0)
            connection.call(lambda done: channel.basic_qos(prefetch_count=self.prefetch, callback=done))
            connection.call(
                lambda done: channel.basic_consume(
                    self.queue, self._on_message, auto_ack=False, callback=done
                )
            )
        except BrokerLost as error:
            refused = connection.refused
            connection.close()
            if refused is not None and refused.reply_code == 406 and "x-queue-type" in refused.reply_text:
                raise queue_type_mismatch(refused.reply_text) from None
            raise Unavailable(f"cannot reach the broker {display_amqp_url(self.url)}: {error}") from None
        self._confirms = confirms

    def close(self) -> None:
        self._confirms = None
        self._connection.close()

    @property
    def lost(self) -> str | None:
        return self._connection.lost

    def raise_if_lost(self) -> None:
        if self._connection.lost:
            raise BrokerLost(self._connection.lost)

    @property
    def connected(self) -> bool:
        return self._confirms is not None and self._connection.is_open

    def wake(self) -> None:
        """From any thread: end the current wait (a worker told to stop looks up at once)."""
        self._connection.wake()

    def _on_cancelled(self, _frame) -> None:
        self._connection.lose(f"the broker cancelled the consumer of {self.queue} (queue deleted?)")

    # --- waiting ------------------------------------------------------------------------------

    def wait(self, seconds: float, until: Callable[[], object] | None = None) -> None:
        """Let the broker talk (deliveries, heartbeats) for ``seconds`` or until ``until()``.
        Raises BrokerLost when the connection goes."""
        self._connection.wait(seconds, until)

    # --- consuming ----------------------------------------------------------------------------

    def _on_message(self, _channel, method, properties, body) -> None:
        self._deliveries.append(Delivery(method.delivery_tag, properties, body, method.routing_key))
        self._connection.poke()

    @property
    def buffered(self) -> int:
        return len(self._deliveries)

    def take_deliveries(self) -> list[Delivery]:
        """The deliveries received so far, oldest first; the worker settles each with ``ack`` or
        ``reject``."""
        taken, self._deliveries = self._deliveries, []
        return taken

    def ack(self, tag: int, *, multiple: bool = False) -> None:
        self._channel().basic_ack(delivery_tag=tag, multiple=multiple)

    def reject(self, tag: int) -> None:
        """Drop a message that can never be handled (no requeue: it would come straight back)."""
        self._channel().basic_reject(delivery_tag=tag, requeue=False)

    def _channel(self) -> Any:
        if self._confirms is None or self._connection.lost:
            raise BrokerLost(self._connection.lost or "not connected")
        return self._confirms.channel

    # --- publishing ---------------------------------------------------------------------------

    def publish(self, messages: list[Outgoing], timeout: float | None = None) -> dict[str, str | None]:
        """Publish all ``messages`` and wait for their confirms together (``send`` + ``collect``)."""
        self.send(messages)
        return self.collect([m.message_id for m in messages], timeout)

    def send(self, messages: list[Outgoing]) -> None:
        """Publish ``messages`` without waiting: their confirms are gathered by ``collect``, so the
        caller can do other work while the broker stores them. Their frames leave together."""
        confirms = self._confirms
        if confirms is None or self._connection.lost:
            return  # ``collect`` reports them as not published
        with self._connection.corked():
            failure = confirms.send(messages)
        if failure is not None:
            self._connection.lose(failure)

    def confirmed(self, message_ids: list[str]) -> bool:
        """Whether the broker has said what it makes of every one of ``message_ids`` (or the
        connection is gone): ``collect`` then returns at once."""
        confirms = self._confirms
        return confirms is None or bool(self._connection.lost) or confirms.settled(message_ids)

    def collect(self, message_ids: list[str], timeout: float | None = None) -> dict[str, str | None]:
        """Wait for what the broker says of the messages sent as ``message_ids``: message id ->
        None (the broker has it) or why it failed (returned, nacked, connection lost), at most
        ``timeout`` seconds (default: ``publish_timeout``)."""
        if timeout is None:
            timeout = self.publish_timeout
        confirms, connection = self._confirms, self._connection
        if confirms is None:
            return dict.fromkeys(message_ids, connection.lost or "not connected")
        settled = confirms.settled
        if not connection.run_until(lambda: settled(message_ids), timeout) and not connection.lost:
            # A caller may pass what is left of a wait that began at the publish (the warehouse
            # does): the confirm was awaited for publish_timeout in all ("within 0 s" before).
            waited = max(timeout, self.publish_timeout)
            confirms.fail_in_flight(f"no publisher confirm within {waited:.0f} s")
            connection.lose("publisher confirms stopped arriving")
        if connection.lost:
            confirms.fail_in_flight(connection.lost)
        return confirms.take(message_ids, connection.lost or "not published")


def queue_type_mismatch(reply_text: str) -> QueueTypeMismatch:
    """The broker's 406 on declaring a queue of another type than the existing one, with the way
    out (docs/cluster.md): RabbitMQ cannot change a queue's type, so the old queue must go."""
    queue = reply_text.split("for queue '", 1)[-1].split("'", 1)[0] if "for queue '" in reply_text else "?"
    return QueueTypeMismatch(
        f"the queue {queue!r} exists on the broker with another type than credex declares "
        f"(credex's queues are quorum queues; an older version declared classic ones): stop the "
        f"workers, let the relay and the warehouse drain it, delete it (`rabbitmqctl delete_queue "
        f"{queue}`) and start them again (broker: {reply_text})"
    )
