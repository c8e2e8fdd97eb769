"""Redemptions: points and stock taken, the redemption, its ledger entry and its outbox
message written in one transaction. No network call happens here."""

from __future__ import annotations

import json
import uuid

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from credex.db.models import (
    CatalogItem,
    EntryKind,
    LedgerEntry,
    MessageState,
    OutboxMessage,
    Redemption,
    RedemptionStatus,
    utcnow,
)
from credex.errors import Conflict, InsufficientPoints, OutOfStock, UnknownRedemption, UnknownSku, UnknownUser
from credex.points.awards import account_table, change_balance, check_user_id
from credex.points.lifecycle import consume_lots
from credex.points.rules import INT32_MAX, INT64_MAX, parse_int, require_text
from credex.relay.topology import REDEMPTION_CREATED

_item = CatalogItem.__table__
_redemption = Redemption.__table__
_ledger = LedgerEntry.__table__
_outbox = OutboxMessage.__table__


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
    sku = require_text(sku, "sku")
    address = require_text(address, "address")
    quantity = parse_int(quantity, "quantity", minimum=1, maximum=INT32_MAX)
    if request_id is not None:
        request_id = require_text(request_id, "request id")
        existing = session.execute(select(_redemption).where(_redemption.c.request_id == request_id)).first()
        if existing is not None:
            session.rollback()
            return _repeat_or_conflict(existing, user_id=user_id, sku=sku, quantity=quantity, address=address)

    item = session.execute(
        select(_item.c.points, _item.c.stock, _item.c.active).where(_item.c.sku == sku)
    ).first()
    if item is None:
        session.rollback()
        raise UnknownSku(f"no gift with sku {sku} in the catalog")
    if not item.active:
        session.rollback()
        raise UnknownSku(f"gift {sku} is not offered any more (inactive)")
    cost = item.points * quantity
    now = utcnow()
    try:
        balance = change_balance(session, user_id, -cost, now, redeemed=cost) if cost <= INT64_MAX else None
        if balance is None:
            current = session.execute(
                select(account_table.c.balance).where(account_table.c.user_id == user_id)
            ).scalar()
            session.rollback()
            if current is None:
                raise UnknownUser(f"no account for user {user_id}")
            raise InsufficientPoints(f"{user_id} has {current} points; {quantity} x {sku} costs {cost}")
        if item.stock is not None:
            taken = session.execute(
                update(_item)
                .where(_item.c.sku == sku, _item.c.stock >= quantity)
                .values(stock=_item.c.stock - quantity, updated_at=now)
            )
            if taken.rowcount != 1:
                session.rollback()
                raise OutOfStock(f"gift {sku} has fewer than {quantity} in stock")

        message_id = str(uuid.uuid4())
        redemption_id = session.execute(
            insert(_redemption)
            .values(
                request_id=request_id,
                user_id=user_id,
                sku=sku,
                quantity=quantity,
                points=cost,
                balance=balance,
                address=address,
                status=RedemptionStatus.pending.value,
                message_id=message_id,
                operator=operator,
                created_at=now,
                updated_at=now,
            )
            .returning(_redemption.c.id)
        ).scalar_one()
        entry_id = session.execute(
            insert(_ledger)
            .values(
                user_id=user_id,
                kind=EntryKind.redemption.value,
                ref=str(redemption_id),
                points=-cost,
                balance=balance,
                detail=f"{sku} x{quantity}",
                operator=operator,
                reason=f"redemption {redemption_id}: {quantity} x {sku}",
                created_at=now,
            )
            .returning(_ledger.c.id)
        ).scalar_one()
        consume_lots(session, user_id, cost, entry_id)  # oldest points first: fewer expire
        session.execute(
            insert(_outbox).values(
                id=message_id,
                redemption_id=redemption_id,
                routing_key=REDEMPTION_CREATED,
                body=message_body(
                    message_id=message_id,
                    redemption_id=redemption_id,
                    user_id=user_id,
                    sku=sku,
                    quantity=quantity,
                    points=cost,
                    address=address,
                    created_at=now,
                ),
                state=MessageState.pending.value,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
        session.commit()
    except IntegrityError:
        # Another process committed the same request id first: answer as a repeat.
        session.rollback()
        if request_id is None:
            raise
        existing = session.execute(select(_redemption).where(_redemption.c.request_id == request_id)).first()
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
        "duplicate": False,
        "created_at": now,
    }


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
    return redemption_json(row, message_state=row.message_state)


def list_redemptions(
    session: Session, *, user_id: str | None = None, status: str | None = None, limit: int = 50
) -> list[dict]:
    query = select(_redemption).order_by(_redemption.c.id.desc()).limit(limit)
    if user_id is not None:
        query = query.where(_redemption.c.user_id == user_id)
    if status is not None:
        query = query.where(_redemption.c.status == status)
    return [redemption_json(row) for row in session.execute(query)]
