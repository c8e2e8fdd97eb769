"""Watching the workers (cli.md): a running relay and warehouse serve Prometheus metrics over real
HTTP, counting what they did, and with --log-format json every line they write on stderr is one
JSON object."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.pipeline import Pipeline, check_shipped_exactly_once
from tests.sandbox import running_sandbox
from tests.support import CI, wait_for

pytestmark = [pytest.mark.rabbitmq]

REDEMPTIONS = 3


@pytest.fixture
def pipeline(db_url, rabbit, tmp_path):
    with running_sandbox() as sandbox:
        pipeline = Pipeline(db_url, rabbit, sandbox, tmp_path)
        yield pipeline
        pipeline.close()


def json_lines(pipeline: Pipeline, process) -> list[dict]:
    """Every line the worker wrote on stderr, each parsed as one JSON object (or the test fails)."""
    records = []
    for number, line in enumerate(pipeline.log(process).splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"stderr line {number} is not JSON: {line!r}")
        assert isinstance(record, dict) and {"ts", "level", "event"} <= record.keys(), line
        records.append(record)
    return records


def metrics_url(pipeline: Pipeline, process) -> str:
    def served():
        return next((r["url"] for r in json_lines(pipeline, process) if "url" in r), None)

    return wait_for(served, timeout=60, what="the metrics URL in the log")


def scrape(url: str) -> tuple[str, dict[str, dict[tuple, float]]]:
    """The page, and its samples by name, then by their labels."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return response.text, samples


def one(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def promtool_accepts(page: str) -> None:
    """``promtool check metrics`` on the page, where promtool is installed (always on CI)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        assert not CI, "CI=true needs promtool (.ci/run installs the prometheus package)"
        return
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=page, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_running_workers_serve_their_counts_and_log_json(credex, pipeline):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "10")
    credex("award", "grant", "u1", "1000", "--reason", "opening", "--ref", "open-u1")
    watched = ("--metrics-port", "0", "--log-format", "json")
    relay, warehouse = pipeline.relay(*watched), pipeline.warehouse(*watched)
    relay_url, warehouse_url = metrics_url(pipeline, relay), metrics_url(pipeline, warehouse)
    assert relay_url.startswith("http://127.0.0.1:") and relay_url.endswith("/metrics")

    for n in range(REDEMPTIONS):
        assert credex("redeem", "create", "u1", "MUG", "--address", f"{n} High St").exit_code == 0
    pipeline.wait_all_confirmed(REDEMPTIONS)

    def relay_counted():  # the counters move after the commit that wait_all_confirmed saw
        page, samples = scrape(relay_url)
        return (page, samples) if one(samples, "credex_relay_confirmed_total") == REDEMPTIONS else None

    page, relay_samples = wait_for(relay_counted, timeout=30, what="the relay's counters")
    promtool_accepts(page)
    assert one(relay_samples, "credex_relay_published_total") == REDEMPTIONS
    assert one(relay_samples, "credex_relay_dead_total") == 0
    assert one(relay_samples, "credex_relay_publish_failures_total", reason="unroutable") == 0
    assert one(relay_samples, "credex_redemption_confirm_seconds_count") == REDEMPTIONS
    assert 0 < one(relay_samples, "credex_redemption_confirm_seconds_sum") < 60 * REDEMPTIONS
    assert one(relay_samples, "credex_redemption_confirm_seconds_bucket", le="+Inf") == REDEMPTIONS
    assert one(relay_samples, "credex_outbox_messages", state="confirmed") == REDEMPTIONS
    assert one(relay_samples, "credex_outbox_messages", state="pending") == 0
    assert one(relay_samples, "credex_outbox_oldest_unconfirmed_age_seconds") == 0
    assert one(relay_samples, "process_cpu_seconds_total") > 0
    assert one(relay_samples, "process_resident_memory_bytes") > 0

    page, warehouse_samples = scrape(warehouse_url)
    promtool_accepts(page)
    assert one(warehouse_samples, "credex_warehouse_messages_total", outcome="confirmed") == REDEMPTIONS
    assert one(warehouse_samples, "credex_warehouse_messages_total", outcome="without_waybill") == 0
    assert (
        one(warehouse_samples, "credex_warehouse_carrier_seconds_count", call="create_shipment")
        == REDEMPTIONS
    )
    assert one(warehouse_samples, "credex_carrier_errors_total", kind="unavailable") == 0
    assert one(warehouse_samples, "process_open_fds") > 0

    (relay_exit, relay_out), (warehouse_exit, _) = pipeline.stop(relay), pipeline.stop(warehouse)
    assert (relay_exit, warehouse_exit) == (0, 0)
    assert json.loads(relay_out)["confirmed"] == REDEMPTIONS
    check_shipped_exactly_once(pipeline, REDEMPTIONS)

    # Every stderr line, up to the stop, is one JSON object; the ids ride along.
    relay_log, warehouse_log = json_lines(pipeline, relay), json_lines(pipeline, warehouse)
    assert any(r["event"].startswith("SIGTERM received") for r in relay_log)
    assert any("relay_id" in r for r in relay_log)
    waybills = [r for r in warehouse_log if "waybill" in r["event"] and "express_no" in r]
    assert len(waybills) == REDEMPTIONS and all(r["level"] == "info" for r in waybills)
    shipped = {s["redemption_id"] for s in credex("warehouse", "list", "--json").json()}
    assert {r["redemption_id"] for r in waybills} == shipped


def test_a_metrics_port_in_use_is_bad_usage_and_says_so(pipeline):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = pipeline.run("warehouse", "run", "--once", "--metrics-port", str(port))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: cannot serve metrics on 127.0.0.1:{port}")
