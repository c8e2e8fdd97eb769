"""What the workers tell Prometheus (cli.md "Watching the workers"), through the client library.

Each worker gets a registry of its own (tests run several in one process) holding its metrics and
the library's process metrics, served at ``/metrics`` by the library's HTTP server on a thread of
its own when ``--metrics-port`` is given. Counters are bumped where the work happens; the outbox
gauges are read from the database when Prometheus scrapes, so they are never stale and cost
nothing between scrapes.

Imported only by the workers: the client library is not free to import.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("credex.metrics")

prometheus_client.disable_created_metrics()  # a `_created` twin of every counter is noise here

# Seconds. From milliseconds (a woken relay) to minutes (a carrier that makes us publish again).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
CARRIER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)
# The labels each counter shows from the start (at 0).
PUBLISH_FAILURES = ("unroutable", "nacked", "timeout", "connection_lost")
WAREHOUSE_OUTCOMES = ("confirmed", "without_waybill", "confirmation_failed", "rejected")
CARRIER_ERRORS = ("unavailable", "rejected", "timeout")


def new_registry() -> CollectorRegistry:
    """A registry with the client library's process metrics (CPU, memory, open files, start time)."""
    registry = CollectorRegistry(auto_describe=True)
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.PlatformCollector(registry=registry)
    prometheus_client.GCCollector(registry=registry)
    return registry


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.published = Counter(
            "credex_relay_published", "Messages the broker confirmed (publisher confirms).", registry=registry
        )
        self.publish_failures = Counter(
            "credex_relay_publish_failures",
            "Publishes that failed: unroutable, nacked, connection lost, no confirm in time.",
            ["reason"],
            registry=registry,
        )
        self.confirmed = Counter(
            "credex_relay_confirmed", "Messages the warehouse answered, recorded.", registry=registry
        )
        for reason in PUBLISH_FAILURES:  # shown at 0 from the start: a rate needs a first sample
            self.publish_failures.labels(reason)
        self.dead = Counter(
            "credex_relay_dead", "Messages given up (--max-attempts, or refused for good).", registry=registry
        )
        self.confirm_seconds = Histogram(
            "credex_redemption_confirm_seconds",
            "From the outbox row being written to the warehouse's answer being recorded.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def watch_outbox(self, read_status: Callable[[], dict[str, Any]]) -> None:
        """Serve ``credex_outbox_messages{state}`` and the oldest unconfirmed age, read at scrape time."""
        self.registry.register(_OutboxCollector(read_status))


class WarehouseMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.messages = Counter(
            "credex_warehouse_messages",
            "Messages handled, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.carrier_seconds = Histogram(
            "credex_warehouse_carrier_seconds",
            "One call to the carrier, retries included.",
            ["call"],
            buckets=CARRIER_BUCKETS,
            registry=registry,
        )
        self.carrier_errors = Counter(
            "credex_carrier_errors",
            "Carrier calls that failed, by kind (unavailable: gave up retrying; rejected: refused for good).",
            ["kind"],
            registry=registry,
        )
        for outcome in WAREHOUSE_OUTCOMES:
            self.messages.labels(outcome)
        for kind in CARRIER_ERRORS:
            self.carrier_errors.labels(kind)


class _OutboxCollector:
    """The outbox's gauges, read from the database on each scrape. A database that cannot be read
    leaves them out of that scrape (Prometheus shows the gap) rather than failing the page."""

    def __init__(self, read_status: Callable[[], dict[str, Any]]) -> None:
        self._read = read_status
        self._lock = threading.Lock()  # one reading at a time, however many scrapers

    def describe(self):
        return []  # no description up front: nothing may touch the database at registration

    def collect(self):
        with self._lock:
            try:
                status = self._read()
            except Exception as error:  # noqa: BLE001 - a scrape must not fail for the database
                log.warning("metrics: the outbox could not be read: %s", error)
                return
        states = GaugeMetricFamily("credex_outbox_messages", "Outbox messages by state.", labels=["state"])
        for state in ("pending", "sent", "confirmed", "dead", "cancelled"):
            if state in status:
                states.add_metric([state], status[state])
        yield states
        oldest = status.get("oldest_unconfirmed_age_seconds")
        yield GaugeMetricFamily(
            "credex_outbox_oldest_unconfirmed_age_seconds",
            "How long the oldest unconfirmed message has waited (0 when none).",
            value=oldest or 0.0,
        )


class MetricsServer:
    """``/metrics`` served on a daemon thread by the client library's HTTP server."""

    def __init__(self, server, host: str) -> None:
        self._server = server
        shown = f"[{host}]" if ":" in host else host
        self.port: int = server.server_address[1]
        self.url = f"http://{shown}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(registry: CollectorRegistry, *, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``/metrics`` on a daemon thread (port 0: any free one, see ``.url``). A port that
    cannot be had is bad usage (exit 2)."""
    from credex.errors import InvalidInput

    try:
        server, _thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        raise InvalidInput(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
    return MetricsServer(server, host)
