"""The worker both the relay and the warehouse are: started on its own thread, stopped when the
turn in hand is done, joined with what ended it; SIGINT/SIGTERM handled in one place, where a
second signal leaves at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from credex.errors import Unavailable
from tests.support import ROOT, subprocess_env, wait_for

pytestmark = pytest.mark.rabbitmq


def counting_worker(url: str, names, *, once: bool = False):
    from dataclasses import dataclass

    from credex.amqp.broker import Broker
    from credex.worker import Worker

    @dataclass
    class Report:
        turns: int = 0
        reconnects: int = 0

        def to_json(self) -> dict:
            return {"turns": self.turns}

    class Counting(Worker):
        finished = False

        def turn(self) -> None:
            self.broker.wait(0.05)
            self.report.turns += 1

        def one_pass(self) -> None:
            self.report.turns += 1

        def finish(self) -> None:
            self.finished = True

    broker = Broker(url, names.topology(), consume=names.warehouse_queue, prefetch=1, connection_name="test")
    return Counting(broker, Report(), log=__import__("logging").getLogger("test"), once=once)


def test_a_started_worker_turns_until_stopped_and_join_says_when_it_has_ended(rabbit):
    worker = counting_worker(rabbit.url, rabbit.names)
    worker.start()
    wait_for(lambda: worker.report.turns >= 3, timeout=30, what="a few turns")
    assert worker.join(timeout=0.1) is False  # still running
    worker.stop()
    assert worker.join(timeout=10) is True
    assert worker.finished and not worker.broker.connected
    turns = worker.report.turns
    assert worker.join(timeout=1) is True and worker.report.turns == turns


def test_a_once_worker_does_its_pass_and_ends_by_itself(rabbit):
    worker = counting_worker(rabbit.url, rabbit.names, once=True)
    worker.start()
    assert worker.join(timeout=30) is True
    assert worker.report.turns == 1


def test_what_ends_a_worker_is_raised_by_join():
    from credex.relay.topology import Names

    worker = counting_worker("amqp://guest:pw-never-shown@127.0.0.1:1/%2F", Names("x."))
    worker.start()
    with pytest.raises(Unavailable) as raised:
        worker.join(timeout=30)
    assert "cannot reach the broker amqp://guest@127.0.0.1:1/" in raised.value.message
    assert "pw-never-shown" not in raised.value.message


STUCK = textwrap.dedent(
    """
    import logging, sys, threading
    from credex.amqp.broker import Broker
    from credex.output import log_to_stderr
    from credex.relay.topology import Names
    from credex.worker import Worker, run_until_signalled

    class Report:
        reconnects = 0

    class Stuck(Worker):
        def turn(self):
            logging.getLogger("credex.test").info("turning: work that will not finish soon")
            threading.Event().wait(120)

    log_to_stderr()
    names = Names(sys.argv[2])
    broker = Broker(sys.argv[1], names.topology(), consume=names.warehouse_queue, prefetch=1,
                    connection_name="test stuck")
    run_until_signalled(Stuck(broker, Report(), log=logging.getLogger("credex.test")))
    """
)


def test_a_second_signal_leaves_at_once_while_the_first_is_still_finishing(rabbit):
    process = subprocess.Popen(
        [sys.executable, "-c", STUCK, rabbit.url, rabbit.prefix],
        env=subprocess_env(),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("turning" in line for line in lines), timeout=30, what="the turn")
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: any("finishing the work in hand" in line for line in lines), timeout=10)
        assert process.poll() is None  # the work in hand does not finish: it waits
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=5)
    assert any("SIGTERM received again: leaving now" in line for line in lines)
