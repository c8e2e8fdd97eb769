"""credex account: balances and their history."""

from __future__ import annotations

from typing import Annotated

import typer

from credex.commands._common import JsonOption, LimitOption, points_session
from credex.commands.quick import render_account
from credex.output import emit

app = typer.Typer(help="Look at a shopper's points.", no_args_is_help=True)

HISTORY_COLUMNS = [
    "entry_id",
    "created_at",
    "kind",
    "ref",
    "points",
    "balance",
    "pending",
    "debt",
    "operator",
    "reason",
]


@app.command("show")
def show(
    ctx: typer.Context,
    user_id: Annotated[str, typer.Argument(help="The shopper.")],
    as_json: JsonOption = False,
) -> None:
    """A shopper's balance, pending points, debt and the points about to expire."""
    from credex.points.accounts import get_account

    with points_session(ctx) as session:
        account = get_account(session, user_id)
    emit(account, as_json=as_json, render=render_account)


@app.command("history")
def history(
    ctx: typer.Context,
    user_id: Annotated[str, typer.Argument(help="The shopper.")],
    limit: LimitOption = 50,
    as_json: JsonOption = False,
) -> None:
    """Every change of a shopper's points, newest first (pending and debt: their changes)."""
    from credex.points.accounts import history as account_history

    with points_session(ctx) as session:
        entries = account_history(session, user_id, limit=limit)
    emit(entries, as_json=as_json, columns=HISTORY_COLUMNS, title=f"history of {user_id}")
