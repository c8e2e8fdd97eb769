"""Messages per second from the outbox to broker-confirmed: credex's relay against bare pika
publishing the same bodies with pipelined publisher confirms, on the same broker, in one run.
Then the end-to-end rate with one relay and one warehouse process: redemptions written by
--writers processes (shop fronts, one shopper each) while the pipeline runs, from the first write
until every confirmation is recorded, with the CPU time each worker process spent per redemption
(from /proc: what it cost, whatever else a shared machine was doing).

    python bench/relay.py --backend sqlite
    python bench/relay.py --backend postgres --messages 20000 --runs 5

The relay side is one `credex relay run --once` pass in-process (connect, declare, claim, publish,
record) over a fresh outbox of --messages rows; it is done when every message is `sent`. The bare
side connects, declares the same topology and keeps --window publishes in flight until every
body is confirmed. The two alternate for --runs rounds, each on fresh queues; medians are
compared. Goal: credex at least 0.6 of the bare pika figure.

Each round and each end-to-end run also prints the CPU seconds it cost: this process (every
thread), RabbitMQ's and Postgres's processes (all of them, from /proc). On a machine whose cores
are all busy during a round, the rate ratio cannot beat the CPU ratio bare/credex; the end-to-end
runs print the rate the cores could give the pipeline at its CPU per redemption.

(Over 400 lines on purpose: a benchmark is one script to read and run, its two halves sharing
the broker and database set-up.)
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from databases import drop_database, fresh_database  # noqa: E402

AMQP_URL = os.environ.get("CREDEX_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


# --- databases ----------------------------------------------------------------------------------


def fill_outbox(url: str, count: int) -> list[bytes]:
    """``count`` pending outbox messages with the bodies redemptions write; returns the bodies."""
    from sqlalchemy import insert, text

    from credex.db.engine import session_for
    from credex.points.redemptions import message_body
    from credex.relay.outbox import outbox_table

    start = datetime.now(UTC) - timedelta(seconds=count / 1000)
    rows = []
    for n in range(count):
        now = start + timedelta(milliseconds=n)  # written one after another, as redemptions are
        message_id = str(uuid.uuid4())
        body = message_body(
            message_id=message_id,
            redemption_id=n + 1,
            user_id=f"u-{n % 1000}",
            sku="SHAMPOO-500",
            quantity=1,
            points=20000,
            address=f"{n} Long Road, Hangzhou",
            created_at=now,
        )
        rows.append(
            {
                "id": message_id,
                "redemption_id": None,
                "routing_key": "redemption.created",
                "body": body,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
        )
    with session_for(url, write=True) as session:
        session.execute(insert(outbox_table), rows)
        session.commit()
    if url.startswith("postgresql"):  # the statistics autovacuum keeps on a running system
        with session_for(url, write=True) as session:
            session.execute(text("ANALYZE outbox_message"))
            session.commit()
    return [row["body"].encode() for row in rows]


# --- the two sides ------------------------------------------------------------------------------


def run_credex(url: str, prefix: str, batch_size: int) -> float:
    from credex.relay.runner import RelayOptions, make_relay
    from credex.relay.topology import Names

    relay = make_relay(url, AMQP_URL, Names(prefix), RelayOptions(batch_size=batch_size, once=True))
    started = time.perf_counter()
    report = relay.run()
    elapsed = time.perf_counter() - started
    assert report.failed == 0, report
    return elapsed


def run_bare(bodies: list[bytes], prefix: str, window: int) -> float:
    """Bare pika: connect, declare, publish every body keeping ``window`` unconfirmed at most."""
    import pika
    from pika import spec

    names = {
        "exchange": f"{prefix}credex",
        "queue": f"{prefix}credex.warehouse.redemptions",
        "confirmations": f"{prefix}credex.relay.confirmations",
    }
    state = {"next": 0, "tag": 0, "unconfirmed": 0, "confirmed": 0, "failed": 0}
    started = time.perf_counter()

    def publish_more(channel) -> None:
        while state["next"] < len(bodies) and state["unconfirmed"] < window:
            body = bodies[state["next"]]
            channel.basic_publish(
                names["exchange"],
                "redemption.created",
                body,
                pika.BasicProperties(
                    message_id=str(state["next"]),
                    content_type="application/json",
                    delivery_mode=2,
                    type="redemption.created",
                    timestamp=int(time.time()),
                ),
                mandatory=True,
            )
            state["next"] += 1
            state["tag"] += 1
            state["unconfirmed"] += 1

    def on_confirm(frame) -> None:
        method = frame.method
        settled = state["unconfirmed"] - (state["tag"] - method.delivery_tag) if method.multiple else 1
        state["unconfirmed"] -= settled
        state["confirmed" if isinstance(method, spec.Basic.Ack) else "failed"] += settled
        if state["confirmed"] + state["failed"] == len(bodies):
            connection.close()
        else:
            publish_more(channel_box[0])

    channel_box: list = []

    def on_channel(channel) -> None:
        channel_box.append(channel)
        steps = [
            lambda done: channel.exchange_declare(names["exchange"], "topic", durable=True, callback=done),
            lambda done: channel.queue_declare(
                names["queue"], durable=True, arguments={"x-queue-type": "quorum"}, callback=done
            ),
            lambda done: channel.queue_bind(
                names["queue"], names["exchange"], "redemption.created", callback=done
            ),
            lambda done: channel.queue_declare(names["confirmations"], durable=True, callback=done),
            lambda done: channel.queue_bind(
                names["confirmations"], names["exchange"], "shipment.requested", callback=done
            ),
            lambda done: channel.confirm_delivery(on_confirm, callback=done),
        ]

        def step(index: int) -> None:
            if index == len(steps):
                publish_more(channel)
            else:
                steps[index](lambda _frame: step(index + 1))

        step(0)

    connection = pika.SelectConnection(
        pika.URLParameters(AMQP_URL),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, _reason: c.ioloop.stop(),
    )
    connection.ioloop.start()
    elapsed = time.perf_counter() - started
    assert state["confirmed"] == len(bodies), state
    return elapsed


def delete_queues(prefix: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    for queue in ("credex.warehouse.redemptions", "credex.relay.confirmations"):
        channel.queue_delete(prefix + queue)
    channel.exchange_delete(prefix + "credex")
    connection.close()


def services_cpu() -> dict[str, float]:
    """CPU seconds spent so far by this process (every thread), by the broker's processes and by
    the database server's (all of Postgres's: its backends, WAL writer, checkpointer). Each
    process counts with its children that ended (the postmaster with the backends of the
    connections closed meanwhile), so that a backend that goes away takes nothing with it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    spent = {"self": usage.ru_utime + usage.ru_stime, "rabbitmq": 0.0, "postgres": 0.0}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
            if name in ("beam.smp", "postgres"):
                spent["rabbitmq" if name == "beam.smp" else "postgres"] += cpu_seconds(
                    int(entry.name), children=True
                )
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return spent


def _spent_since(before: dict[str, float]) -> dict[str, float]:
    return {key: value - before[key] for key, value in services_cpu().items()}


def publish_rounds(args, workdir: Path) -> tuple[list[float], list[float], list[dict], list[dict]]:
    from credex.db.engine import session_for
    from credex.relay.operators import outbox_status

    credex_rates, bare_rates, credex_cpu, bare_cpu = [], [], [], []
    for round_no in range(args.runs):
        url = fresh_database(args.backend, workdir)
        try:
            bodies = fill_outbox(url, args.messages)
            prefix = f"bench{uuid.uuid4().hex[:8]}."
            try:
                before = services_cpu()
                elapsed = run_credex(url, prefix, args.batch_size)
                credex_cpu.append(_spent_since(before))
            finally:
                delete_queues(prefix)
            with session_for(url) as session:
                assert outbox_status(session)["sent"] == args.messages
            credex_rates.append(args.messages / elapsed)
            prefix = f"bench{uuid.uuid4().hex[:8]}."
            try:
                before = services_cpu()
                bare_rates.append(args.messages / run_bare(bodies, prefix, args.window))
                bare_cpu.append(_spent_since(before))
            finally:
                delete_queues(prefix)
        finally:
            drop_database(url)
        print(
            f"round {round_no + 1}: credex {credex_rates[-1]:,.0f} msg/s ({_cpu_text(credex_cpu[-1])}), "
            f"bare pika {bare_rates[-1]:,.0f} msg/s ({_cpu_text(bare_cpu[-1])})",
            flush=True,
        )
    return credex_rates, bare_rates, credex_cpu, bare_cpu


def _cpu_text(spent: dict[str, float]) -> str:
    total = sum(spent.values())
    return (
        f"CPU s: this process {spent['self']:.2f}, RabbitMQ {spent['rabbitmq']:.2f}, "
        f"Postgres {spent['postgres']:.2f}, total {total:.2f}"
    )


def _median_cpu(rounds: list[dict]) -> dict[str, float]:
    return {key: statistics.median(spent[key] for spent in rounds) for key in rounds[0]}


# --- end to end ---------------------------------------------------------------------------------


def writer(url: str, user: str, count: int, start) -> None:
    """One shop front: ``count`` redemptions for ``user``, one transaction each, as redeem create."""
    from credex.db.engine import session_for
    from credex.points.redemptions import redeem

    with session_for(url, write=True) as session:
        session.connection()  # connect and check the schema before the clock starts
        session.commit()
        start.wait()
        for _ in range(count):
            redeem(session, user, "GIFT", address="1 Bench Road", operator="bench")


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU time of a running process (Linux /proc): what it cost, whatever else the
    machine was doing meanwhile; with ``children``, also that of its children that ended."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def end_to_end(args, workdir: Path, *, backlog: bool) -> dict:
    """Live: redemptions written by --writers processes while one relay and one warehouse run, the
    clock running from the first write until every one is confirmed. Backlog: the same
    redemptions written first, the clock running from the moment both workers are connected: what
    the pipeline can do when the writers are not what limits it. Returns the run's figures."""
    import multiprocessing as mp

    from sqlalchemy import text

    from credex.db.engine import dispose_engines, get_engine, session_for
    from credex.points.awards import award_grant
    from credex.points.catalog import add_item

    url = fresh_database(args.backend, workdir)
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    processes: list[subprocess.Popen] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDEX_")}
    env.update(
        PYTHONPATH=str(ROOT),
        CREDEX_DATABASE_URL=url,
        CREDEX_AMQP_URL=AMQP_URL,
        CREDEX_AMQP_PREFIX=prefix,
        CREDEX_OPERATOR="bench",
    )
    total = args.end_to_end // args.writers * args.writers
    logs = {name: workdir / f"{prefix}{name}.log" for name in ("relay", "warehouse")}

    def start_workers() -> None:
        for name, command in (
            ("relay", ["relay", "run"]),  # default options: woken by commits
            ("warehouse", ["warehouse", "run"]),
        ):
            with open(logs[name], "w") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "credex", *command],
                        env=env,
                        cwd=ROOT,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                    )
                )
        deadline = time.monotonic() + 60
        while not all(" connected to " in path.read_text() for path in logs.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers did not connect: see {', '.join(map(str, logs.values()))}")
            time.sleep(0.02)

    try:
        sandbox = subprocess.Popen(
            [sys.executable, "-m", "credex", "logistics", "sandbox", "--port", "0"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        processes.append(sandbox)
        env["CREDEX_LOGISTICS_URL"] = sandbox.stdout.readline().split()[-1]
        users = [f"u-bench-{n}" for n in range(args.writers)]
        with session_for(url, write=True) as session:
            add_item(session, "GIFT", name="Gift", points=1, stock=None)
            for user in users:
                award_grant(session, user, 10**12, reason="bench", ref=user, operator="bench")
        dispose_engines()
        if not backlog:
            start_workers()
        context = mp.get_context("spawn")
        start = context.Barrier(args.writers + 1)  # passed once every writer has connected
        writers = [
            context.Process(target=writer, args=(url, user, total // args.writers, start)) for user in users
        ]
        for process in writers:
            process.start()
        start.wait(timeout=300)
        written_from = time.perf_counter()
        written: float | None = None  # seconds the writers took
        if backlog:
            for process in writers:
                process.join()
            written = time.perf_counter() - written_from
            start_workers()
        started = written_from if not backlog else time.perf_counter()
        before = {p.pid: cpu_seconds(p.pid) for p in processes}
        services_before = services_cpu()
        engine = get_engine(url)
        deadline = time.monotonic() + 600
        while True:
            if written is None and not any(process.is_alive() for process in writers):
                written = time.perf_counter() - written_from
            with engine.connect() as connection:
                confirmed = connection.execute(
                    text("SELECT count(*) FROM outbox_message WHERE state = 'confirmed'")
                ).scalar()
            if confirmed == total or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        names = ("sandbox", "relay", "warehouse")
        cpu = {name: cpu_seconds(p.pid) - before[p.pid] for name, p in zip(names, processes, strict=True)}
        services = _spent_since(services_before)
        cpu.update(rabbitmq=services["rabbitmq"], postgres=services["postgres"])
        for process in writers:
            process.join()
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT created_at, confirmed_at FROM outbox_message WHERE state = 'confirmed'")
            ).all()
        from credex.db.models import UTCDateTime

        parse = UTCDateTime().process_result_value
        latencies = sorted(
            (parse(_as_datetime(b), None) - parse(_as_datetime(a), None)).total_seconds() for a, b in rows
        )
        figures = {
            "rate": confirmed / elapsed,
            "written_rate": total / (written or elapsed),
            "p50": statistics.median(latencies),
            **{f"{name}_us": seconds * 1e6 / total for name, seconds in cpu.items()},
        }
        # The pipeline's CPU per redemption: the rate the machine's cores could give it if nothing
        # else ran and every process kept busy. Live, Postgres's share includes the writers'
        # transactions (and RabbitMQ's whatever else it serves): the backlog run is the clean one.
        figures["pipeline_us"] = sum(figures[f"{name}_us"] for name in cpu)
        figures["ceiling"] = os.cpu_count() * 1e6 / figures["pipeline_us"]
        mode = "backlog" if backlog else "live"
        print(
            f"end to end {mode} ({args.backend}, {args.writers} writers, 1 relay, 1 warehouse, sandbox "
            f"carrier): {confirmed} of {total} confirmed in {elapsed:.2f} s = {figures['rate']:,.0f} "
            f"redemptions/s (written at {figures['written_rate']:,.0f}/s); "
            f"latency p50 {figures['p50']:.3f} s; "
            f"CPU per redemption: relay {figures['relay_us']:,.0f} us, warehouse "
            f"{figures['warehouse_us']:,.0f} us, sandbox {figures['sandbox_us']:,.0f} us, RabbitMQ "
            f"{figures['rabbitmq_us']:,.0f} us, Postgres {figures['postgres_us']:,.0f} us; "
            f"{figures['pipeline_us']:,.0f} us in all: at most {figures['ceiling']:,.0f}/s on "
            f"{os.cpu_count()} cores",
            flush=True,
        )
        return figures
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        delete_queues(prefix)
        drop_database(url)


def _as_datetime(value):
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5, help="publishing rounds; 0: skip them")
    parser.add_argument("--batch-size", type=int, default=1000, help="the relay's --batch-size (its default)")
    parser.add_argument("--window", type=int, default=1000, help="bare pika's publishes in flight")
    parser.add_argument(
        "--end-to-end", type=int, default=4000, help="redemptions for each end-to-end run; 0: skip"
    )
    parser.add_argument("--writers", type=int, default=4, help="processes writing redemptions end to end")
    parser.add_argument(
        "--e2e-runs", type=int, default=3, help="end-to-end runs (medians are printed); 0: skip them"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.runs:
            credex_rates, bare_rates, credex_cpu, bare_cpu = publish_rounds(args, Path(tmp))
            credex_median, bare_median = statistics.median(credex_rates), statistics.median(bare_rates)
            print(
                f"outbox -> broker-confirmed, {args.backend}, {args.messages:,} messages, median of "
                f"{args.runs}: credex {credex_median:,.0f} msg/s, bare pika {bare_median:,.0f} msg/s, "
                f"ratio {credex_median / bare_median:.2f} (goal >= 0.6)"
            )
            credex_spent, bare_spent = _median_cpu(credex_cpu), _median_cpu(bare_cpu)
            print(f"  credex, median {_cpu_text(credex_spent)}")
            print(f"  bare,   median {_cpu_text(bare_spent)}")
            print(
                f"  CPU ratio bare/credex {sum(bare_spent.values()) / sum(credex_spent.values()):.2f} on "
                f"{os.cpu_count()} cores: where every side keeps the cores busy, the rate ratio is that"
            )
        if args.end_to_end and args.e2e_runs:
            for backlog in (False, True):
                runs = [end_to_end(args, Path(tmp), backlog=backlog) for _ in range(args.e2e_runs)]
                median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                print(
                    f"end to end {'backlog' if backlog else 'live'}, {args.backend}, median of "
                    f"{args.e2e_runs}: {median['rate']:,.0f} redemptions/s (written at "
                    f"{median['written_rate']:,.0f}/s), latency p50 {median['p50']:.3f} s; CPU per "
                    f"redemption: relay {median['relay_us']:,.0f} us, warehouse "
                    f"{median['warehouse_us']:,.0f} us, sandbox {median['sandbox_us']:,.0f} us, RabbitMQ "
                    f"{median['rabbitmq_us']:,.0f} us, Postgres {median['postgres_us']:,.0f} us; at most "
                    f"{median['ceiling']:,.0f}/s on {os.cpu_count()} cores (goal >= 1,000/s on Postgres)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
