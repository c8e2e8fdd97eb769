"""credex warehouse: the consumer that turns redemption messages into shipments."""

from __future__ import annotations

from typing import Annotated

import typer

from credex import collect_for_a_long_run
from credex.commands._common import (
    JsonOption,
    LimitOption,
    LogFormat,
    LogFormatOption,
    MetricsHostOption,
    MetricsPortOption,
    finite,
    serve_metrics,
    settings,
    warehouse_session,
    whole,
)
from credex.output import emit

app = typer.Typer(help="The warehouse: shipment requests and waybills.", no_args_is_help=True)

LIST_COLUMNS = [
    "shipment_id",
    "type",
    "redemption_id",
    "sku",
    "quantity",
    "carrier",
    "express_no",
    "status",
    "created_at",
]


@app.command("run")
def run(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="Handle the messages waiting, then exit.")] = False,
    # 100, not 20: a message is in hand until its answer is confirmed, so 20 split a backlog into
    # batches of a few, each paying two transactions and its thread hand-overs (bench/relay.py,
    # Postgres from a backlog: 610-722 to 899-1,061 redemptions/s; latency one at a time and at
    # 300/s no worse). More comes back after a crash: every unacked message is handled again.
    prefetch: Annotated[
        int, typer.Option("--prefetch", parser=whole(1, 1000), help="Messages in hand at once.")
    ] = 100,
    carrier_timeout: Annotated[
        float,
        typer.Option(
            "--carrier-timeout",
            min=0.5,
            max=3600,
            callback=finite,
            help="Seconds one waybill request may take, retries included.",
        ),
    ] = 15.0,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = "127.0.0.1",
    log_format: LogFormatOption = LogFormat.text,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Consume redemption messages: create shipment requests (once per redemption), get waybills
    from the carrier, publish confirmations. Runs until SIGINT/SIGTERM, or once with --once."""
    from credex.amqp.params import quiet_pika
    from credex.logistics import carrier_client
    from credex.output import log_to_stderr
    from credex.relay.topology import Names
    from credex.warehouse.consumer import Warehouse, warehouse_broker
    from credex.worker import run_until_signalled

    s = settings(ctx)
    log_to_stderr(verbose, format=log_format.value)
    quiet_pika()
    warehouse = Warehouse(
        s.warehouse_database_url or s.database_url,
        warehouse_broker(
            s.amqp_url.get_secret_value(),
            Names.configured(s.amqp_prefix),
            prefetch=prefetch,
            publish_timeout=s.amqp_publish_timeout,
        ),
        lambda: carrier_client(s, total_timeout=carrier_timeout),
        once=once,
        carrier_timeout=carrier_timeout,
    )
    collect_for_a_long_run()
    server = serve_metrics(warehouse.metrics.registry, metrics_port, metrics_host)
    try:
        report = run_until_signalled(warehouse, as_json=as_json)
    finally:
        if server is not None:
            server.close()
    emit(report.to_json(), as_json=as_json, title="warehouse")


@app.command("list")
def list_(ctx: typer.Context, limit: LimitOption = 50, as_json: JsonOption = False) -> None:
    """Shipment requests, newest first, with their status (requested, requesting, waybill,
    cancelled, failed) and why a carrier said no."""
    from credex.warehouse.shipments import list_shipments

    with warehouse_session(ctx) as session:
        rows = list_shipments(session, limit=limit)
    emit(rows, as_json=as_json, columns=LIST_COLUMNS, title="shipment requests")
