"""credex's main job end to end, on this machine: award → redeem → relay → warehouse → carrier → track.

    python scripts/demo.py [--keep]

Uses a fresh SQLite database in a temporary directory, RabbitMQ at CREDEX_AMQP_URL (default
amqp://guest:guest@localhost:5672/%2F) under a prefix of its own, and the sandbox carrier on a
free port. Every step is a real `credex` command, printed with its output. Exits non-zero if any
step fails or a redemption is not confirmed within a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

CREDEX = [sys.executable, "-m", "credex"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", action="store_true", help="keep the database and print where it is")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="credex-demo-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDEX_") or k == "CREDEX_AMQP_URL"}
    env.update(
        CREDEX_DATABASE_URL=f"sqlite:///{workdir / 'credex.db'}",
        CREDEX_AMQP_PREFIX=f"demo-{uuid.uuid4().hex[:8]}.",
        CREDEX_OPERATOR="demo",
    )
    background: list[subprocess.Popen] = []
    try:
        sandbox = subprocess.Popen(
            [*CREDEX, "logistics", "sandbox", "--port", "0", "--stage-seconds", "2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        background.append(sandbox)
        first = sandbox.stdout.readline()
        if not first.startswith("listening on "):
            print("the sandbox carrier did not start", file=sys.stderr)
            return 1
        env["CREDEX_LOGISTICS_URL"] = first.split()[-1]
        print(f"# sandbox carrier at {env['CREDEX_LOGISTICS_URL']}, database in {workdir}\n")

        def credex(*command: str, show: bool = True) -> str:
            done = subprocess.run([*CREDEX, *command], env=env, capture_output=True, text=True, timeout=120)
            if show:
                print(f"$ credex {shlex.join(command)}")
                print(done.stdout.rstrip() or done.stderr.rstrip(), end="\n\n")
            if done.returncode != 0:
                raise SystemExit(
                    f"credex {shlex.join(command)} failed ({done.returncode}): {done.stderr.strip()}"
                )
            return done.stdout

        credex(
            "catalog", "add", "SHAMPOO-500", "--name", "Shampoo 500 ml", "--points", "20000", "--stock", "50"
        )
        credex("award", "purchase", "u-1001", "--order", "o-9001", "--amount", "15999.90")
        credex("award", "review", "u-1001", "--review", "r-77", "--photos")
        credex("award", "grant", "u-1001", "5000", "--reason", "birthday gift", "--ref", "bday-2026-u-1001")
        created = json.loads(
            credex(
                "redeem",
                "create",
                "u-1001",
                "SHAMPOO-500",
                "--address",
                "8 Long Road, Hangzhou",
                "--request-id",
                "web-5521",
                "--json",
            )
        )
        credex("relay", "status")

        print("# the relay and the warehouse start in the background\n")
        for command in (["relay", "run", "--poll-interval", "0.2"], ["warehouse", "run"]):
            background.append(
                subprocess.Popen(
                    [*CREDEX, *command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        deadline = time.monotonic() + 60
        while json.loads(credex("relay", "status", "--json", show=False))["confirmed"] < 1:
            if time.monotonic() > deadline:
                raise SystemExit("the redemption was not confirmed within a minute")
            time.sleep(0.2)

        redemption_id = str(created["redemption_id"])
        credex("relay", "status")
        credex("redeem", "show", redemption_id)
        credex("warehouse", "list")
        credex("track", redemption_id)
        time.sleep(4.5)  # the sandbox moves a parcel one stage every 2 s
        credex("track", redemption_id, "--json")
        credex("account", "history", "u-1001")
        print("the main job ran end to end: award → redeem → relay → warehouse → carrier → track")
        return 0
    finally:
        for process in reversed(background):
            process.send_signal(signal.SIGTERM)
        for process in background:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        _delete_topology(env)
        if args.keep:
            print(f"kept {workdir / 'credex.db'}")
        else:
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()


def _delete_topology(env: dict[str, str]) -> None:
    """The demo's exchange and queues go away with it."""
    import pika

    from credex.relay.topology import Names

    names = Names(env["CREDEX_AMQP_PREFIX"])
    try:
        connection = pika.BlockingConnection(
            pika.URLParameters(env.get("CREDEX_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F"))
        )
        channel = connection.channel()
        for queue in (names.warehouse_queue, names.confirmations_queue):
            channel.queue_delete(queue)
        channel.exchange_delete(names.exchange)
        connection.close()
    except Exception as error:  # the broker went away: nothing left to tidy
        print(f"could not remove the demo's queues: {type(error).__name__}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
