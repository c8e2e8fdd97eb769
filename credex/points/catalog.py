"""The gift catalog."""

from __future__ import annotations

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from credex.db import tables
from credex.db.models import utcnow
from credex.errors import Conflict, InvalidInput, UnknownSku
from credex.points.rules import check_name, check_sku, parse_int

_item = tables.catalog_item


def item_json(row) -> dict:
    return {
        "sku": row.sku,
        "name": row.name,
        "points": row.points,
        "stock": row.stock,
        "active": bool(row.active),
    }


def add_item(session: Session, sku: str, *, name: str, points: str | int, stock: str | int | None) -> dict:
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
    result = session.execute(update(_item).where(_item.c.sku == sku).values(**changes, updated_at=utcnow()))
    if result.rowcount == 0:
        session.rollback()
        raise UnknownSku(f"no gift with sku {sku} in the catalog")
    session.commit()
    return item_json(get_item(session, sku))


def list_items(session: Session, *, include_inactive: bool = True) -> list[dict]:
    query = select(_item).order_by(_item.c.sku)
    if not include_inactive:
        query = query.where(_item.c.active.is_(True))
    return [item_json(row) for row in session.execute(query)]
