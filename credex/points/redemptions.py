"""Redemptions: points and stock taken, the redemption, its ledger entry and its outbox
message written in one transaction. No network call happens here.

(A little over 400 lines on purpose: the redemption's transaction, its history of events and the
ways to read it back share one row layout; cancels and refunds are cancels.py's.)"""

from __future__ import annotations

import json
import uuid
from datetime import datetime

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from credex.db import tables
from credex.db.driver import DriverCursor, DriverStatement, first_value
from credex.db.models import (
    EntryKind,
    EventSource,
    MessageState,
    RedemptionStatus,
    StockKind,
    UTCDateTime,
    utcnow,
)
from credex.errors import Conflict, InsufficientPoints, OutOfStock, UnknownRedemption, UnknownSku, UnknownUser
from credex.points.lots import account_table, consume_lots
from credex.points.rules import (
    INT32_MAX,
    INT64_MAX,
    check_address,
    check_request_id,
    check_sku,
    check_user_id,
    parse_int,
)
from credex.relay.topology import REDEMPTION_CREATED

_item = tables.catalog_item
_redemption = tables.redemption
_ledger = tables.ledger_entry
_outbox = tables.outbox_message
_event = tables.redemption_event
_movement = tables.stock_movement


def redemption_json(row, *, message_state: str | None = None, duplicate: bool | None = None) -> dict:
    result = {
        "redemption_id": row.id,
        "user_id": row.user_id,
        "sku": row.sku,
        "quantity": row.quantity,
        "points": row.points,
        "balance": row.balance,
        "address": row.address,
        "status": row.status,
        "message_id": row.message_id,
        "express_no": row.express_no,
        "carrier": row.carrier,
        "delivery_status": row.delivery_status,
        "delivery_checked_at": row.delivery_checked_at,
        "created_at": row.created_at,
    }
    if message_state is not None:
        result["message_state"] = message_state
    if duplicate is not None:
        result["duplicate"] = duplicate
    return result


def message_body(
    *,
    message_id: str,
    redemption_id: int,
    user_id: str,
    sku: str,
    quantity: int,
    points: int,
    address: str,
    created_at,
) -> str:
    """The redemption.created body (messaging.md)."""
    return json.dumps(
        {
            "message_id": message_id,
            "redemption_id": redemption_id,
            "user_id": user_id,
            "sku": sku,
            "quantity": quantity,
            "points": points,
            "address": address,
            "created_at": created_at.isoformat(),
        },
        ensure_ascii=False,
    )


def _repeat_or_conflict(existing, *, user_id: str, sku: str, quantity: int, address: str) -> dict:
    if (existing.user_id, existing.sku, existing.quantity, existing.address) == (
        user_id,
        sku,
        quantity,
        address,
    ):
        return redemption_json(existing, duplicate=True)
    raise Conflict(
        f"request id {existing.request_id} was already used for redemption {existing.id} "
        f"({existing.user_id}, {existing.sku} x{existing.quantity}) with other content"
    )


# Built once and run on the driver's cursor: a redemption spends more in building and executing
# statements than the database spends running them (bench/redeem.py compares with the driver).
_ITEM = DriverStatement(
    select(_item.c.points, _item.c.stock, _item.c.active).where(_item.c.sku == bindparam("gift"))
)
_BY_REQUEST = select(_redemption).where(_redemption.c.request_id == bindparam("request_id"))
_TAKE_POINTS = DriverStatement(  # conditional: never read in Python and written back
    update(account_table)
    .where(account_table.c.user_id == bindparam("user"), account_table.c.balance >= bindparam("cost"))
    .values(
        balance=account_table.c.balance - bindparam("cost"),
        redeemed=account_table.c.redeemed + bindparam("cost"),
        updated_at=bindparam("moment", type_=UTCDateTime()),
    )
    .returning(account_table.c.balance)
)
_BALANCE = select(account_table.c.balance).where(account_table.c.user_id == bindparam("user"))
_TAKE_STOCK = DriverStatement(
    update(_item)
    .where(_item.c.sku == bindparam("gift"), _item.c.stock >= bindparam("wanted"))
    .values(stock=_item.c.stock - bindparam("wanted"), updated_at=bindparam("moment", type_=UTCDateTime()))
    .returning(_item.c.stock)
)
# inline(): nothing reads their ids, so no RETURNING (Postgres would send each id back).
_INSERT_MOVEMENT = DriverStatement(
    insert(_movement).inline(), columns=("sku", "kind", "delta", "stock_after", "ref", "operator", "at")
)
_INSERT_EVENT = DriverStatement(
    insert(_event).inline(), columns=("redemption_id", "at", "status", "source", "detail")
)
_REDEMPTION_COLUMNS = (
    "request_id", "user_id", "sku", "quantity", "points", "balance", "address", "status", "message_id",
    "operator", "created_at", "updated_at",
)  # fmt: skip
_INSERT_REDEMPTION = DriverStatement(
    insert(_redemption).returning(_redemption.c.id), columns=_REDEMPTION_COLUMNS
)
_ENTRY_COLUMNS = (
    "user_id", "kind", "ref", "points", "balance", "detail", "operator", "reason", "created_at",
    "pending", "debt",
)  # fmt: skip
_INSERT_ENTRY = DriverStatement(insert(_ledger).returning(_ledger.c.id), columns=_ENTRY_COLUMNS)
_MESSAGE_COLUMNS = (
    "id",
    "redemption_id",
    "routing_key",
    "body",
    "state",
    "attempts",
    "next_attempt_at",
    "created_at",
)
_INSERT_MESSAGE = DriverStatement(insert(_outbox), columns=_MESSAGE_COLUMNS)


def redeem(
    session: Session,
    user_id: str,
    sku: str,
    *,
    address: str,
    quantity: str | int = 1,
    request_id: str | None = None,
    operator: str,
) -> dict:
    """Spend points on a gift. Idempotent on ``request_id``."""
    user_id = check_user_id(user_id)
    sku = check_sku(sku)
    address = check_address(address)
    quantity = parse_int(quantity, "quantity", minimum=1, maximum=INT32_MAX)
    if request_id is not None:
        request_id = check_request_id(request_id)
        existing = session.execute(_BY_REQUEST, {"request_id": request_id}).first()
        if existing is not None:
            session.rollback()
            return _repeat_or_conflict(existing, user_id=user_id, sku=sku, quantity=quantity, address=address)

    cursor = DriverCursor(session)
    item = _ITEM.execute(cursor, {"gift": sku}).fetchone()
    if item is None:
        session.rollback()
        raise UnknownSku(f"no gift with sku {sku} in the catalog")
    price, stock, active = item
    if not active:
        session.rollback()
        raise UnknownSku(f"gift {sku} is not offered any more (inactive)")
    cost = price * quantity
    now = utcnow()
    try:
        balance = None
        if cost <= INT64_MAX:
            balance = first_value(
                _TAKE_POINTS.execute(cursor, {"user": user_id, "cost": cost, "moment": now})
            )
        if balance is None:
            current = session.execute(_BALANCE, {"user": user_id}).scalar()
            session.rollback()
            if current is None:
                raise UnknownUser(f"no account for user {user_id}")
            raise InsufficientPoints(f"{user_id} has {current} points; {quantity} x {sku} costs {cost}")
        stock_left = None
        if stock is not None:
            stock_left = first_value(
                _TAKE_STOCK.execute(cursor, {"gift": sku, "wanted": quantity, "moment": now})
            )
            if stock_left is None:
                session.rollback()
                raise OutOfStock(f"gift {sku} has fewer than {quantity} in stock")

        message_id = str(uuid.uuid4())
        redemption_id = first_value(
            _INSERT_REDEMPTION.execute(
                cursor,
                {
                    "request_id": request_id,
                    "user_id": user_id,
                    "sku": sku,
                    "quantity": quantity,
                    "points": cost,
                    "balance": balance,
                    "address": address,
                    "status": RedemptionStatus.pending.value,
                    "message_id": message_id,
                    "operator": operator,
                    "created_at": now,
                    "updated_at": now,
                },
            )
        )
        entry_id = first_value(
            _INSERT_ENTRY.execute(
                cursor,
                {
                    "user_id": user_id,
                    "kind": EntryKind.redemption.value,
                    "ref": str(redemption_id),
                    "points": -cost,
                    "balance": balance,
                    "detail": f"{sku} x{quantity}",
                    "operator": operator,
                    "reason": f"redemption {redemption_id}: {quantity} x {sku}",
                    "created_at": now,
                    "pending": 0,
                    "debt": 0,
                },
            )
        )
        consume_lots(session, user_id, cost, entry_id, cursor=cursor)  # oldest points first: fewer expire
        if stock_left is not None:
            _INSERT_MOVEMENT.execute(
                cursor,
                {
                    "sku": sku,
                    "kind": StockKind.redeem.value,
                    "delta": -quantity,
                    "stock_after": stock_left,
                    "ref": str(redemption_id),
                    "operator": operator,
                    "at": now,
                },
            )
        _INSERT_EVENT.execute(
            cursor,
            {
                "redemption_id": redemption_id,
                "at": now,
                "status": RedemptionStatus.pending.value,
                "source": EventSource.create.value,
                "detail": None,
            },
        )
        _INSERT_MESSAGE.execute(
            cursor,
            {
                "id": message_id,
                "redemption_id": redemption_id,
                "routing_key": REDEMPTION_CREATED,
                "body": message_body(
                    message_id=message_id,
                    redemption_id=redemption_id,
                    user_id=user_id,
                    sku=sku,
                    quantity=quantity,
                    points=cost,
                    address=address,
                    created_at=now,
                ),
                "state": MessageState.pending.value,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            },
        )
        session.commit()
    except IntegrityError:
        # Another process committed the same request id first: answer as a repeat.
        session.rollback()
        if request_id is None:
            raise
        existing = session.execute(_BY_REQUEST, {"request_id": request_id}).first()
        session.rollback()  # the read ends here too: a service leaves no transaction open
        if existing is None:
            raise
        return _repeat_or_conflict(existing, user_id=user_id, sku=sku, quantity=quantity, address=address)
    return {
        "redemption_id": redemption_id,
        "user_id": user_id,
        "sku": sku,
        "quantity": quantity,
        "points": cost,
        "balance": balance,
        "address": address,
        "status": RedemptionStatus.pending.value,
        "message_id": message_id,
        "express_no": None,
        "carrier": None,
        "delivery_status": None,
        "delivery_checked_at": None,
        "duplicate": False,
        "created_at": now,
    }


def add_event(
    session: Session,
    redemption_id: int,
    *,
    status: str,
    source: EventSource,
    detail: str | None,
    now: datetime,
) -> None:
    session.execute(
        insert(_event).values(
            redemption_id=redemption_id, at=now, status=status, source=source.value, detail=detail
        )
    )


def move_redemption(
    session: Session,
    redemption_id: int,
    *,
    from_statuses: tuple[str, ...],
    to: RedemptionStatus,
    source: EventSource,
    detail: str | None,
    now: datetime,
) -> bool:
    """Move the redemption to ``to`` if it is in one of ``from_statuses``, with the event that
    says so, in the caller's transaction. False when it was not: someone moved it first."""
    moved = session.execute(
        update(_redemption)
        .where(_redemption.c.id == redemption_id, _redemption.c.status.in_(from_statuses))
        .values(status=to.value, updated_at=now)
    ).rowcount
    if moved:
        add_event(session, redemption_id, status=to.value, source=source, detail=detail, now=now)
    return bool(moved)


def events_of(session: Session, redemption_id: int) -> list[dict]:
    """The redemption's changes of status, newest first."""
    e = _event.c
    rows = session.execute(
        select(e.at, e.status, e.source, e.detail)
        .where(e.redemption_id == redemption_id)
        .order_by(e.id.desc())
    )
    return [{"at": row.at, "status": row.status, "source": row.source, "detail": row.detail} for row in rows]


def get_redemption(session: Session, redemption_id: str | int) -> dict:
    """One redemption, with the state of its outbox message."""
    number = parse_int(redemption_id, "redemption id", minimum=1)
    row = session.execute(
        select(_redemption, _outbox.c.state.label("message_state"))
        .select_from(_redemption.outerjoin(_outbox, _outbox.c.id == _redemption.c.message_id))
        .where(_redemption.c.id == number)
    ).first()
    if row is None:
        raise UnknownRedemption(f"no redemption {redemption_id}")
    return redemption_json(row, message_state=row.message_state) | {"events": events_of(session, number)}


def list_redemptions(
    session: Session, *, user_id: str | None = None, status: str | None = None, limit: int = 50
) -> list[dict]:
    if user_id is not None:
        user_id = check_user_id(user_id, "--user")
    query = select(_redemption).order_by(_redemption.c.id.desc()).limit(limit)
    if user_id is not None:
        query = query.where(_redemption.c.user_id == user_id)
    if status is not None:
        query = query.where(_redemption.c.status == status)
    return [redemption_json(row) for row in session.execute(query)]
