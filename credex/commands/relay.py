"""credex relay: deliver outbox messages to the warehouse and watch them."""

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
    points_session,
    serve_metrics,
    settings,
    whole,
)
from credex.output import emit

app = typer.Typer(help="The relay: outbox to RabbitMQ, until the warehouse confirms.", no_args_is_help=True)

LIST_COLUMNS = [
    "message_id",
    "redemption_id",
    "routing_key",
    "state",
    "attempts",
    "next_attempt_at",
    "last_error",
]


@app.command("run")
def run(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="One full pass, then exit (for cron).")] = False,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", parser=whole(1, 10_000), help="Messages claimed and published at once."),
    ] = 1000,
    confirm_timeout: Annotated[
        float,
        typer.Option(
            "--confirm-timeout",
            min=0.1,
            max=7 * 86400,
            callback=finite,
            help="Seconds to wait for the warehouse before publishing again; doubles per attempt.",
        ),
    ] = 60.0,
    max_confirm_timeout: Annotated[
        float,
        typer.Option(
            "--max-confirm-timeout",
            min=0.1,
            max=7 * 86400,
            callback=finite,
            help="The cap on that wait, in seconds.",
        ),
    ] = 3600.0,
    max_attempts: Annotated[
        int,
        typer.Option(
            "--max-attempts",
            parser=whole(0, 2**31 - 1),
            help="Publishes before a message is dead; 0: forever.",
        ),
    ] = 0,
    lease: Annotated[
        float,
        typer.Option(
            "--lease",
            min=1.0,
            max=86400,
            callback=finite,
            help="SQLite: seconds a claim holds if this relay dies holding it (Postgres: a row lock).",
        ),
    ] = 60.0,
    poll_interval: Annotated[
        float,
        typer.Option(
            "--poll-interval",
            min=0.01,
            max=3600,
            callback=finite,
            help="Seconds between looks for due messages when nothing wakes the relay (the safety net: "
            "a commit wakes it at once, see README).",
        ),
    ] = 5.0,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = "127.0.0.1",
    log_format: LogFormatOption = LogFormat.text,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Publish due messages (publisher confirms), record the warehouse's confirmations, publish
    again what is not confirmed in time. Runs until SIGINT/SIGTERM, or one pass with --once."""
    from credex.amqp.params import quiet_pika
    from credex.output import log_to_stderr
    from credex.relay.outbox import RedeliveryPolicy
    from credex.relay.runner import RelayOptions, make_relay
    from credex.relay.topology import Names
    from credex.worker import run_until_signalled

    s = settings(ctx)
    log_to_stderr(verbose, format=log_format.value)
    quiet_pika()
    policy = RedeliveryPolicy(
        confirm_timeout=confirm_timeout,
        max_confirm_timeout=max(confirm_timeout, max_confirm_timeout),
        max_attempts=max_attempts,
    )
    options = RelayOptions(
        batch_size=batch_size,
        lease=lease,
        poll_interval=poll_interval,
        once=once,
        policy=policy,
        operator=s.operator,  # on the refunds the warehouse's cancel answers bring
    )
    names = Names.configured(s.amqp_prefix)
    relay = make_relay(
        s.database_url, s.amqp_url.get_secret_value(), names, options, publish_timeout=s.amqp_publish_timeout
    )
    collect_for_a_long_run()
    server = serve_metrics(relay.metrics.registry, metrics_port, metrics_host)
    try:
        report = run_until_signalled(relay, as_json=as_json)
    finally:
        if server is not None:
            server.close()
    emit(report.to_json(), as_json=as_json, title="relay")


@app.command("status")
def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Messages per state and the age of the oldest unconfirmed one."""
    from credex.relay.operators import outbox_status

    with points_session(ctx) as session:
        result = outbox_status(session)
    emit(result, as_json=as_json, title="outbox")


@app.command("list")
def list_(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option("--state", help="pending, sent, confirmed or dead.")] = None,
    limit: LimitOption = 50,
    as_json: JsonOption = False,
) -> None:
    """Outbox messages, newest first."""
    from credex.errors import InvalidInput, printable
    from credex.relay.operators import MESSAGE_STATES, list_messages

    if state is not None and state not in MESSAGE_STATES:
        raise InvalidInput(f"unknown state {printable(state)}: use one of {', '.join(MESSAGE_STATES)}")
    with points_session(ctx) as session:
        rows = list_messages(session, state=state, limit=limit)
    emit(rows, as_json=as_json, columns=LIST_COLUMNS, title="outbox messages")


@app.command("retry")
def retry(
    ctx: typer.Context,
    message_ids: Annotated[
        list[str] | None, typer.Argument(help="Outbox message ids.", show_default=False)
    ] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Every dead message.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Make messages due now (a dead one comes back as pending with fresh attempts)."""
    from credex.errors import InvalidInput
    from credex.points.rules import check_message_id
    from credex.relay.operators import retry_messages

    if bool(message_ids) == dead:
        raise InvalidInput("give message ids or --dead (one of the two)")
    message_ids = [check_message_id(message_id) for message_id in message_ids or ()]
    with points_session(ctx, write=True) as session:
        result = retry_messages(session, message_ids or (), dead=dead)
    if as_json:
        emit(result, as_json=True)
        return
    typer.echo(f"due now: {len(result['retried'])} message(s)")
    for message_id in result["already_confirmed"]:
        typer.echo(f"{message_id}: already confirmed, left alone")


@app.command("purge")
def purge(
    ctx: typer.Context,
    confirmed_before: Annotated[
        str, typer.Option("--confirmed-before", help="Age such as 30d, 12h or 2w.", show_default=False)
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count, delete nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete messages confirmed longer ago than the given age."""
    from credex.points.rules import parse_duration
    from credex.relay.operators import purge_confirmed

    age = parse_duration(confirmed_before, "--confirmed-before")
    with points_session(ctx, write=True) as session:
        result = purge_confirmed(session, older_than=age, dry_run=dry_run)
    if as_json:
        emit(result, as_json=True)
        return
    verb = "would delete" if dry_run else "deleted"
    when = result["confirmed_before"].isoformat(timespec="seconds")
    typer.echo(f"{verb} {result['purged']} message(s) confirmed before {when}")
