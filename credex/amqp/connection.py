"""One connection to the broker and one channel on it, driven step by step.

pika's SelectConnection calls back from inside its I/O loop. Rather than give that loop a thread of
its own, the thread that uses the connection turns it only while it waits (``run_until``): so a
worker is a plain loop of steps, many publishes are in flight at once with their confirms arriving
together, and heartbeats are answered whenever the worker waits. ``wake()`` is the one method
another thread may call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions

from credex.amqp.params import (
    CONNECT_TIMEOUT_S,
    connection_parameters,
    describe,
    display_amqp_url,
    split_urls,
)

log = logging.getLogger("credex.amqp")

RPC_TIMEOUT_S = 30.0
_WRITE_CHUNK = 256 * 1024  # corked frames leave in writes of at most this many bytes


class BrokerLost(Exception):
    """The connection or the channel went away; a worker reconnects."""


class BrokerRefused(Exception):
    """The broker closed the channel refusing what was asked (``reply_code``, ``reply_text``):
    asking again gets the same answer, so reconnecting would not help."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"{reply_code} {reply_text}")
        self.reply_code = reply_code
        self.reply_text = reply_text


class _SelectConnection(pika.SelectConnection):
    """pika hands each frame to the socket on its own: three send() calls for every message
    published. Between ``cork()`` and ``uncork()`` the frames are gathered and leave together, in
    order, so a batch of publishes costs a few writes. This overrides pika's
    ``_output_marshaled_frames`` (pika 1.x); without it, frames simply go out one by one."""

    _corked: list[bytes] | None = None

    def _output_marshaled_frames(self, marshaled_frames) -> None:
        if self._corked is None:
            super()._output_marshaled_frames(marshaled_frames)
            return
        for marshaled in marshaled_frames:
            self.bytes_sent += len(marshaled)
            self.frames_sent += 1
        self._corked.extend(marshaled_frames)

    def cork(self) -> None:
        if self._corked is None and hasattr(pika.SelectConnection, "_output_marshaled_frames"):
            self._corked = []

    def uncork(self) -> None:
        frames, self._corked = self._corked, None
        if not frames or getattr(self, "_transport", None) is None:
            return
        data = b"".join(frames)
        for start in range(0, len(data), _WRITE_CHUNK):
            self._adapter_emit_data(data[start : start + _WRITE_CHUNK])


class Connection:
    """A SelectConnection with one channel. Every failure, whenever pika reports it, is kept as
    ``lost`` (the first reason wins) and ends any wait at once.

    ``url`` may name several nodes of a cluster, comma-separated: ``open()`` connects to the first
    that answers, and after a loss starts with the node after the one that was lost, so a worker
    moves to a surviving node instead of waiting for the dead one."""

    def __init__(self, url: str, *, name: str) -> None:
        self.urls = split_urls(url)
        self.url = self.urls[0]  # the node connected to (or tried last)
        self._first = 0  # where the next open() starts
        self.name = name
        self.refused: BrokerRefused | None = None  # the broker's 4xx closing the channel
        self.channel: Any = None
        self._connection: _SelectConnection | None = None
        self._lost: str | None = None
        self._waiting_for: Callable[[], object] | None = None

    @property
    def lost(self) -> str | None:
        return self._lost

    @property
    def is_open(self) -> bool:
        return self._connection is not None and self.channel is not None and self._lost is None

    def lose(self, reason: str) -> None:
        """Record why the connection is no use any more (the first reason is kept)."""
        self._lost = self._lost or reason
        self.poke(force=True)

    # --- connecting ---------------------------------------------------------------------------

    def open(self, timeout: float = CONNECT_TIMEOUT_S) -> Any:
        """Connect to the first node that answers (each given ``timeout``) and open the channel;
        returns the channel. Raises BrokerLost (closing what was opened) when none answers."""
        count = len(self.urls)
        reasons = []
        for step in range(count):
            index = (self._first + step) % count
            self.url = self.urls[index]
            try:
                channel = self._open_one(timeout)
            except BrokerLost as error:
                reasons.append(f"{display_amqp_url(self.url)}: {error}" if count > 1 else str(error))
                continue
            self._first = (index + 1) % count if count > 1 else 0  # after a loss: the next node
            return channel
        raise BrokerLost("; ".join(reasons) if count > 1 else reasons[0])

    def _open_one(self, timeout: float) -> Any:
        self._lost = None
        self.refused = None
        params = connection_parameters(self.url, name=self.name, timeout=timeout)
        opened: list = []

        def on_open(connection) -> None:
            opened.append(connection)
            self.poke(force=True)

        def on_open_error(_connection, error) -> None:
            self.lose(describe(error))

        self._connection = _SelectConnection(
            params,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=self._on_connection_closed,
        )
        try:
            if not self.run_until(lambda: opened, timeout):
                raise BrokerLost(self._lost or f"no connection within {timeout:.0f} s")
            self.channel = self.call(lambda done: self._connection.channel(on_open_callback=done))
        except BrokerLost:
            self.close()
            raise
        self.channel.add_on_close_callback(self._on_channel_closed)
        return self.channel

    def close(self) -> None:
        connection, self._connection = self._connection, None
        self.channel = None
        if connection is None:
            return
        try:
            if connection.is_open:
                # The loop stops the moment the broker has answered the close (it used to turn
                # until its next 0.1 s tick: a tenth of a second added to every `--once` run).
                connection.add_on_close_callback(lambda *_args: connection.ioloop.stop())
                connection.close()
            deadline = time.monotonic() + 5
            while not connection.is_closed and time.monotonic() < deadline:
                tick = connection.ioloop.call_later(0.1, connection.ioloop.stop)
                connection.ioloop.start()
                connection.ioloop.remove_timeout(tick)
        except Exception as error:  # closing a broken connection: nothing left to save
            log.debug("closing the broker connection: %s", describe(error))

    def _on_connection_closed(self, _connection, reason) -> None:
        self.lose(f"connection closed: {describe(reason)}")

    def _on_channel_closed(self, _channel, reason) -> None:
        if isinstance(reason, pika.exceptions.ChannelClosedByClient):
            self.poke(force=True)
            return
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and 400 <= reason.reply_code < 500:
            self.refused = BrokerRefused(reason.reply_code, reason.reply_text)
        self.lose(f"channel closed: {describe(reason)}")

    # --- the I/O loop, turned while we wait ---------------------------------------------------

    def poke(self, *, force: bool = False) -> None:
        """Something happened (called from pika's callbacks): end the current wait if what it
        waits for may now be true. Stopping the loop only then, rather than at every frame, spares
        a poller set up and torn down per confirm or delivery."""
        connection = self._connection
        if connection is None:
            return
        if force or self._lost or self._waiting_for is None or self._waiting_for():
            connection.ioloop.stop()

    def wake(self) -> None:
        """From any thread: end the current wait, so the waiting thread looks at its condition."""
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(Exception):  # the loop closed meanwhile: nobody waits on it
                connection.ioloop.add_callback_threadsafe(connection.ioloop.stop)

    def run_until(self, done: Callable[[], object], timeout: float) -> bool:
        """Turn the I/O loop until ``done()``, the connection is lost or ``timeout`` passes."""
        if done() or self._lost or self._connection is None:
            return bool(done())
        loop = self._connection.ioloop
        deadline = time.monotonic() + timeout
        timer = loop.call_later(max(0.0, timeout), loop.stop)
        outer, self._waiting_for = self._waiting_for, done
        try:
            while not done() and not self._lost and time.monotonic() < deadline:
                loop.start()
        finally:
            self._waiting_for = outer
            with contextlib.suppress(Exception):  # the timer went with a closed connection
                loop.remove_timeout(timer)
        return bool(done())

    def call(self, start: Callable[[Callable], None], timeout: float = RPC_TIMEOUT_S) -> Any:
        """Run one broker RPC as if it were a plain call: ``start(done)`` sends it, pika calls
        ``done(frame)`` with the answer."""
        answer: list = []

        def done(frame=None) -> None:
            answer.append(frame)
            self.poke(force=True)

        start(done)
        if not self.run_until(lambda: answer, timeout):
            raise BrokerLost(self._lost or f"no answer from the broker within {timeout:.0f} s")
        return answer[0]

    def wait(self, seconds: float, until: Callable[[], object] | None = None) -> None:
        """Let the broker talk (deliveries, confirms, heartbeats) for ``seconds`` or until
        ``until()``. Raises BrokerLost when the connection goes."""
        if self._connection is None:
            time.sleep(seconds)
            return
        self.run_until(until or (lambda: False), seconds)
        if self._lost:
            raise BrokerLost(self._lost)

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Frames written inside leave together when it ends (see ``_SelectConnection``)."""
        connection = self._connection
        if connection is None:
            yield
            return
        connection.cork()
        try:
            yield
        finally:
            connection.uncork()
