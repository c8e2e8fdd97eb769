"""The delivery pipeline as real processes: relays, warehouse consumers and a sandbox carrier,
started and stopped (or killed) by a test, and the checks that everything shipped exactly once."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from sqlalchemy import text
from typer.testing import CliRunner

from credex import cli
from credex.db.engine import get_engine
from tests.support import credex_command, subprocess_env, wait_for


class Pipeline:
    """Processes of one test; every one still running is killed at the end."""

    def __init__(self, db_url: str, rabbit, sandbox, logs: Path, warehouse_db_url: str | None = None) -> None:
        self.db_url = db_url
        self.warehouse_db_url = warehouse_db_url or db_url
        self.rabbit = rabbit
        self.sandbox = sandbox
        self.logs = logs
        self.processes: list[subprocess.Popen] = []
        extra = {"CREDEX_WAREHOUSE_DATABASE_URL": warehouse_db_url} if warehouse_db_url else {}
        self.env = subprocess_env(
            CREDEX_DATABASE_URL=db_url, CREDEX_LOGISTICS_URL=sandbox.url, **rabbit.env, **extra
        )

    def start(self, *command: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``credex COMMAND`` in the background; stderr goes to a log of its own, stdout is kept."""
        log = open(self.logs / f"{command[0]}-{len(self.processes)}.log", "w")  # noqa: SIM115
        process = subprocess.Popen(
            credex_command(*command),
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        process.log_path = log.name
        log.close()
        self.processes.append(process)
        return process

    def relay(self, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return self.start("relay", "run", "--json", "--poll-interval", "0.05", *options, env=env)

    def warehouse(self, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return self.start("warehouse", "run", "--json", *options, env=env)

    def run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            credex_command(*command), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def wait_ready(self, process: subprocess.Popen, timeout: float = 60) -> None:
        """Until the worker says it is connected (its signal handlers are in place by then)."""
        wait_for(lambda: " connected to " in self.log(process), timeout=timeout, what="the worker to connect")

    def stop(self, process: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
        """SIGTERM once the worker is running, then (exit code, stdout)."""
        if process.poll() is None:
            self.wait_ready(process)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=timeout)
        return process.returncode, out

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        """SIGKILL, and wait until it is gone (its connections closed with it)."""
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)

    def close(self) -> None:
        """Kill every process still running; a process that will not die is named, not waited on."""
        stuck = []
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                stuck.append(process.args)
            except ValueError:  # its pipes were read and closed already
                pass
        assert not stuck, f"processes that outlived SIGKILL: {stuck}"

    # --- what the databases say ---------------------------------------------------------------

    def unconfirmed(self) -> int:
        return self.scalar("SELECT count(*) FROM outbox_message WHERE state <> 'confirmed'")

    def scalar(self, sql: str, *, warehouse: bool = False):
        with get_engine(self.warehouse_db_url if warehouse else self.db_url).connect() as connection:
            return connection.execute(text(sql)).scalar()

    def confirmed(self) -> int:
        return self.scalar("SELECT count(*) FROM outbox_message WHERE state = 'confirmed'")

    def wait_all_confirmed(self, count: int, timeout: float = 120) -> None:
        wait_for(
            lambda: self.confirmed() == count, timeout=timeout, interval=0.1, what=f"{count} confirmations"
        )

    def log(self, process: subprocess.Popen) -> str:
        return Path(process.log_path).read_text()


def check_shipped_exactly_once(pipeline: Pipeline, redemptions: int) -> None:
    """Every message confirmed; one shipment request and one waybill per redemption, the
    redemption shows the waybill its shipment request holds, and `credex audit verify` agrees."""
    assert pipeline.scalar("SELECT count(*) FROM outbox_message WHERE state <> 'confirmed'") == 0
    assert pipeline.confirmed() == redemptions
    with get_engine(pipeline.db_url).connect() as connection:
        shipped = dict(
            connection.execute(text("SELECT id, express_no FROM redemption WHERE status = 'shipping'")).all()
        )
    assert len(shipped) == redemptions and None not in shipped.values()
    with get_engine(pipeline.warehouse_db_url).connect() as connection:
        requests = connection.execute(text("SELECT redemption_id, express_no FROM shipment_request")).all()
    assert len(requests) == redemptions, "a redemption has no shipment request, or two"
    assert dict(requests) == shipped, "a redemption shows another waybill than its shipment request"
    parcels = pipeline.sandbox.shipments()
    keys = [parcel["idempotency_key"] for parcel in parcels]
    assert len(keys) == len(set(keys)) == redemptions, (
        "the carrier issued more than one waybill for a redemption"
    )
    assert {parcel["tracking_number"] for parcel in parcels} == set(shipped.values())
    # What an operator would run afterwards; in this process (a command's start-up costs more CPU
    # than the check itself, and the suite runs this after every pipeline test).
    verified = CliRunner().invoke(
        cli.app, ["audit", "verify", "--json"], env=pipeline.env, catch_exceptions=False
    )
    assert verified.exit_code == 0, f"audit verify: {verified.stdout}{verified.stderr}"


def close_connections(needle: str) -> int:
    """Close, from the broker's side, the connections whose client-given name contains ``needle``."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    pids = [
        line.split("\t", 1)[0]
        for line in listed.splitlines()
        if '"connection_name"' in line and needle in line
    ]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "test: cut the connection"],
            capture_output=True,
            timeout=60,
        )
    return len(pids)
