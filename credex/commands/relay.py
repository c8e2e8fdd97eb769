"""credex relay: deliver outbox messages to the warehouse and watch them."""

from __future__ import annotations

from typing import Annotated

import typer

from credex.commands._common import JsonOption, LimitOption, points_session
from credex.output import emit

app = typer.Typer(help="The relay: outbox to RabbitMQ, until the warehouse confirms.", no_args_is_help=True)

LIST_COLUMNS = ["message_id", "redemption_id", "state", "attempts", "next_attempt_at", "last_error"]


@app.command("status")
def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Messages per state and the age of the oldest unconfirmed one."""
    from credex.relay.outbox import outbox_status

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
    from credex.errors import InvalidInput
    from credex.relay.outbox import MESSAGE_STATES, list_messages

    if state is not None and state not in MESSAGE_STATES:
        raise InvalidInput(f"unknown state {state!r}: use one of {', '.join(MESSAGE_STATES)}")
    with points_session(ctx) as session:
        rows = list_messages(session, state=state, limit=limit)
    emit(rows, as_json=as_json, columns=LIST_COLUMNS, title="outbox messages")
