"""The gift catalog, and the record of every change of a gift's stock (``stock_movement``):
a gift's stock is the sum of its movements, unlimited counting as 0."""

from __future__ import annotations

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from credex.db import tables
from credex.db.models import StockKind, utcnow
from credex.errors import Conflict, InvalidInput, UnknownSku
from credex.points.rules import check_name, check_sku, parse_int

_item = tables.catalog_item
_movement = tables.stock_movement


def record_movement(
    session: Session,
    *,
    sku: str,
    kind: StockKind,
    delta: int,
    stock_after: int | None,
    ref: str | None,
    operator: str,
    now,
) -> None:
    """One change of ``sku``'s stock, in the caller's transaction (which holds the item's row)."""
    session.execute(
        insert(_movement).values(
            sku=sku, kind=kind.value, delta=delta, stock_after=stock_after, ref=ref, operator=operator, at=now
        )
    )


def _set_movement(session: Session, sku: str, old: int | None, new: int | None, operator: str, now) -> None:
    if old != new:
        record_movement(
            session,
            sku=sku,
            kind=StockKind.set,
            delta=(new or 0) - (old or 0),
            stock_after=new,
            ref=None,
            operator=operator,
            now=now,
        )


def item_json(row) -> dict:
    return {
        "sku": row.sku,
        "name": row.name,
        "points": row.points,
        "stock": row.stock,
        "active": bool(row.active),
    }


def add_item(
    session: Session,
    sku: str,
    *,
    name: str,
    points: str | int,
    stock: str | int | None,
    operator: str = "credex",
) -> dict:
    sku = check_sku(sku)
    values = {
        "sku": sku,
        "name": check_name(name),
        "points": parse_int(points, "points", minimum=1),
        "stock": None if stock is None else parse_int(stock, "stock", minimum=0),
        "active": True,
    }
    now = utcnow()
    try:
        session.execute(insert(_item).values(**values, created_at=now, updated_at=now))
        _set_movement(session, sku, None, values["stock"], operator, now)
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"sku {sku} is already in the catalog: use `credex catalog update`") from None
    return item_json(get_item(session, sku))


def get_item(session: Session, sku: str):
    row = session.execute(select(_item).where(_item.c.sku == sku)).first()
    if row is None:
        raise UnknownSku(f"no gift with sku {sku} in the catalog")
    return row


def update_item(
    session: Session,
    sku: str,
    *,
    name: str | None = None,
    points: str | int | None = None,
    stock: str | int | None = None,
    active: bool | None = None,
    operator: str = "credex",
) -> dict:
    sku = check_sku(sku)
    changes: dict = {}
    if name is not None:
        changes["name"] = check_name(name)
    if points is not None:
        changes["points"] = parse_int(points, "points", minimum=1)
    if stock is not None:
        unlimited = str(stock).strip().lower() == "unlimited"
        changes["stock"] = None if unlimited else parse_int(stock, "stock", minimum=0)
    if active is not None:
        changes["active"] = active
    if not changes:
        raise InvalidInput("nothing to change: give --name, --points, --stock or --active/--inactive")
    now = utcnow()
    # The row locked first (Postgres; SQLite's write transaction holds the file): the movement
    # records the stock this change replaced, whatever redemptions run beside it.
    old = session.execute(select(_item.c.stock).where(_item.c.sku == sku).with_for_update()).first()
    if old is None:
        session.rollback()
        raise UnknownSku(f"no gift with sku {sku} in the catalog")
    session.execute(update(_item).where(_item.c.sku == sku).values(**changes, updated_at=now))
    if "stock" in changes:
        _set_movement(session, sku, old.stock, changes["stock"], operator, now)
    session.commit()
    return item_json(get_item(session, sku))


def list_items(session: Session, *, include_inactive: bool = True) -> list[dict]:
    query = select(_item).order_by(_item.c.sku)
    if not include_inactive:
        query = query.where(_item.c.active.is_(True))
    return [item_json(row) for row in session.execute(query)]
