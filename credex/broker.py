"""RabbitMQ for the relay and the warehouse: one connection, one confirm-mode channel, one consumer.

pika's SelectConnection is driven step by step: the workers run plain loops and let the I/O loop
turn only while they wait. So many publishes are in flight at once and their confirms arrive
together (no round trip per message), and heartbeats are answered whenever a worker waits.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika import spec

from credex.errors import Unavailable, redact
from credex.relay.topology import REDEMPTION_CREATED, SHIPMENT_REQUESTED, Names

log = logging.getLogger("credex.broker")

CONNECT_TIMEOUT_S = 10.0
RPC_TIMEOUT_S = 30.0
HEARTBEAT_S = 30


class BrokerLost(Exception):
    """The connection or the channel went away; the worker reconnects."""


@dataclass
class Delivery:
    tag: int
    properties: spec.BasicProperties
    body: bytes


@dataclass
class Outgoing:
    """One message to publish. ``message_id`` names it in the results."""

    message_id: str
    routing_key: str
    body: bytes
    type: str
    correlation_id: str | None = None


@dataclass
class _Channel:
    """What belongs to one channel: delivery tags start again at 1 on every new channel."""

    channel: Any
    next_tag: int = 0
    in_flight: dict[int, str] = field(default_factory=dict)  # delivery tag -> message id
    outcomes: dict[str, str | None] = field(default_factory=dict)  # message id -> None or the failure
    returned: dict[str, str] = field(default_factory=dict)  # message id -> why the broker returned it


def display_amqp_url(url: str) -> str:
    """The broker URL as it may be shown: never with its password."""
    try:
        params = pika.URLParameters(url)
    except Exception:
        return redact(url)
    from urllib.parse import quote

    user = getattr(params.credentials, "username", "")
    vhost = quote(params.virtual_host, safe="")
    return f"amqp://{user + '@' if user else ''}{params.host}:{params.port}/{vhost}"


def backoff(attempt: int, *, base: float, cap: float, jitter: float = 0.1) -> float:
    """base x 2^(attempt-1), capped, stretched by up to ``jitter`` so that retries spread out."""
    delay = min(cap, base * 2 ** max(0, min(attempt - 1, 32)))
    return delay * (1 + random.uniform(0, jitter))


def declare_topology(call: Callable, channel, names: Names) -> dict[str, int]:
    """Exchange, both queues and their bindings (messaging.md); whoever starts first declares
    everything, so no message is lost to a queue that does not exist yet. Returns the number of
    messages ready in each queue."""
    call(lambda done: channel.exchange_declare(names.exchange, "topic", durable=True, callback=done))
    ready = {}
    for queue, key, arguments in (
        (names.warehouse_queue, REDEMPTION_CREATED, {"x-queue-type": "quorum"}),
        (names.confirmations_queue, SHIPMENT_REQUESTED, None),
    ):
        frame = call(
            lambda done, q=queue, a=arguments: channel.queue_declare(
                q, durable=True, arguments=a, callback=done
            )
        )
        ready[queue] = frame.method.message_count
        call(lambda done, q=queue, k=key: channel.queue_bind(q, names.exchange, routing_key=k, callback=done))
    return ready


class Broker:
    """A connection with one channel in confirm mode, consuming ``queue`` into a buffer."""

    def __init__(self, url: str, names: Names, *, queue: str, prefetch: int, connection_name: str) -> None:
        self.url = url
        self.names = names
        self.queue = queue
        self.prefetch = prefetch
        self.connection_name = connection_name
        self.ready_at_open = 0  # messages waiting in ``queue`` when it was declared
        self._connection = None
        self._channel: _Channel | None = None
        self._lost: str | None = None
        self._deliveries: list[Delivery] = []

    # --- the I/O loop, turned while we wait ---------------------------------------------------

    def _poke(self, *_args) -> None:
        """Something happened: let the waiting loop look at its condition again."""
        if self._connection is not None:
            self._connection.ioloop.stop()

    def run_until(self, done: Callable[[], object], timeout: float) -> bool:
        """Turn the I/O loop until ``done()`` or the connection is lost or ``timeout`` passes."""
        if done() or self._lost or self._connection is None:
            return bool(done())
        loop = self._connection.ioloop
        deadline = time.monotonic() + timeout
        timer = loop.call_later(max(0.0, timeout), loop.stop)
        try:
            while not done() and not self._lost and time.monotonic() < deadline:
                loop.start()
        finally:
            loop.remove_timeout(timer)
        return bool(done())

    def _call(self, start: Callable[[Callable], None], timeout: float = RPC_TIMEOUT_S):
        """Run one broker RPC as if it were a plain call: ``start(done)`` sends it."""
        answer: list = []

        def done(frame=None) -> None:
            answer.append(frame)
            self._poke()

        start(done)
        if not self.run_until(lambda: answer, timeout):
            raise BrokerLost(self._lost or f"no answer from the broker within {timeout:.0f} s")
        return answer[0]

    # --- connecting ---------------------------------------------------------------------------

    def open(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Connect, open the channel in confirm mode, declare the topology, start consuming.
        Raises Unavailable when the broker cannot be reached."""
        self._lost = None
        self._deliveries = []
        try:
            params = pika.URLParameters(self.url)
        except Exception as error:
            raise Unavailable(
                f"not a usable broker URL {display_amqp_url(self.url)}: {redact(str(error))}"
            ) from None
        params.client_properties = {"connection_name": self.connection_name, "product": "credex"}
        params.heartbeat = HEARTBEAT_S
        params.blocked_connection_timeout = 60
        params.connection_attempts = 1
        params.socket_timeout = timeout
        opened: list = []

        def on_open(connection) -> None:
            opened.append(connection)
            self._poke()

        def on_open_error(_connection, error) -> None:
            self._lost = _describe(error)
            self._poke()

        self._connection = pika.SelectConnection(
            params,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=self._on_connection_closed,
        )
        try:
            if not self.run_until(lambda: opened, timeout):
                raise BrokerLost(self._lost or f"no connection within {timeout:.0f} s")
            channel = self._call(lambda done: self._connection.channel(on_open_callback=done))
            channel.add_on_close_callback(self._on_channel_closed)
            channel.add_on_return_callback(self._on_return)
            channel.add_on_cancel_callback(self._on_cancelled)
            self._channel = _Channel(channel)
            self._call(lambda done: channel.confirm_delivery(self._on_confirm, callback=done))
            ready = declare_topology(self._call, channel, self.names)
            self.ready_at_open = ready.get(self.queue, 0)
            self._call(lambda done: channel.basic_qos(prefetch_count=self.prefetch, callback=done))
            self._call(
                lambda done: channel.basic_consume(
                    self.queue, self._on_message, auto_ack=False, callback=done
                )
            )
        except BrokerLost as error:
            self.close()
            raise Unavailable(f"cannot reach the broker {display_amqp_url(self.url)}: {error}") from None

    def close(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = None
        if connection is None:
            return
        try:
            if connection.is_open:
                connection.close()
            deadline = time.monotonic() + 5
            while not connection.is_closed and time.monotonic() < deadline:
                connection.ioloop.call_later(0.1, connection.ioloop.stop)
                connection.ioloop.start()
        except Exception as error:  # closing a broken connection: nothing left to save
            log.debug("closing the broker connection: %s", _describe(error))

    @property
    def lost(self) -> str | None:
        return self._lost

    def _on_connection_closed(self, _connection, reason) -> None:
        self._lost = self._lost or f"connection closed: {_describe(reason)}"
        self._fail_in_flight(self._lost)
        self._poke()

    def _on_channel_closed(self, _channel, reason) -> None:
        if not isinstance(reason, pika.exceptions.ChannelClosedByClient):
            self._lost = self._lost or f"channel closed: {_describe(reason)}"
        self._fail_in_flight(self._lost or "channel closed")
        self._poke()

    def _on_cancelled(self, _frame) -> None:
        self._lost = self._lost or f"the broker cancelled the consumer of {self.queue} (queue deleted?)"
        self._poke()

    # --- consuming ----------------------------------------------------------------------------

    def _on_message(self, _channel, method, properties, body) -> None:
        self._deliveries.append(Delivery(method.delivery_tag, properties, body))
        self._poke()

    @property
    def buffered(self) -> int:
        return len(self._deliveries)

    def take_deliveries(self) -> list[Delivery]:
        taken, self._deliveries = self._deliveries, []
        return taken

    def ack(self, tag: int, *, multiple: bool = False) -> None:
        self._require_channel().basic_ack(delivery_tag=tag, multiple=multiple)

    def reject(self, tag: int) -> None:
        """Drop a message that can never be handled (no requeue: it would come straight back)."""
        self._require_channel().basic_reject(delivery_tag=tag, requeue=False)

    def wait(self, seconds: float, until: Callable[[], object] | None = None) -> None:
        """Let the broker talk (deliveries, heartbeats) for ``seconds`` or until ``until()``."""
        if self._connection is None:
            time.sleep(seconds)
            return
        self.run_until(until or (lambda: False), seconds)
        if self._lost:
            raise BrokerLost(self._lost)

    def wait_for(self, future: Future, timeout: float | None = None) -> Any:
        """The result of work running in another thread, the I/O loop turning meanwhile (heartbeats,
        confirms, deliveries). Without a connection it just waits. Raises the work's own
        exception, or TimeoutError after ``timeout``."""
        connection = self._connection
        if connection is not None and not self._lost:
            loop = connection.ioloop

            def wake(_future) -> None:
                with contextlib.suppress(Exception):  # the loop closed meanwhile: nobody waits on it
                    loop.add_callback_threadsafe(loop.stop)

            future.add_done_callback(wake)
            self.run_until(future.done, RPC_TIMEOUT_S if timeout is None else timeout)
            if not future.done() and not self._lost:
                raise TimeoutError(f"no result within {timeout} s")
        return future.result(timeout=timeout)

    # --- publishing ---------------------------------------------------------------------------

    def publish(self, messages: list[Outgoing], timeout: float = RPC_TIMEOUT_S) -> dict[str, str | None]:
        """Publish all ``messages`` and wait for their confirms together (``send`` + ``collect``)."""
        self.send(messages)
        return self.collect([m.message_id for m in messages], timeout)

    def send(self, messages: list[Outgoing]) -> None:
        """Publish ``messages`` (persistent, mandatory) without waiting: their confirms are
        gathered by ``collect``, so the caller can do other work while the broker stores them."""
        state = self._channel
        if state is None or self._lost:
            return  # ``collect`` reports them as not published
        now = int(time.time())
        publish = state.channel.basic_publish
        exchange = self.names.exchange
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
            except Exception as error:  # the channel closed under us
                self._lost = self._lost or f"publish failed: {_describe(error)}"
                break
            state.next_tag += 1
            state.in_flight[state.next_tag] = message.message_id

    def collect(self, message_ids: list[str], timeout: float = RPC_TIMEOUT_S) -> dict[str, str | None]:
        """Wait for what the broker says of the messages sent as ``message_ids``: message id ->
        None (the broker has it) or why it failed (returned, nacked, connection lost)."""
        state = self._channel
        if state is None:
            return dict.fromkeys(message_ids, self._lost or "not connected")
        outcomes = state.outcomes
        if not self.run_until(lambda: all(m in outcomes for m in message_ids), timeout) and not self._lost:
            self._fail_in_flight(f"no publisher confirm within {timeout:.0f} s")
            self._lost = "publisher confirms stopped arriving"
        return {m: outcomes.pop(m, self._lost or "not published") for m in message_ids}

    def _on_return(self, _channel, method, properties, _body) -> None:
        # A mandatory message no queue took: the broker returns it, then acks it.
        if self._channel is not None and properties.message_id:
            self._channel.returned[properties.message_id] = (
                f"unroutable: {method.reply_code} {method.reply_text} ({method.routing_key})"
            )

    def _on_confirm(self, frame) -> None:
        state = self._channel
        if state is None:
            return
        method = frame.method
        nacked = isinstance(method, spec.Basic.Nack)
        tags = (
            [t for t in state.in_flight if t <= method.delivery_tag]
            if method.multiple
            else [method.delivery_tag]
        )
        for tag in tags:
            message_id = state.in_flight.pop(tag, None)
            if message_id is None:
                continue
            if nacked:
                state.outcomes[message_id] = "nacked by the broker"
            else:
                state.outcomes[message_id] = state.returned.pop(message_id, None)
        self._poke()

    def _fail_in_flight(self, reason: str) -> None:
        state = self._channel
        if state is None:
            return
        for message_id in state.in_flight.values():
            state.outcomes[message_id] = reason
        state.in_flight.clear()

    def _require_channel(self):
        if self._channel is None or self._lost:
            raise BrokerLost(self._lost or "not connected")
        return self._channel.channel


class Worker:
    """What the relay and the warehouse share: a loop of steps until ``stop()`` that rides out a
    broker restart (reconnecting with a capped backoff) and a database away for a moment.
    Subclasses set ``broker``, ``log`` and ``report`` (with a ``reconnects`` count)."""

    RECONNECT_CAP_S = 30.0

    broker: Broker
    log: logging.Logger
    report: Any
    _stopping = False

    def stop(self) -> None:
        self._stopping = True

    def run_until_stopped(self, step: Callable[[], object]) -> None:
        failures = 0
        while not self._stopping:
            try:
                step()
                failures = 0
            except BrokerLost as lost:
                failures += 1
                self._reconnect(str(lost), failures)
            except Unavailable as error:  # the database went away: keep the broker, wait
                failures += 1
                self.log.warning("%s; trying again", error.message)
                self.pause(backoff(failures, base=0.5, cap=self.RECONNECT_CAP_S))

    def pause(self, seconds: float) -> None:
        """Wait, answering the broker if connected, and wake up at once when told to stop."""
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            step = min(0.1, max(0.0, deadline - time.monotonic()))
            try:
                self.broker.wait(step, until=lambda: self._stopping)
            except BrokerLost:
                time.sleep(step)

    def forget_deliveries(self) -> None:
        """Deliveries kept aside die with the channel (the broker sends them again)."""

    def _reconnect(self, why: str, failures: int) -> None:
        self.log.warning("broker lost (%s); reconnecting", why)
        self.broker.close()
        self.forget_deliveries()
        while not self._stopping:
            self.pause(backoff(failures, base=0.5, cap=self.RECONNECT_CAP_S))
            if self._stopping:
                return
            try:
                self.broker.open()
            except Unavailable as error:
                self.log.warning("%s; trying again", error.message)
                failures += 1
                continue
            self.report.reconnects += 1
            self.log.info("reconnected to the broker")
            return


def _describe(error: object) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, BaseException) and type(error).__name__ not in text:
        text = f"{type(error).__name__}: {text}"
    return redact(text)


def quiet_pika() -> None:
    """pika logs every dropped connection with a traceback; the workers say it in one line."""
    logging.getLogger("pika").setLevel(logging.CRITICAL)


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """First SIGINT/SIGTERM: ``stop()`` (finish the work in hand, then leave); second: leave now."""
    received: list[int] = []

    def handler(signum, _frame) -> None:
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt
        log.info("%s received: finishing the work in hand, then stopping", signal.Signals(signum).name)
        stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
