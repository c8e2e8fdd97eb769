"""credex award: points for purchases, reviews and manual grants."""

from __future__ import annotations

from typing import Annotated

import typer

from credex.commands._common import JsonOption, OperatorOption, operator, points_session, settings
from credex.output import emit

app = typer.Typer(help="Award points (each award is idempotent on its reference).", no_args_is_help=True)


def _render_entry(console, entry: dict) -> None:
    from credex.output import print_record

    title = f"{entry['kind']} {entry['ref']}" + (
        " (already recorded: nothing changed)" if entry["duplicate"] else ""
    )
    print_record(console, entry, title=title)


@app.command("purchase")
def purchase(
    ctx: typer.Context,
    user_id: Annotated[str, typer.Argument(help="The shopper.")],
    order: Annotated[str, typer.Option("--order", help="Order id: the award's reference.")],
    amount: Annotated[str, typer.Option("--amount", help="What the order cost, e.g. 129.90.")],
    operator_: OperatorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Points for a purchase: floor(amount x CREDEX_PURCHASE_RATE)."""
    from credex.points.awards import award_purchase

    s = settings(ctx)
    with points_session(ctx, write=True) as session:
        entry = award_purchase(
            session,
            user_id,
            order_id=order,
            amount=amount,
            rate=s.purchase_rate,
            operator=operator(ctx, operator_),
            pending_days=s.pending_days,
            expiry_days=s.expiry_days,
        )
    emit(entry, as_json=as_json, render=_render_entry)


@app.command("review")
def review(
    ctx: typer.Context,
    user_id: Annotated[str, typer.Argument(help="The shopper.")],
    review_id: Annotated[str, typer.Option("--review", help="Review id: the award's reference.")],
    photos: Annotated[bool, typer.Option("--photos", help="The review has photos.")] = False,
    operator_: OperatorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Points for a review (more with photos)."""
    from credex.points.awards import award_review

    s = settings(ctx)
    points = s.review_photo_points if photos else s.review_points
    with points_session(ctx, write=True) as session:
        entry = award_review(
            session,
            user_id,
            review_id=review_id,
            photos=photos,
            points=points,
            operator=operator(ctx, operator_),
            expiry_days=s.expiry_days,
        )
    emit(entry, as_json=as_json, render=_render_entry)


@app.command("grant", context_settings={"ignore_unknown_options": True})
def grant(
    ctx: typer.Context,
    user_id: Annotated[str, typer.Argument(help="The shopper.")],
    points: Annotated[str, typer.Argument(help="Points to add; negative to take (never below zero).")],
    reason: Annotated[str, typer.Option("--reason", help="Why: kept in the ledger.")],
    ref: Annotated[str | None, typer.Option("--ref", help="Idempotency key for this grant.")] = None,
    operator_: OperatorOption = None,
    as_json: JsonOption = False,
) -> None:
    """A manual adjustment by support staff."""
    from credex.points.awards import award_grant

    expiry_days = settings(ctx).expiry_days
    with points_session(ctx, write=True) as session:
        entry = award_grant(
            session,
            user_id,
            points,
            reason=reason,
            ref=ref,
            operator=operator(ctx, operator_),
            expiry_days=expiry_days,
        )
    emit(entry, as_json=as_json, render=_render_entry)


from credex.commands import award_bulk, award_lifecycle  # noqa: E402

app.command("bulk")(award_bulk.bulk)
app.command("refund")(award_lifecycle.refund)
app.command("settle")(award_lifecycle.settle)
app.command("expire")(award_lifecycle.expire)
