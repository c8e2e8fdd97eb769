"""credex catalog: the gifts points can buy."""

from __future__ import annotations

from typing import Annotated

import typer

from credex.commands._common import JsonOption, OperatorOption, operator, points_session
from credex.output import emit

app = typer.Typer(help="Keep the gift catalog.", no_args_is_help=True)

COLUMNS = ["sku", "name", "points", "stock", "active"]


def _render_item(console, item: dict) -> None:
    from credex.output import print_record

    shown = dict(item, stock="unlimited" if item["stock"] is None else item["stock"])
    print_record(console, shown, title=f"gift {item['sku']}")


@app.command("add")
def add(
    ctx: typer.Context,
    sku: Annotated[str, typer.Argument(help="Stock-keeping unit, e.g. SHAMPOO-500.")],
    name: Annotated[str, typer.Option("--name", help="What the shopper sees.")],
    points: Annotated[str, typer.Option("--points", help="Points one unit costs.")],
    stock: Annotated[str | None, typer.Option("--stock", help="Units in stock (default: unlimited).")] = None,
    operator_: OperatorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add a gift to the catalog."""
    from credex.points.catalog import add_item

    with points_session(ctx, write=True) as session:
        item = add_item(
            session, sku, name=name, points=points, stock=stock, operator=operator(ctx, operator_)
        )
    emit(item, as_json=as_json, render=_render_item)


@app.command("update")
def update(
    ctx: typer.Context,
    sku: Annotated[str, typer.Argument(help="The gift to change.")],
    name: Annotated[str | None, typer.Option("--name")] = None,
    points: Annotated[str | None, typer.Option("--points", help="Points one unit costs.")] = None,
    stock: Annotated[str | None, typer.Option("--stock", help="Units in stock, or 'unlimited'.")] = None,
    active: Annotated[
        bool | None, typer.Option("--active/--inactive", help="Offer the gift or withdraw it.")
    ] = None,
    operator_: OperatorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change a gift's name, cost, stock or availability."""
    from credex.points.catalog import update_item

    with points_session(ctx, write=True) as session:
        item = update_item(
            session,
            sku,
            name=name,
            points=points,
            stock=stock,
            active=active,
            operator=operator(ctx, operator_),
        )
    emit(item, as_json=as_json, render=_render_item)


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the catalog."""
    from credex.points.catalog import list_items

    with points_session(ctx) as session:
        items = list_items(session)
    emit(items, as_json=as_json, columns=COLUMNS, title="catalog")
