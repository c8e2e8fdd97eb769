"""One three-node RabbitMQ cluster (scripts/rabbitmq-cluster.sh) for a whole test run.

Starting the cluster costs about 80 s of CPU on a 2-core machine; pytest-xdist spreads the tests
that use it over its workers, and a cluster per worker used to start two or three of them. Now
the first test to need it starts it, every other test (whatever its worker) takes the one
running, one test at a time under an exclusive file lock (they kill and restart nodes), and the
cluster is stopped, its data removed, after the last of them; at the end of the run, failing that
(``stop_left_over``, called by the controlling process).

The run's id (``CREDEX_TEST_RUN_ID``, set by the controlling process before its workers start)
names the lock and the state file, so two runs on one machine never share a cluster.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import ROOT, file_lock

SCRIPT = ROOT / "scripts" / "rabbitmq-cluster.sh"
RUN_ID_VARIABLE = "CREDEX_TEST_RUN_ID"
LOCK_TIMEOUT_S = 900  # a cluster test waits for the one before it on another worker


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_bases() -> tuple[int, int]:
    """An AMQP port base and a distribution port base, each with three free ports in a row,
    below the kernel's ephemeral range so that no client socket takes them meanwhile."""
    for _ in range(200):
        amqp = random.randrange(15000, 19990)
        dist = amqp + 10000
        if all(port_free(p) for base in (amqp, dist) for p in range(base, base + 3)):
            return amqp, dist
    raise RuntimeError("no three free ports in a row found")


@dataclass
class Cluster:
    env: dict[str, str]
    urls: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def check(self, *args: str, timeout: float = 300) -> str:
        done = self.run(*args, timeout=timeout)
        command = " ".join(args)
        assert done.returncode == 0, f"rabbitmq-cluster.sh {command} exited {done.returncode}:\n{done.stderr}"
        return done.stdout

    def leader(self, queue: str) -> int | None:
        """The node leading ``queue`` (1-3) as the running nodes see it, or None just now."""
        done = self.run("leader", queue, timeout=60)
        return int(done.stdout) if done.returncode == 0 else None

    def connect(self, node: int):
        import pika

        return pika.BlockingConnection(
            pika.URLParameters(self.urls[node - 1] + "?connection_attempts=3&retry_delay=1&socket_timeout=10")
        )

    def stop(self) -> None:
        """Stop every node and remove the cluster's directory; fails the test when it cannot."""
        stopped = self.run("stop")
        assert stopped.returncode == 0, stopped.stderr
        assert not Path(self.env["CREDEX_CLUSTER_DIR"]).exists(), "the cluster's data was left behind"


def start_cluster() -> Cluster:
    """Three nodes with a directory, node names and free ports of their own, so that they meet
    neither the default node nor a cluster someone started with the script's defaults."""
    amqp_port, dist_port = free_port_bases()
    env = {name: value for name, value in os.environ.items() if not name.startswith("CREDEX_")}
    env.update(
        CREDEX_CLUSTER_DIR=f"/tmp/credex-cluster-test-{uuid.uuid4().hex[:8]}",
        CREDEX_CLUSTER_PREFIX=f"credex-t{os.getpid()}-",
        CREDEX_CLUSTER_AMQP_PORT=str(amqp_port),
        CREDEX_CLUSTER_DIST_PORT=str(dist_port),
        CREDEX_CLUSTER_TIMEOUT="150",
    )
    cluster = Cluster(env)
    started = time.monotonic()
    try:
        done = cluster.run("start")
    except subprocess.TimeoutExpired as error:
        cluster.run("stop")
        pytest.fail(f"scripts/rabbitmq-cluster.sh start did not finish: {error}", pytrace=False)
    if done.returncode != 0:
        cluster.run("stop")  # leave no node behind
        failure = f"scripts/rabbitmq-cluster.sh start exited {done.returncode}:\n{done.stderr[-4000:]}"
        pytest.fail(failure, pytrace=False)
    cluster.timings["start"] = time.monotonic() - started
    cluster.urls = done.stdout.strip().split(",")
    assert [url.rsplit(":", 1)[1] for url in cluster.urls] == [f"{amqp_port + i}/%2F" for i in range(3)]
    return cluster


_run_id: str | None = None


def set_run_id() -> str:
    """Called by pytest_configure in every process of the run: the controlling process makes the
    id, its workers (started later, with its environment) find it. Kept here too, because each
    test starts with the CREDEX_ variables cleared from the environment."""
    global _run_id
    _run_id = os.environ.setdefault(RUN_ID_VARIABLE, uuid.uuid4().hex[:12])
    return _run_id


def run_id() -> str:
    return _run_id or set_run_id()


def _paths(run: str) -> tuple[Path, Path]:
    base = Path(tempfile.gettempdir()) / f"credex-tests-cluster-{run}"
    return base.with_suffix(".lock"), base.with_suffix(".json")


@contextmanager
def shared_cluster(users: int, run: str) -> Iterator[Cluster]:
    """The run's cluster for one test, started by the first of the run's ``users`` tests and
    stopped after the last; no other test uses it meanwhile."""
    lock, state_file = _paths(run)
    with file_lock(lock, exclusive=True, timeout=LOCK_TIMEOUT_S):
        state = json.loads(state_file.read_text()) if state_file.exists() else {"done": 0}
        if "env" in state:
            cluster = Cluster(state["env"], state["urls"])
        else:
            cluster = start_cluster()  # its timings say how long the start took
            state.update(env=cluster.env, urls=cluster.urls)
            state_file.write_text(json.dumps(state))
        try:
            yield cluster
        finally:
            print("cluster timings (s):", {name: round(value, 1) for name, value in cluster.timings.items()})
            state["done"] += 1
            if state["done"] >= users:
                state_file.unlink()
                cluster.stop()
            else:
                state_file.write_text(json.dumps(state))


def stop_left_over(run: str) -> str | None:
    """Stop the run's cluster if a test that should have stopped it never ran to its end (a
    worker that died, an interrupted run); what went wrong, or None."""
    lock, state_file = _paths(run)
    try:
        with file_lock(lock, exclusive=True, timeout=LOCK_TIMEOUT_S):
            if state_file.exists():
                state = json.loads(state_file.read_text())
                state_file.unlink()
                if "env" in state:
                    Cluster(state["env"], state["urls"]).stop()
    except (AssertionError, OSError, subprocess.SubprocessError) as error:
        return f"stopping the test cluster: {error}"
    finally:
        lock.unlink(missing_ok=True)
    return None
