"""What the relay and the warehouse share: a worker that holds one broker connection and runs in
turns until told to stop, riding out a broker restart (reconnecting) and a database away for a
moment (waiting), both with credex's one backoff; and the one place where workers meet SIGINT and
SIGTERM.

    worker = Relay(...)               # a Worker: its broker and its report given to it
    report = run_until_signalled(worker)

``start()`` runs the worker on a thread of its own, ``stop()`` asks it to finish the work in hand
and leave, ``join(timeout)`` waits for it and raises what ended it, if anything did. ``run()`` is
the same life in the calling thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Generic, Protocol, TypeVar

from credex.amqp.broker import Broker
from credex.amqp.connection import BrokerLost
from credex.errors import Unavailable
from credex.retry import RECONNECT, Backoff, Streak


class Report(Protocol):
    reconnects: int

    def to_json(self) -> dict: ...


R = TypeVar("R", bound=Report)


class Worker(Generic[R]):
    """One broker connection worked in turns until ``stop()``, or one pass with ``once``.

    Subclasses say what happens at each point of the life:
    ``prepare()`` before connecting (check the schema, the carrier), ``connected()`` once
    connected, ``turn()`` one step of the long run, ``one_pass()`` the whole of a ``--once`` run,
    ``finish()`` after the last turn while still connected, ``broker_lost()`` when the connection
    went (deliveries in hand die with it), ``cleanup()`` at the very end whatever happened.
    """

    def __init__(
        self,
        broker: Broker,
        report: R,
        *,
        log: logging.Logger,
        once: bool = False,
        backoff: Backoff = RECONNECT,
    ) -> None:
        self.broker = broker
        self.report = report
        self.log = log
        self.once = once
        self.backoff = backoff
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # --- what subclasses provide --------------------------------------------------------------

    def prepare(self) -> None:
        """Before connecting: refuse to start (raise) when something the work needs is missing."""

    def connected(self) -> None:
        """Once connected to the broker: say so in the log."""
        self.log.info("%s connected to %s: consuming %s", self, self.broker.where, self.broker.queue)

    def turn(self) -> None:
        """One step of the long run; it waits for work itself. BrokerLost: reconnect and go on;
        Unavailable: the database is away, wait and go on."""
        raise NotImplementedError

    def one_pass(self) -> None:
        """The whole of a ``--once`` run."""
        raise NotImplementedError

    def finish(self) -> None:
        """After the last turn of a long run, the broker still connected."""

    def broker_lost(self) -> None:
        """The connection went: what was received on it dies with it (the broker sends it again)."""

    def cleanup(self) -> None:
        """At the very end, whatever happened: release what ``prepare()`` took."""

    # --- the life -------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        """Run the worker on a thread of its own."""
        if self._thread is not None:
            raise RuntimeError(f"{self} was started already")
        self._thread = threading.Thread(target=self._run_on_thread, name=type(self).__name__, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the work in hand and leave (from any thread, a signal handler included)."""
        self._stop.set()
        self.broker.wake()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: as long as it takes) for the worker to end; True
        once it has. What ended it, if it failed, is raised here."""
        if self._thread is None:
            raise RuntimeError(f"{self} was never started")
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return True

    def _run_on_thread(self) -> None:
        try:
            self.run()
        except BaseException as error:  # handed to join()
            self._error = error

    def run(self) -> R:
        """The whole life in the calling thread: prepare, connect, work, close. A broker that
        cannot be reached at start, or is lost during a ``--once`` run, is Unavailable (exit 69)."""
        try:
            self.prepare()
            self.broker.open()
            self.connected()
            if self.once:
                self.one_pass()
                if self.broker.lost:
                    raise BrokerLost(self.broker.lost)
            else:
                self._until_stopped()
        except BrokerLost as lost:
            raise Unavailable(f"lost the broker {self.broker.where}: {lost}") from None
        finally:
            try:
                self.cleanup()
            finally:
                self.broker.close()
        return self.report

    def _until_stopped(self) -> None:
        streak = Streak(self.backoff)
        while not self.stopping:
            try:
                self.turn()
                streak.succeeded()
            except BrokerLost as lost:
                self._reconnect(str(lost), streak)
            except Unavailable as error:  # the database went away: keep the broker, wait
                self.log.warning("%s; trying again", error.message)
                self.pause(streak.failed())
        if not self.broker.lost:
            self.finish()

    def _reconnect(self, why: str, streak: Streak) -> None:
        self.log.warning("broker lost (%s); reconnecting", why)
        self.broker.close()
        self.broker_lost()
        while not self.stopping:
            self.pause(streak.failed())
            if self.stopping:
                return
            try:
                self.broker.open()
            except Unavailable as error:
                self.log.warning("%s; trying again", error.message)
                continue
            self.report.reconnects += 1
            self.log.info("reconnected to the broker: %s connected to %s", self, self.broker.where)
            return

    def pause(self, seconds: float) -> None:
        """Wait, answering the broker if connected, and wake up at once when told to stop."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            if self.broker.connected:
                try:
                    self.broker.wait(left, until=self._stop.is_set)
                    continue
                except BrokerLost:
                    pass  # found out by the next turn
            self._stop.wait(left)

    def __str__(self) -> str:
        return type(self).__name__.lower()


def run_until_signalled(worker: Worker[R], *, as_json: bool = False) -> R:
    """Run ``worker`` on its thread until it ends. The first SIGINT or SIGTERM stops it (the work
    in hand is finished: published, confirmed, recorded, acknowledged); a second one leaves at once,
    as a kill would, which the outbox and the broker are built to survive, after the error line
    every interrupted command ends with (JSON under ``as_json``)."""
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            worker.log.info("%s received: finishing the work in hand, then stopping", name)
            worker.stop()
            return
        worker.log.warning("%s received again: leaving now", name)
        from credex.output import report_error

        report_error(None, as_json=as_json, code="interrupted", message="interrupted")
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.start()
        while not worker.join(timeout=0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return worker.report
