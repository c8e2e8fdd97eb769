"""Bulk grants on Postgres written by several processes at once, ending as one process would.

One process's run cannot use the machine: its Python work and the server's work for a batch
alternate, and the server writes one batch at a time on one core (README, "Bulk grants"). Here
the run's process reads and checks the file and deals the batches, in order, to writer processes
(``--jobs``), each with its own connection; every writer works out and writes its batch as the
run in one process would (``bulk_batch``), and these orders keep the outcome the same:

- **Ids in file order.** A batch draws its entry and lot ids (one of each per grant, before it
  locks anything) only after the batch before it drew its own, so ids grow in file order as a
  single run's do; a batch that starts again keeps its ids.
- **Commits in file order.** A batch commits only after the batch before it committed: a run
  stopped at any point (killed, an error) leaves whole batches of a prefix of the file, which the
  next run counts as duplicates, exactly as after a run in one process.
- **No two batches at once that share a shopper or a ref.** The run deals a batch only when no
  batch still being written names one of its shoppers or refs, so batches in flight never wait
  for each other's rows, and each reads the balances and refs the batches before it left.
- **Corrections in one process.** A batch holding a negative row is judged on the balances and
  the marks of every batch before it (``Replay``): the run waits until all are committed and
  applies it itself.

A batch waiting for its turn to commit holds its rows' locks. Were an earlier batch to wait for
one of them through another transaction (another run locking the same shoppers, say), neither
could go on and the server, not seeing the wait between the two processes, would not notice:
while it waits, a batch asks whether an earlier batch's connection waits for a lock, and if so
rolls back and starts again once the batches before it are committed.

(A little over 400 lines on purpose: the writers' side and the run's side of these orders are
one protocol, read together.)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any, NamedTuple

from credex.db.models import utcnow
from credex.errors import CredexError, Unavailable, redact
from credex.points.bulk_batch import (
    BulkReport,
    Replay,
    as_credex_error,
    plan_batch,
    start_again,
)
from credex.points.bulk_files import Grant, Rejected
from credex.points.bulk_writers import PostgresWriter

POLL = 0.2  # seconds between looks at the run's state while a batch waits for its turn


class Task(NamedTuple):
    """A batch as sent to a writer: its rows column by column (a rejected row has no user, and
    its reason in ``refs``), and what the run knows of earlier runs of the file."""

    index: int
    lines: list[int]
    users: list[str | None]
    points: list[int | None]
    refs: list[str]
    reasons: list[str | None]
    own_from: int | None
    seen: int
    look_up: bool


class Done(NamedTuple):
    """A batch committed: its counts, its refused rows in file order (line, reason), and what
    it tells the run about earlier runs of the file."""

    index: int
    outcome: BulkReport
    refused: list[tuple[int, str]]
    seen: int
    first_id: int | None
    recorded: bool


class Failed(NamedTuple):
    index: int  # -1: the writer could not start
    error: BaseException | None  # None: stopped because the run stops


class _Stopped(Exception):
    """The run stops (an error elsewhere, or the run's process is gone): roll back, write nothing."""


class Turns:
    """What the processes share: the last batch that drew its ids, the last one committed,
    whether the run stops, and which batch each writer holds on which server connection.

    No lock guards them: a process killed while holding a lock shared between processes would
    hold it for good, and the others would wait for it forever. Each number has one writer (the
    batch whose turn it is, or the run), and every reader only waits for it to reach a value, so
    plain stores and loads of aligned 64-bit integers suffice. A change wakes the writers through
    a semaphore each (posting one is no lock, whoever dies when), and a writer looks again every
    POLL seconds anyway."""

    def __init__(self, context: Any, jobs: int) -> None:
        self.state = context.RawArray("q", [-1, -1, 0])  # drawn, committed, stop
        self.holding = context.RawArray("q", [-1] * jobs)  # batch index per writer
        self.backends = context.RawArray("q", [0] * jobs)  # server process id per writer
        self.wakes = [context.Semaphore(0) for _ in range(jobs)]
        self.parent = os.getpid()
        self.slot = -1  # which writer this is, set in each writer

    def advance(self, index: int, *, drawn: bool = False, committed: bool = False) -> None:
        if drawn:
            self.state[0] = index
        if committed:
            self.state[1] = index
        self._wake()

    def stop(self) -> None:
        self.state[2] = 1
        self._wake()

    def _wake(self) -> None:
        for wake in self.wakes:
            wake.release()

    def wait_until(
        self, reached: Callable[[], bool], *, earlier_waits: Callable[[list[int]], bool] | None = None
    ) -> bool:
        """Wait until ``reached()``. ``earlier_waits(backends)``: asked every POLL seconds with
        the server processes of the batches before this one; True gives up (returns False)."""
        wake = self.wakes[self.slot]
        asked = time.monotonic()
        while True:
            if self.state[2] or os.getppid() != self.parent:
                raise _Stopped
            if reached():
                return True
            wake.acquire(timeout=POLL)
            if earlier_waits is None or time.monotonic() - asked < POLL or reached():
                continue
            asked = time.monotonic()
            backends = self._earlier_backends()
            if backends and earlier_waits(backends):
                return False

    def _earlier_backends(self) -> list[int]:
        mine = self.holding[self.slot]
        return [
            self.backends[slot]
            for slot in range(len(self.holding))
            if 0 <= self.holding[slot] < mine and self.backends[slot]
        ]


# --- a writer process --------------------------------------------------------------------------------


def _writer(
    url: str, slot: int, turns: Turns, channel: Any, runs_ends: list[Any], operator: str, expiry_days: int
) -> None:
    """A writer process: batches from ``channel`` until it closes or sends None (or the run's
    process is gone); each answered with Done or Failed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process: the run decides
    _end_with(turns.parent)
    for end in runs_ends:  # the run's ends of the pipes, inherited: else no EOF when the run dies
        end.close()
    # Nor does a writer keep the run's stdout and stderr open: whoever reads them (a pipe, a
    # script waiting for the run to end) sees them close when the run ends. It reports through
    # its channel only.
    with open(os.devnull, "wb") as nowhere:
        os.dup2(nowhere.fileno(), 1)
        os.dup2(nowhere.fileno(), 2)
    turns.slot = slot
    try:
        from credex.db.engine import forget_inherited_engines, open_session

        forget_inherited_engines()  # the run's connection stays the run's
        session = open_session(url, write=True)
        writer = PostgresWriter(session)
    except BaseException as error:  # reported by the run like a batch's failure
        channel.send(_failed(-1, url, error))
        return
    try:
        while (task := _next_task(channel, turns)) is not None:
            turns.holding[slot] = task.index
            try:
                answer = _write_batch(session, writer, turns, task, url, operator, expiry_days)
            except _Stopped:
                session.rollback()
                answer = Failed(task.index, None)
            except BaseException as error:
                session.rollback()
                answer = _failed(task.index, url, error)
            turns.holding[slot] = -1
            channel.send(answer)
    except (EOFError, BrokenPipeError):  # the run's process is gone
        return
    finally:
        session.close()


def _end_with(parent: int) -> None:
    """Linux: the kernel kills this writer when the run's process ends, however it ends, so no
    writer outlives it (waiting for a lock, say; its transaction is rolled back when its
    connection closes). Elsewhere the writer notices within a second (``_next_task``, ``POLL``)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before the line above
        os._exit(0)


def _next_task(channel: Any, turns: Turns) -> Task | None:
    while not channel.poll(POLL * 5):
        if os.getppid() != turns.parent:
            return None
    return channel.recv()


def _failed(index: int, url: str, error: BaseException) -> Failed:
    """What the run raises for ``error``: a CredexError as the run in one process would report
    it (the driver's exceptions do not travel between processes), else a bug (exit 70)."""
    from credex.db.failures import translate_db_error

    failure = as_credex_error(url, error)
    if not isinstance(failure, CredexError):
        failure = translate_db_error(error) or RuntimeError(
            f"a bulk writer failed ({type(error).__name__}): {redact(str(error))}"
        )
    return Failed(index, failure)


def _rows(task: Task) -> list[Grant | Rejected]:
    return [
        Rejected(line, ref, None) if user is None else Grant(line, user, points, ref, reason, None)
        for line, user, points, ref, reason in zip(
            task.lines, task.users, task.points, task.refs, task.reasons, strict=True
        )
    ]


def _write_batch(
    session: Any, writer: PostgresWriter, turns: Turns, task: Task, url: str, operator: str, expiry_days: int
) -> Done:
    index = task.index
    batch = _rows(task)
    grants = [row for row in batch if row.__class__ is Grant]
    users = sorted({row.user_id for row in grants})
    refs = list({row.ref for row in grants})
    turns.wait_until(lambda: turns.state[0] == index - 1)  # no lock held while waiting
    writer.begin()
    ids = writer.reserve(len(grants))
    turns.advance(index, drawn=True)
    replay = Replay(_no_corrections)
    replay.own_from = task.own_from
    look_up = task.look_up
    attempt = 0
    while True:
        outcome = BulkReport()
        refused: list[tuple[int, str]] = []
        refuse = refused.append
        replay.seen = task.seen
        now = utcnow()
        try:
            writer.begin()
            turns.backends[turns.slot] = writer.backend_pid()
            accounts = writer.accounts(users, lock=True) if users else {}
            used = writer.used_refs(refs) if refs and look_up else {}
            recorded = bool(used)  # before planning: the plan adds the batch's own refs to ``used``
            plan = plan_batch(
                batch,
                accounts=accounts,
                used_refs=used,
                lots=None,  # no correction here: no stored lot is spent
                report=outcome,
                on_rejected=lambda row, refuse=refuse: refuse((row.line, row.reason)),
                now=now,
                expiry_days=expiry_days,
                replay=replay,
            )
            first_id = writer.write(plan, now=now, operator=operator, ids=ids)
            if not turns.wait_until(lambda: turns.state[1] == index - 1, earlier_waits=writer.blocked):
                # An earlier batch waits for a lock, perhaps through another transaction for one
                # of ours: let go, and start again once the batches before are committed.
                session.rollback()
                turns.wait_until(lambda: turns.state[1] == index - 1)
                continue
            session.commit()
            turns.advance(index, committed=True)
            return Done(index, outcome, refused, replay.seen, first_id, recorded)
        except _Stopped:
            raise
        except Exception as error:
            if start_again(session, error, attempt):
                attempt += 1
                look_up = True
                continue
            raise


def _no_corrections(users: list[str], bound: int) -> dict[str, int]:  # pragma: no cover - never asked
    raise AssertionError("a batch with a correction is applied by the run's own process")


# --- the run's side ------------------------------------------------------------------------------------


class _InFlight(NamedTuple):
    batch: list[Grant | Rejected]
    users: set[str]
    refs: set[str]
    slot: int


class Writers:
    """The writer processes of one run, seen from the run's process: ``deal`` a batch,
    ``settled`` (the run applied a batch itself, all before it committed), ``drain``, ``close``.
    ``merge(batch, done)`` is called for every batch a writer committed, in file order."""

    def __init__(self, url: str, jobs: int, *, operator: str, expiry_days: int, merge: Callable) -> None:
        # Forked: a writer starts with what the run imported (no start-up of its own) and shares
        # those pages with it until either writes them. It uses none of the run's connections,
        # files or threads; what the run printed so far is flushed so that no copy of it is.
        context = multiprocessing.get_context("fork")
        sys.stdout.flush()
        sys.stderr.flush()
        self.turns = Turns(context, jobs)
        self.merge = merge
        self.channels: list[Any] = []
        self.processes: list[Any] = []
        for slot in range(jobs):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_writer,
                args=(url, slot, self.turns, theirs, [*self.channels, ours], operator, expiry_days),
                name=f"credex-bulk-writer-{slot}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.channels.append(ours)
            self.processes.append(process)
        self.alive = set(range(jobs))
        self.idle = list(range(jobs))
        self.in_flight: dict[int, _InFlight] = {}
        self.finished: dict[int, tuple[list[Grant | Rejected], Done]] = {}
        self.next_merge = 0
        self.failure: Failed | None = None

    def settled(self, index: int) -> None:
        """Batch ``index`` was applied by the run's process (after ``drain``)."""
        self.turns.advance(index, drawn=True, committed=True)
        self.next_merge = index + 1

    def deal(self, index: int, batch: list[Grant | Rejected], replay: Replay) -> None:
        grants = [row for row in batch if row.__class__ is Grant]
        users = {row.user_id for row in grants}
        refs = {row.ref for row in grants}
        while self.failure is not None or not self.idle or self._shares(users, refs):
            self._receive()
        slot = self.idle.pop()
        lines, users_, points, refs_, reasons = columns = ([], [], [], [], [])
        for row in batch:
            lines.append(row.line)
            if row.__class__ is Grant:
                users_.append(row.user_id)
                points.append(row.points)
                refs_.append(row.ref)
                reasons.append(row.reason)
            else:
                users_.append(None)
                points.append(None)
                refs_.append(row.reason)
                reasons.append(None)
        self.in_flight[index] = _InFlight(batch, users, refs, slot)
        with contextlib.suppress(OSError):  # a writer gone: its end is taken in by _receive
            self.channels[slot].send(Task(index, *columns, replay.own_from, replay.seen, replay.look_up_refs))

    def drain(self) -> None:
        """Wait until every batch dealt is committed and merged; raise the first failure."""
        while self.in_flight or self.failure is not None:
            self._receive()

    def close(self) -> None:
        """Let the writers go; with batches still in flight (an error, an interrupt), stop them
        first: they roll back, and nothing more commits. A writer still busy a moment later (one
        waiting for a lock another program holds) is killed: its transaction is rolled back
        when the server sees its connection gone, and the batches before it are committed."""
        stopping = bool(self.in_flight) or self.failure is not None
        if stopping:
            self.turns.stop()
        for slot in self.alive:
            with contextlib.suppress(OSError):
                self.channels[slot].send(None)
        for process in self.processes:
            process.join(timeout=2 if stopping else 30)
            if process.is_alive():
                process.kill()
                process.join()
        for channel in self.channels:
            channel.close()

    def _shares(self, users: set[str], refs: set[str]) -> bool:
        flights = self.in_flight.values()
        return any(not users.isdisjoint(f.users) or not refs.isdisjoint(f.refs) for f in flights)

    def _receive(self) -> None:
        """Take in a writer's answer or its end; raise the first failure once nothing is in flight."""
        if self.failure is not None and not self.in_flight:
            raise self.failure.error
        sentinels = {self.processes[slot].sentinel: slot for slot in self.alive}
        for source in wait([*(self.channels[slot] for slot in self.alive), *sentinels]):
            if source in sentinels:  # a writer ended: take in what it sent before
                slot = sentinels[source]
                if slot in self.alive:
                    self._take_all(self.channels[slot])
                    self._lost(slot)
            elif any(self.channels[slot] is source for slot in self.alive):
                self._take_all(source)
        while self.next_merge in self.finished:
            self.merge(*self.finished.pop(self.next_merge))
            self.next_merge += 1

    def _take_all(self, channel: Any) -> None:
        try:
            while channel.poll():
                self._take(channel.recv())
        except (EOFError, OSError):
            pass  # the writer ended: its sentinel says so

    def _take(self, answer: Done | Failed) -> None:
        flight = self.in_flight.pop(answer.index, None)
        if flight is not None:
            self.idle.append(flight.slot)
        if isinstance(answer, Done):
            self.finished[answer.index] = (flight.batch, answer)
        elif answer.error is not None:
            self._fail(answer)

    def _lost(self, slot: int) -> None:
        process = self.processes[slot]
        process.join(timeout=5)
        self.alive.discard(slot)
        if slot in self.idle:
            self.idle.remove(slot)
        held = [index for index, flight in self.in_flight.items() if flight.slot == slot]
        for index in held:
            del self.in_flight[index]
        error = Unavailable(
            f"a writer process of this run ended unexpectedly (exit code {process.exitcode}); what is "
            "committed is whole batches from the start of the file: run the file again, they count as "
            "duplicates"
        )
        self._fail(Failed(held[0] if held else -1, error))

    def _fail(self, failure: Failed) -> None:
        """Keep the failure of the earliest batch, and stop the writers."""
        if self.failure is None or failure.index < self.failure.index:
            self.failure = failure
        self.turns.stop()
