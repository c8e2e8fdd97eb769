"""Whatever is killed, and when, nothing is lost and nothing counts twice.

- The pipeline: shoppers (``redeem create`` processes), a relay and a warehouse run while the
  test SIGKILLs each kind of process, at random moments and in the windows that matter: a
  relay after it published and before it recorded the message sent (its broker connection goes
  through a proxy that swallows the confirms), a warehouse after it asked the carrier for a
  waybill and before it saved it (the sandbox answers some requests slowly), a shopper in the
  middle of its redemption. The kills go on while redemptions keep arriving; afterwards every
  redemption ships exactly once and every rule holds.
- The writers: ``redeem create``, ``redeem cancel``, ``award bulk``, ``award expire`` and
  ``award settle`` SIGKILLed inside a transaction (on Postgres: while they wait for a row lock the
  test holds; on SQLite: at a random moment), then run again to the end.
- Races: the same ``--request-id``, order, grant ref or refund id from several processes at once.

Every random choice comes from the ``rng`` fixture: a failure prints its CREDEX_TEST_SEED.

(Over 400 lines on purpose: the kills share one pipeline harness, and their windows are easier to
compare side by side.)
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time

from tests.invariants import check_invariants
from tests.netfaults import FaultyProxy
from tests.pipeline import Pipeline, check_shipped_exactly_once, close_connections
from tests.sandbox import running_sandbox
from tests.support import (
    credex_command,
    holding_accounts,
    lock_waiters,
    run_process,
    subprocess_env,
    wait_for,
)

pytestmark = [pytest.mark.crash, pytest.mark.slow]

USERS = ["u1", "u2", "u3"]
PRICE = 10
STOCK = 1000
# Each kind of kill at least once, in an order and with one more kind drawn from the run's seed
# (each CI run draws others).
KILLS = ["relay", "relay_after_publish", "warehouse", "warehouse_at_carrier", "shopper", "cut_connection"]
EXTRA_KILLS = 1
RELAY_OPTIONS = ("--confirm-timeout", "1", "--max-confirm-timeout", "2", "--lease", "2", "--batch-size", "7")


class Shopper:
    """``redeem create`` processes one after another, each with a request id of its own; one that
    is killed is run again with the same request id, which must then count it once."""

    def __init__(self, db_url: str, rng) -> None:
        self.env = subprocess_env(CREDEX_DATABASE_URL=db_url)
        self.rng = rng
        self.current: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.made: dict[str, int] = {}  # request id -> redemption id
        self.killed = 0
        self.error: BaseException | None = None
        self.plan = [(rng.choice(USERS), rng.choice([1, 1, 2])) for _ in range(500)]
        self.thread = threading.Thread(target=self._run, name="shopper", daemon=True)

    def _run(self) -> None:
        try:
            for n, (user, quantity) in enumerate(self.plan):
                if self.stop.is_set():
                    return
                request_id = f"req-{n}"
                while request_id not in self.made:
                    self._redeem(request_id, user, quantity)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def _redeem(self, request_id: str, user: str, quantity: int) -> None:
        command = credex_command(
            "redeem", "create", user, "MUG", "--quantity", quantity, "--address", f"{request_id} High St",
            "--request-id", request_id, "--json",
        )  # fmt: skip
        with self.lock:
            process = self.current = subprocess.Popen(
                command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        try:
            out, err = process.communicate(timeout=120)
        finally:
            with self.lock:
                self.current = None
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
        if process.returncode == -signal.SIGKILL:
            return  # killed by the test: the same request id again
        assert process.returncode == 0, f"redeem {request_id}: exit {process.returncode}: {err}"
        self.made[request_id] = json.loads(out)["redemption_id"]

    def kill_mid_redemption(self, delay: float) -> bool:
        """SIGKILL the running ``redeem create`` ``delay`` s into its life (True: it was still running)."""
        wait_for(lambda: self.current is not None, timeout=60, what="a shopper's process")
        time.sleep(delay)
        with self.lock:
            if self.current is None or self.current.poll() is not None:
                return False
            self.current.send_signal(signal.SIGKILL)
        self.killed += 1
        return True


@pytest.mark.rabbitmq
@pytest.mark.timeout(600)
def test_killing_every_kind_of_process_while_work_is_in_flight_loses_nothing_and_ships_nothing_twice(
    db_url, credex, rabbit, tmp_path, rng, seed, catalog_book
):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", PRICE, "--stock", STOCK)
    for user in USERS:
        credex("award", "grant", user, 100_000, "--reason", "opening", "--ref", f"open-{user}")
    schedule = KILLS + rng.choices(["relay", "warehouse", "shopper"], k=EXTRA_KILLS)
    rng.shuffle(schedule)
    print(f"kills, in order: {schedule}")
    landed: list[str] = []
    # A quarter of the carrier's answers take 2 s: a warehouse killed then has asked for a
    # waybill (the carrier makes it) and never saved it.
    sandbox_options = ("--slow-share", "0.25", "--slow-seconds", "2", "--seed", str(seed))
    with running_sandbox(*sandbox_options) as sandbox, FaultyProxy("127.0.0.1", 5672) as proxy:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        # A relay muted by the proxy gives its connection up after 4 s without publisher confirms
        # (CREDEX_AMQP_PUBLISH_TIMEOUT; 30 s by default) and reconnects: see the mute below.
        via_proxy = {
            "CREDEX_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F",
            "CREDEX_AMQP_PUBLISH_TIMEOUT": "4",
        }
        shopper = Shopper(db_url, rng)
        try:
            relay = pipeline.relay(*RELAY_OPTIONS, env=via_proxy)
            warehouse = pipeline.warehouse("--prefetch", "5")
            shopper.thread.start()
            for kill in schedule:
                # Wait for progress, so that every kill meets messages on their way.
                before = pipeline.confirmed()
                wait_for(
                    lambda b=before: pipeline.confirmed() > b, timeout=120, what=f"progress before {kill}"
                )
                assert shopper.thread.is_alive(), "the shoppers stopped before the last kill"
                if kill == "relay":
                    time.sleep(rng.uniform(0.0, 0.5))
                    pipeline.kill(relay)
                    relay = pipeline.relay(*RELAY_OPTIONS, env=via_proxy)
                elif kill == "relay_after_publish":
                    mute_until_published_unsent(pipeline, relay, proxy)
                    pipeline.kill(relay)
                    relay = pipeline.relay(*RELAY_OPTIONS, env=via_proxy)
                elif kill == "warehouse":
                    time.sleep(rng.uniform(0.0, 0.5))
                    pipeline.kill(warehouse)
                    warehouse = pipeline.warehouse("--prefetch", "5")
                elif kill == "warehouse_at_carrier":
                    pipeline.wait_ready(warehouse)
                    slow = sandbox.requests()["faults"].get("slow", 0)
                    wait_for(
                        lambda s=slow: sandbox.requests()["faults"].get("slow", 0) > s,
                        timeout=120,
                        interval=0.02,
                        what="the warehouse waiting on a slow carrier",
                    )
                    pipeline.kill(warehouse)  # within the 2 s the carrier takes: its waybill is never saved
                    warehouse = pipeline.warehouse("--prefetch", "5")
                elif kill == "shopper":
                    assert any(shopper.kill_mid_redemption(rng.uniform(0.1, 1.0)) for _ in range(10)), (
                        "every shopper process had finished before it could be killed"
                    )
                elif kill == "cut_connection":
                    pipeline.wait_ready(warehouse)  # a freshly started one has no connection yet
                    assert close_connections(connection_name(warehouse)) == 1
                landed.append(kill)
            assert sorted(set(landed)) == sorted(set(KILLS)), (
                f"kills that never landed: {set(KILLS) - set(landed)}"
            )
            shopper.stop.set()
            shopper.thread.join(timeout=180)
            assert not shopper.thread.is_alive(), "the shopper never finished its last redemption"
            assert shopper.error is None, shopper.error
            made = len(shopper.made)
            assert pipeline.scalar("SELECT count(*) FROM redemption") == made, (
                "a killed shopper counted twice"
            )
            pipeline.wait_all_confirmed(made, timeout=180)
            for worker in (relay, warehouse):
                assert pipeline.stop(worker)[0] == 0, pipeline.log(worker)
        finally:
            shopper.stop.set()
            pipeline.close()
            shopper.thread.join(timeout=150)
        check_shipped_exactly_once(pipeline, made)
        assert sum(parcel["create_calls"] for parcel in sandbox.shipments()) >= made
    check_invariants(db_url, book=catalog_book, shipped=True)
    print(f"{made} redemptions, kills landed: {landed}, shoppers killed: {shopper.killed}")


def connection_name(process: subprocess.Popen) -> str:
    """How the broker lists a warehouse's connection: its name ends with host:pid."""
    return f'{socket.gethostname()[:32]}:{process.pid}"'


def mute_until_published_unsent(pipeline: Pipeline, relay: subprocess.Popen, proxy: FaultyProxy) -> None:
    """Mute the relay's broker connection (its publisher confirms and confirmations stop
    arriving) until a message it published for the first time is at the warehouse while it is
    still pending: muted, the relay can mark nothing sent.

    The mute lands while a new message is waiting; even so the relay may have only republishes of
    ``sent`` messages in flight, and it waits for their confirms (CREDEX_AMQP_PUBLISH_TIMEOUT, 4 s
    here) before it claims again, then reconnects unmuted. So: up to three mutes, each on the
    connection it has then."""
    pipeline.wait_ready(relay)
    for _attempt in range(3):
        wait_for(lambda: never_published(pipeline), timeout=60, what="a new message waiting")
        connections = pipeline.log(relay).count(" connected to ")
        swallowed = proxy.swallowed
        proxy.mute_answers()
        try:
            wait_for(
                lambda s=swallowed: proxy.swallowed > s and published_unsent(pipeline),
                timeout=20,
                what="a message published and not yet marked sent",
            )
            return
        except AssertionError:
            assert relay.poll() is None, pipeline.log(relay)
        wait_for(
            lambda c=connections: pipeline.log(relay).count(" connected to ") > c,
            timeout=60,
            what="the relay reconnected, unmuted",
        )
    raise AssertionError("three mutes and never a first publish unrecorded at the warehouse")


def never_published(pipeline: Pipeline) -> bool:
    return bool(
        pipeline.scalar("SELECT count(*) FROM outbox_message WHERE state = 'pending' AND attempts = 0")
    )


def published_unsent(pipeline: Pipeline) -> set[str]:
    """Messages the warehouse has seen (a shipment request exists) that are still pending."""
    from sqlalchemy import text

    from credex.db.engine import get_engine

    with get_engine(pipeline.db_url).connect() as connection:
        rows = connection.execute(
            text(
                "SELECT m.id FROM outbox_message m JOIN shipment_request s "
                "ON s.redemption_id = m.redemption_id WHERE m.state = 'pending'"
            )
        )
        return {row.id for row in rows}


# --- the writers, killed inside a transaction ------------------------------------------------------

EXPIRY_USERS = [f"u-{n:02d}" for n in range(24)]


def kill_inside_a_transaction(db_url: str, backend: str, command: list[str], blocker: str, rng) -> None:
    """Run ``credex COMMAND`` and SIGKILL it mid-work. Postgres: once it waits for the row lock of
    ``blocker``'s account, which the test holds (so earlier accounts or batches are committed, and
    the one in hand is half written). SQLite: at a random moment of its run."""
    env = subprocess_env(CREDEX_DATABASE_URL=db_url)
    if backend == "postgres":
        with holding_accounts(db_url, blocker):
            process = subprocess.Popen(
                credex_command(*command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            try:
                wait_for(
                    lambda: lock_waiters(db_url) >= 1, timeout=60, what="the writer to wait for the lock"
                )
                process.send_signal(signal.SIGKILL)
                process.communicate(timeout=30)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate(timeout=30)
        assert process.returncode == -signal.SIGKILL
        return
    for delay in sorted(rng.uniform(0.3, 2.5) for _ in range(3)):
        process = subprocess.Popen(
            credex_command(*command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
        print(f"killed {' '.join(command[:2])} {delay:.2f} s after it started (exit {process.returncode})")


def count(db_url: str, sql: str) -> int:
    from sqlalchemy import text

    from credex.db.engine import get_engine

    with get_engine(db_url).connect() as connection:
        return connection.execute(text(sql)).scalar()


@pytest.mark.timeout(300)
def test_a_redemption_killed_inside_its_transaction_leaves_nothing_and_its_request_id_counts_once(
    db_url, backend, credex, rng, catalog_book
):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", PRICE, "--stock", 5)
    credex("award", "grant", "u1", 100, "--reason", "opening", "--ref", "open-u1")
    command = [
        "redeem",
        "create",
        "u1",
        "MUG",
        "--quantity",
        "2",
        "--address",
        "1 High St",
        "--request-id",
        "r-1",
    ]
    kill_inside_a_transaction(db_url, backend, command, "u1", rng)
    check_invariants(db_url, book=catalog_book)
    if backend == "postgres":  # it was killed before its commit, for sure
        assert count(db_url, "SELECT count(*) FROM redemption") == 0
        assert credex("account", "show", "u1", "--json").json()["balance"] == 100
    first = run_process(*command, "--json", env=subprocess_env(CREDEX_DATABASE_URL=db_url))
    again = run_process(*command, "--json", env=subprocess_env(CREDEX_DATABASE_URL=db_url))
    assert first.exit_code == again.exit_code == 0, first.stderr + again.stderr
    assert again.json()["redemption_id"] == first.json()["redemption_id"] and again.json()["duplicate"]
    assert count(db_url, "SELECT count(*) FROM redemption") == 1
    assert credex("account", "show", "u1", "--json").json()["balance"] == 100 - 2 * PRICE
    assert credex("catalog", "list", "--json").json()[0]["stock"] == 3


@pytest.mark.timeout(300)
def test_a_cancel_killed_inside_its_refund_and_run_again_refunds_once(
    db_url, backend, credex, rng, catalog_book
):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", PRICE, "--stock", 5)
    credex("award", "grant", "u1", 100, "--reason", "opening", "--ref", "open-u1")
    made = credex("redeem", "create", "u1", "MUG", "--quantity", "2", "--address", "1 High St", "--json")
    redemption_id = made.json()["redemption_id"]
    # Never published: the cancel withdraws the message and refunds in one transaction (the
    # shopper's account row locked for the refund: on Postgres the test holds it meanwhile).
    command = ["redeem", "cancel", str(redemption_id), "--reason", "changed mind"]
    kill_inside_a_transaction(db_url, backend, command, "u1", rng)
    check_invariants(db_url, book=catalog_book)
    if backend == "postgres":  # killed before its commit, for sure: nothing of it is left
        shown = credex("redeem", "show", redemption_id, "--json").json()
        assert shown["status"] == "pending"
        assert credex("account", "show", "u1", "--json").json()["balance"] == 100 - 2 * PRICE
    env = subprocess_env(CREDEX_DATABASE_URL=db_url)
    first = run_process(*command, "--json", env=env)
    again = run_process(*command, "--json", env=env)
    assert first.exit_code == again.exit_code == 0, first.stderr + again.stderr
    assert again.json()["status"] == "cancelled" and again.json()["duplicate"] is True
    assert count(db_url, "SELECT count(*) FROM ledger_entry WHERE kind = 'redemption_refund'") == 1
    assert credex("account", "show", "u1", "--json").json()["balance"] == 100
    assert credex("catalog", "list", "--json").json()[0]["stock"] == 5
    assert count(db_url, "SELECT count(*) FROM outbox_message WHERE state = 'cancelled'") == 1


@pytest.mark.timeout(300)
def test_a_bulk_run_killed_inside_a_batch_and_run_again_applies_every_row_once(
    db_url, backend, tmp_path, rng
):
    path = tmp_path / "campaign.csv"
    rows = [f"u-{n // 10:02d},{5 + n % 7},c-{n},row {n}\n" for n in range(400)]  # u-00 … u-39, in order
    path.write_text("user_id,points,ref,reason\n" + "".join(rows))
    env = subprocess_env(CREDEX_DATABASE_URL=db_url)
    assert run_process("award", "grant", "u-30", "1", "--reason", "there first", env=env).exit_code == 0
    command = ["award", "bulk", str(path), "--batch-size", "20", "--json"]
    kill_inside_a_transaction(db_url, backend, command, "u-30", rng)  # batches 1-15 never touch u-30
    if backend == "postgres":
        assert count(db_url, "SELECT count(*) FROM ledger_entry WHERE kind = 'grant'") == 1 + 300
    check_invariants(db_url)
    again = run_process(*command, env=env)
    assert again.exit_code == 0, again.stderr
    summary = again.json()
    assert summary["applied"] + summary["duplicates"] == 400 and summary["rejected"] == 0
    assert count(db_url, "SELECT count(*) FROM ledger_entry WHERE kind = 'grant'") == 1 + 400
    assert count(db_url, "SELECT sum(points) FROM ledger_entry WHERE kind = 'grant'") == 1 + sum(
        5 + n % 7 for n in range(400)
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("job", ["expire", "settle"])
def test_a_cron_job_killed_half_way_and_run_again_handles_every_lot_once(db_url, backend, credex, rng, job):
    # 24 shoppers with points that are due: lapsed (expire) or past their return window (settle).
    long_ago = datetime.now(UTC) - timedelta(days=400)
    setting = {"CREDEX_EXPIRY_DAYS": "365"} if job == "expire" else {"CREDEX_PENDING_DAYS": "14"}
    with freeze_time(long_ago, ignore=["_pytest"]):
        for n, user in enumerate(EXPIRY_USERS):
            award = credex("award", "purchase", user, "--order", f"o-{n}", "--amount", 10 + n, env=setting)
            assert award.exit_code == 0, award.stderr
    due = sum(10 + n for n in range(len(EXPIRY_USERS)))
    kill_inside_a_transaction(db_url, backend, ["award", job, "--json"], "u-12", rng)
    kind = "expiry" if job == "expire" else "settle"
    if backend == "postgres":  # u-00 … u-11 were done and committed; u-12 was in hand
        assert count(db_url, f"SELECT count(*) FROM ledger_entry WHERE kind = '{kind}'") == 12
    check_invariants(db_url)
    env = subprocess_env(CREDEX_DATABASE_URL=db_url)
    finished = run_process("award", job, "--json", env=env)
    assert finished.exit_code == 0, finished.stderr
    assert count(db_url, f"SELECT count(*) FROM ledger_entry WHERE kind = '{kind}'") == len(EXPIRY_USERS)
    moved = count(db_url, f"SELECT sum(abs(points)) FROM ledger_entry WHERE kind = '{kind}'")
    assert moved == due
    nothing_left = run_process("award", job, "--json", env=env)
    assert (nothing_left.json()["lots"], nothing_left.json()["points"]) == (0, 0)


# --- the same reference from several processes at once ---------------------------------------------

RACERS = 3


def race(db_url: str, backend: str, command: list[str], user: str) -> list[tuple[int, dict]]:
    """``credex COMMAND`` from RACERS processes at once: (exit code, JSON answer) of each. On
    Postgres all of them have looked the reference up (nothing yet) and wait on ``user``'s
    account lock before any commits, so all but one meet the unique index."""
    env = subprocess_env(CREDEX_DATABASE_URL=db_url)

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            credex_command(*command, "--json"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    processes: list[subprocess.Popen] = []
    try:
        if backend == "postgres":
            with holding_accounts(db_url, user):
                processes = [start() for _ in range(RACERS)]
                wait_for(lambda: lock_waiters(db_url) >= RACERS, timeout=90, what="every racer at the lock")
        else:
            processes = [start() for _ in range(RACERS)]
        outcomes = []
        for process in processes:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
            outcomes.append((process.returncode, json.loads(out)))
        return outcomes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("what", ["redeem", "grant", "refund"])  # a purchase takes the grant's path
def test_the_same_reference_from_several_processes_at_once_counts_once(db_url, backend, credex, what):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", PRICE, "--stock", 10)
    credex("award", "grant", "u1", 100, "--reason", "opening", "--ref", "open-u1")
    credex("award", "purchase", "u1", "--order", "o-1", "--amount", 50)
    command = {
        "redeem": ["redeem", "create", "u1", "MUG", "--address", "1 High St", "--request-id", "same"],
        "grant": ["award", "grant", "u1", "25", "--reason", "goodwill", "--ref", "same"],
        "purchase": ["award", "purchase", "u1", "--order", "same", "--amount", "25"],
        "refund": ["award", "refund", "u1", "--order", "o-1", "--refund", "same", "--amount", "20"],
    }[what]
    outcomes = race(db_url, backend, command, "u1")
    answers = [answer for _code, answer in outcomes]
    assert sorted(answer["duplicate"] for answer in answers) == [False] + [True] * (RACERS - 1)
    first = next(answer for answer in answers if not answer["duplicate"])
    key = "redemption_id" if what == "redeem" else "entry_id"
    assert {answer[key] for answer in answers} == {first[key]}
    balance = credex("account", "show", "u1", "--json").json()["balance"]
    assert balance == {"redeem": 140, "grant": 175, "purchase": 175, "refund": 130}[what]
    if what == "redeem":
        assert credex("catalog", "list", "--json").json()[0]["stock"] == 9
        assert len(credex("relay", "list", "--json").json()) == 1
