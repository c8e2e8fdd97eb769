"""credex award refund / settle / expire: the points lifecycle (registered in award.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from credex.commands._common import JsonOption, OperatorOption, operator, points_session, settings
from credex.output import emit


def _render_refund(console, entry: dict) -> None:
    from credex.output import print_record

    title = f"refund {entry['ref']} of order {entry['order']}" + (
        " (already recorded: nothing changed)" if entry["duplicate"] else ""
    )
    print_record(console, entry, title=title)


def refund(
    ctx: typer.Context,
    user_id: Annotated[str, typer.Argument(help="The shopper.")],
    order: Annotated[str, typer.Option("--order", help="The refunded order (its purchase award).")],
    refund_id: Annotated[str, typer.Option("--refund", help="Refund id: the clawback's reference.")],
    amount: Annotated[
        str | None,
        typer.Option("--amount", help="A partial refund's amount, e.g. 30.00 (default: all of it)."),
    ] = None,
    operator_: OperatorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Take back what a refunded order earned: its pending points first, then the balance
    (oldest points first); what the balance cannot cover becomes debt."""
    from credex.points.lifecycle import refund_order

    s = settings(ctx)
    with points_session(ctx, write=True) as session:
        entry = refund_order(
            session,
            user_id,
            order_id=order,
            refund_id=refund_id,
            amount=amount,
            rate=s.purchase_rate,
            operator=operator(ctx, operator_),
        )
    emit(entry, as_json=as_json, render=_render_refund)


def _render_run(what: str):
    def render(console, report: dict) -> None:
        from credex.output import print_record

        print_record(console, report, title=what)

    return render


def settle(
    ctx: typer.Context,
    operator_: OperatorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cron: make pending points whose return window is over available (paying debt first)."""
    from credex.points.lifecycle import settle_pending

    with points_session(ctx, write=True) as session:
        report = settle_pending(session, operator=operator(ctx, operator_))
    emit(report, as_json=as_json, render=_render_run("settled pending points"))


def expire(
    ctx: typer.Context,
    operator_: OperatorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cron: write off what is left of every award past its expiry date."""
    from credex.points.lifecycle import expire_lapsed

    with points_session(ctx, write=True) as session:
        report = expire_lapsed(session, operator=operator(ctx, operator_))
    emit(report, as_json=as_json, render=_render_run("expired points"))
