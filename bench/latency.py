"""How long a redemption takes from `redeem create`'s commit to `shipping`, with one relay, one
warehouse and the sandbox carrier running as processes at their default options, and what the
two workers cost while idle. In one run, for each backend:

1. idle: the CPU the relay and the warehouse spend over --idle seconds with nothing to do (from
   /proc: user + system time, as a share of one core);
2. one at a time: --one redemptions, each written after the one before is `shipping`, with a
   random pause of 20-100 ms between them (a relay long idle is the common case); latency from the
   moment the commit returned to the moment a reader sees `shipping` (looked up every millisecond);
3. under load: --rate redemptions/s for --seconds, written by --writers processes on a fixed
   schedule (open loop: a slow pipeline does not slow the writers); latency from each commit to
   the relay recording the warehouse's confirmation (the redemption's updated_at), and whether
   anything is left unconfirmed --drain seconds after the last write.

    python bench/latency.py                       # both backends
    python bench/latency.py --backend postgres --rate 300 --seconds 30

Goals (issue #10): Postgres p50 <= 30 ms and p99 <= 150 ms one at a time, SQLite p50 <= 60 ms;
Postgres under 300/s for 30 s p99 <= 500 ms with nothing left behind; each idle worker <= 1 % of
one core. On a shared machine run it several times and quote medians.

Postgres's autovacuum matters under load: every redemption leaves several dead row versions in
outbox_message, redemption and shipment_request, and where nothing vacuums them the pipeline's
statements slow down as they pile up (on a 2-core machine at 300/s, latency grew from ~150 ms to
~2 s within 60 s with autovacuum off, and stayed flat with a VACUUM of those tables every 5 s).
The server's setting is printed with the figures; --timeline shows each second's latencies.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from databases import drop_database, fresh_database  # noqa: E402

AMQP_URL = os.environ.get("CREDEX_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
GIFT = "GIFT"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(share: float) -> float:
        return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]

    return {"n": len(ordered), "p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": ordered[-1]}


def show(values: dict[str, float]) -> str:
    return (
        f"p50 {values['p50'] * 1000:.1f} ms, p95 {values['p95'] * 1000:.1f} ms, "
        f"p99 {values['p99'] * 1000:.1f} ms, max {values['max'] * 1000:.1f} ms (n={values['n']})"
    )


class Workers:
    """The sandbox carrier, one relay and one warehouse as processes, at their default options."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.url = url
        self.prefix = f"bench{uuid.uuid4().hex[:8]}."
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CREDEX_")}
        self.env.update(
            PYTHONPATH=str(ROOT),
            CREDEX_DATABASE_URL=url,
            CREDEX_AMQP_URL=AMQP_URL,
            CREDEX_AMQP_PREFIX=self.prefix,
            CREDEX_OPERATOR="bench",
        )
        self.logs = {name: workdir / f"{self.prefix}{name}.log" for name in ("relay", "warehouse")}
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        sandbox = subprocess.Popen(
            [sys.executable, "-m", "credex", "logistics", "sandbox", "--port", "0"],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.processes["sandbox"] = sandbox
        self.env["CREDEX_LOGISTICS_URL"] = sandbox.stdout.readline().split()[-1]
        for name in ("relay", "warehouse"):
            with open(self.logs[name], "w") as log:
                self.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "credex", name, "run"],
                    env=self.env,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
        ready = {"relay": ("listening for due messages", "for commits"), "warehouse": (" connected to ",)}
        deadline = time.monotonic() + 60
        while not all(any(s in self.logs[n].read_text() for s in says) for n, says in ready.items()):
            if time.monotonic() > deadline:
                logs = ", ".join(map(str, self.logs.values()))
                raise RuntimeError(f"the workers did not start: see {logs}")
            time.sleep(0.02)

    def cpu(self, names: tuple[str, ...] = ("relay", "warehouse")) -> dict[str, float]:
        return {name: cpu_seconds(self.processes[name].pid) for name in names}

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        for queue in ("credex.warehouse.redemptions", "credex.relay.confirmations"):
            channel.queue_delete(self.prefix + queue)
        channel.exchange_delete(self.prefix + "credex")
        connection.close()


def set_up_shop(url: str, users: list[str]) -> None:
    from credex.db.engine import dispose_engines, session_for
    from credex.points.awards import award_grant
    from credex.points.catalog import add_item

    with session_for(url, write=True) as session:
        add_item(session, GIFT, name="Gift", points=1, stock=None)
        for user in users:
            award_grant(session, user, 10**12, reason="bench", ref=user, operator="bench")
    dispose_engines()


def idle_cpu(workers: Workers, seconds: float) -> dict[str, float]:
    """Each worker's CPU over ``seconds`` of nothing to do, as a share of one core."""
    time.sleep(1.0)  # let start-up settle
    before, started = workers.cpu(), time.monotonic()
    time.sleep(seconds)
    after, elapsed = workers.cpu(), time.monotonic() - started
    return {name: (after[name] - before[name]) / elapsed for name in before}


def one_at_a_time(url: str, count: int, rng: random.Random) -> list[float]:
    from sqlalchemy import text

    from credex.db.engine import get_engine, session_for
    from credex.points.redemptions import redeem

    looked_up = text("SELECT status FROM redemption WHERE id = :id")
    engine = get_engine(url)
    latencies = []
    with session_for(url, write=True) as session, engine.connect() as reader:
        for n in range(count):
            time.sleep(rng.uniform(0.02, 0.1))
            created = redeem(session, "u-bench-0", GIFT, address=f"{n} Bench Road", operator="bench")
            committed = time.perf_counter()
            deadline = committed + 60
            while True:
                status = reader.execute(looked_up, {"id": created["redemption_id"]}).scalar()
                reader.rollback()  # a fresh snapshot for the next look
                if status == "shipping":
                    latencies.append(time.perf_counter() - committed)
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"redemption {created['redemption_id']} not shipping after 60 s")
                time.sleep(0.001)
    return latencies


def steady_writer(url: str, user: str, rate: float, seconds: float, start, results) -> None:
    """One shop front writing on a fixed schedule; sends (redemption id, commit time) pairs."""
    from credex.db.engine import session_for
    from credex.points.redemptions import redeem

    written = []
    with session_for(url, write=True) as session:
        session.connection()
        session.commit()
        start.wait()
        began = time.monotonic()
        n = 0
        while n < rate * seconds:
            due = began + n / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            created = redeem(session, user, GIFT, address=f"{n} Bench Road", operator="bench")
            written.append((created["redemption_id"], datetime.now(UTC).timestamp()))
            n += 1
    results.put(written)


def under_load(
    workers: Workers, users: list[str], rate: float, seconds: float, drain: float, timeline: bool = False
) -> dict:
    import multiprocessing as mp

    from sqlalchemy import text

    from credex.db.engine import get_engine
    from credex.db.models import UTCDateTime

    url = workers.url
    context = mp.get_context("spawn")
    start = context.Barrier(len(users) + 1)
    results = context.Queue()
    writers = [
        context.Process(target=steady_writer, args=(url, user, rate / len(users), seconds, start, results))
        for user in users
    ]
    for process in writers:
        process.start()
    start.wait(timeout=300)
    began = time.monotonic()
    cpu_before = workers.cpu(("relay", "warehouse", "sandbox"))
    written: list[tuple[int, float]] = []
    for _ in writers:
        written += results.get(timeout=seconds + 600)
    for process in writers:
        process.join()
    wrote_for = time.monotonic() - began
    engine = get_engine(url)
    unconfirmed = "SELECT count(*) FROM outbox_message WHERE state <> 'confirmed'"
    deadline = time.monotonic() + drain
    while True:
        with engine.connect() as connection:
            left = connection.execute(text(unconfirmed)).scalar()
        if left == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    cpu_after = workers.cpu(("relay", "warehouse", "sandbox"))
    parse = UTCDateTime().process_result_value
    with engine.connect() as connection:
        rows = dict(
            connection.execute(text("SELECT id, updated_at FROM redemption WHERE status = 'shipping'")).all()
        )
    latencies = []
    by_second: dict[int, list[float]] = {}  # second of the load -> latencies of what was written in it
    first = min((committed for _, committed in written), default=0.0)
    for redemption_id, committed in written:
        shipped = rows.get(redemption_id)
        if shipped is not None:
            shipped = parse(datetime.fromisoformat(shipped) if isinstance(shipped, str) else shipped, None)
            latencies.append(max(0.0, shipped.timestamp() - committed))
            by_second.setdefault(int(committed - first), []).append(latencies[-1])
    if timeline:
        for second, values in sorted(by_second.items()):
            print(
                f"  second {second:3d}: {len(values):4d} written, max {max(values) * 1000:8.1f} ms, "
                f"median {sorted(values)[len(values) // 2] * 1000:8.1f} ms",
                flush=True,
            )
    return {
        "written": len(written),
        "rate": len(written) / wrote_for,
        "left": left,
        "not_shipping": len(written) - len(latencies),
        "cpu_us": {
            name: (cpu_after[name] - cpu_before[name]) * 1e6 / max(1, len(written)) for name in cpu_after
        },
        **percentiles(latencies),
    }


def server_setting(url: str, name: str) -> str:
    from sqlalchemy import text

    from credex.db.engine import get_engine

    with get_engine(url).connect() as connection:
        return connection.execute(text("SELECT current_setting(:name)"), {"name": name}).scalar()


def run_backend(backend: str, args, workdir: Path) -> dict:
    from credex.db.engine import dispose_engines

    url = fresh_database(backend, workdir)
    users = [f"u-bench-{n}" for n in range(max(1, args.writers))]
    workers = Workers(url, workdir)
    try:
        set_up_shop(url, users)
        if backend == "postgres":
            print(f"postgres: the server's autovacuum is {server_setting(url, 'autovacuum')}", flush=True)
        workers.start()
        figures: dict = {"idle": idle_cpu(workers, args.idle)}
        print(
            f"{backend}: idle over {args.idle:.0f} s: relay {figures['idle']['relay'] * 100:.2f} % of a "
            f"core, warehouse {figures['idle']['warehouse'] * 100:.2f} %",
            flush=True,
        )
        figures["one"] = percentiles(one_at_a_time(url, args.one, random.Random(args.seed)))
        print(f"{backend}: one at a time, commit -> shipping: {show(figures['one'])}", flush=True)
        if args.seconds > 0 and backend in args.load_on:
            load = under_load(workers, users, args.rate, args.seconds, args.drain, args.timeline)
            figures["load"] = load
            print(
                f"{backend}: {load['written']} written at {load['rate']:.0f}/s for {args.seconds:.0f} s, "
                f"commit -> confirmation recorded: {show(load)}; left unconfirmed after the drain: "
                f"{load['left']}, not shipping: {load['not_shipping']}; CPU per redemption: "
                + ", ".join(f"{name} {us:,.0f} us" for name, us in load["cpu_us"].items()),
                flush=True,
            )
        return figures
    finally:
        workers.stop()
        dispose_engines()
        drop_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measured")
    parser.add_argument("--one", type=int, default=200, help="redemptions one at a time")
    parser.add_argument("--rate", type=float, default=300.0, help="redemptions per second under load")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of load; 0: skip")
    parser.add_argument("--drain", type=float, default=120.0, help="seconds allowed to finish after the load")
    parser.add_argument("--writers", type=int, default=4, help="processes writing under load")
    parser.add_argument(
        "--load-on", default="postgres,sqlite", help="backends the load runs on (comma-separated)"
    )
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument(
        "--timeline", action="store_true", help="under load, print each second's latencies (by commit time)"
    )
    args = parser.parse_args()
    args.load_on = set(args.load_on.split(","))
    backends = ["postgres", "sqlite"] if args.backend == "both" else [args.backend]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            results[backend] = run_backend(backend, args, Path(tmp))
    print("summary:")
    for backend, figures in results.items():
        idle = figures["idle"]
        line = (
            f"  {backend}: one at a time p50 {figures['one']['p50'] * 1000:.1f} / p95 "
            f"{figures['one']['p95'] * 1000:.1f} / p99 {figures['one']['p99'] * 1000:.1f} ms; "
            f"idle relay {idle['relay'] * 100:.2f} %, warehouse {idle['warehouse'] * 100:.2f} %"
        )
        if "load" in figures:
            load = figures["load"]
            line += (
                f"; at {load['rate']:.0f}/s p50 {load['p50'] * 1000:.1f} / p95 {load['p95'] * 1000:.1f} / "
                f"p99 {load['p99'] * 1000:.1f} ms, left behind {load['left']}"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
