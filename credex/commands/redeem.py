"""credex redeem: spend points on gifts."""

from __future__ import annotations

from typing import Annotated

import typer

from credex.commands._common import JsonOption, LimitOption, OperatorOption, operator, points_session
from credex.commands.quick import render_redemption as _render
from credex.output import emit

app = typer.Typer(help="Redeem points for gifts and look redemptions up.", no_args_is_help=True)

COLUMNS = ["redemption_id", "created_at", "user_id", "sku", "quantity", "points", "status", "express_no"]


@app.command("create")
def create(
    ctx: typer.Context,
    user_id: Annotated[str, typer.Argument(help="The shopper.")],
    sku: Annotated[str, typer.Argument(help="The gift.")],
    address: Annotated[str, typer.Option("--address", help="Where to deliver it.")],
    quantity: Annotated[str, typer.Option("--quantity", help="How many.")] = "1",
    request_id: Annotated[
        str | None,
        typer.Option("--request-id", help="Idempotency key: a repeat returns the first redemption."),
    ] = None,
    operator_: OperatorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Spend points on a gift: one transaction, no network call."""
    from credex.points.redemptions import redeem

    with points_session(ctx, write=True) as session:
        result = redeem(
            session,
            user_id,
            sku,
            address=address,
            quantity=quantity,
            request_id=request_id,
            operator=operator(ctx, operator_),
        )
    emit(result, as_json=as_json, render=_render)


@app.command("show")
def show(
    ctx: typer.Context,
    redemption_id: Annotated[str, typer.Argument(help="The redemption's id.")],
    as_json: JsonOption = False,
) -> None:
    """One redemption and where its delivery stands."""
    from credex.points.redemptions import get_redemption

    with points_session(ctx) as session:
        result = get_redemption(session, redemption_id)
    emit(result, as_json=as_json, render=_render)


@app.command("cancel")
def cancel(
    ctx: typer.Context,
    redemption_id: Annotated[str, typer.Argument(help="The redemption's id.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why (shown in its events and sent to the warehouse).")
    ],
    wait: Annotated[
        float | None,
        typer.Option(
            "--wait",
            min=0,
            max=24 * 3600,
            help="Wait up to SECONDS (at most a day) for the warehouse's answer.",
            show_default=False,
        ),
    ] = None,
    operator_: OperatorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Ask for the gift not to ship: points and stock come back once it is cancelled.

    A redemption whose message never left is cancelled at once; otherwise it is `cancelling`
    until the warehouse answers (--wait to wait for that answer)."""
    from credex.commands._common import settings
    from credex.points.cancels import cancel_redemption, wait_for_outcome

    with points_session(ctx, write=True) as session:
        result = cancel_redemption(session, redemption_id, reason=reason, operator=operator(ctx, operator_))
    if wait and result["status"] == "cancelling":
        shown = wait_for_outcome(settings(ctx).database_url, result["redemption_id"], seconds=wait)
        result = shown | {"duplicate": result["duplicate"], "cancel": result["cancel"]}
    emit(result, as_json=as_json, render=_render)


@app.command("list")
def list_(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option("--user", help="Only this shopper's.")] = None,
    status: Annotated[
        str | None,
        typer.Option(
            "--status",
            help="pending, shipping, cancelling, cancelled, delivered, returned or exception.",
        ),
    ] = None,
    limit: LimitOption = 50,
    as_json: JsonOption = False,
) -> None:
    """Redemptions, newest first."""
    from credex.db.models import RedemptionStatus
    from credex.errors import InvalidInput, printable
    from credex.points.redemptions import list_redemptions

    statuses = [s.value for s in RedemptionStatus]
    if status is not None and status not in statuses:
        raise InvalidInput(f"unknown status {printable(status)}: use {', '.join(statuses)}")
    with points_session(ctx) as session:
        rows = list_redemptions(session, user_id=user, status=status, limit=limit)
    emit(rows, as_json=as_json, columns=COLUMNS, title="redemptions")
