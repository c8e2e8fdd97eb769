"""A redemption's life after `redeem create` on the points side (docs/redemptions.md): the
refund that gives back its points and stock exactly once, `redeem cancel`, and the events that
record every change of status.

Every function runs inside the caller's transaction and leaves the commit to it, except
``cancel_redemption``, which is a command's whole transaction. A status changes only through a
conditional update (``WHERE status IN (...)``), so two processes that race to move the same
redemption (a cancel and an answer from the warehouse, two track syncs) move it once; the
unique (kind, ref) of the ledger makes a second refund impossible even if one slipped through.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, insert, select, update
from sqlmodel import Session

from credex.db import tables
from credex.db.models import (
    CANCEL_UNDERWAY,
    FINAL_DELIVERIES,
    EntryKind,
    EventSource,
    LotState,
    MessageState,
    RedemptionStatus,
    StockKind,
    utcnow,
)
from credex.errors import NotCancellable, UnknownRedemption
from credex.points import planner
from credex.points.catalog import record_movement
from credex.points.lots import account_table, ledger_table, lock_account, lot_table, use_table
from credex.points.redemptions import add_event, get_redemption
from credex.points.rules import checked_text, parse_int
from credex.relay.topology import REDEMPTION_CANCELLED, REDEMPTION_CREATED

_r = tables.redemption
_o = tables.outbox_message
_mark = tables.outbox_claim_mark
_event = tables.redemption_event
_item = tables.catalog_item
_movement = tables.stock_movement

REASON_MAX = 1000  # a cancel's reason travels in messages and events: shorter than a ledger's
WITHDRAWN = "withdrawn: its redemption was cancelled before it was published"


@dataclass(frozen=True)
class Refund:
    """What a refund gave back."""

    redemption_id: int
    entry_id: int
    points: int  # all the redemption's points
    debt_paid: int  # of which paid the shopper's debt first
    balance: int
    stock_back: int


def refund_redemption(
    session: Session,
    redemption_id: int,
    *,
    from_statuses: tuple[str, ...],
    to_status: RedemptionStatus,
    source: EventSource,
    detail: str | None,
    operator: str,
    now: datetime,
) -> Refund | None:
    """Move the redemption from one of ``from_statuses`` to ``to_status`` (cancelled or
    returned) and give back its points and its stock, in the caller's transaction. None when it
    was not in one of those statuses: someone else moved it first, and nothing changed."""
    moved = session.execute(
        update(_r)
        .where(_r.c.id == redemption_id, _r.c.status.in_(from_statuses))
        .values(status=to_status.value, updated_at=now)
        .returning(_r.c.user_id, _r.c.sku, _r.c.quantity, _r.c.points)
    ).first()
    if moved is None:
        return None
    user_id, points = moved.user_id, moved.points
    ledger = ledger_table.c
    spent_id = session.execute(
        select(ledger.id).where(ledger.kind == EntryKind.redemption.value, ledger.ref == str(redemption_id))
    ).scalar_one()

    # Points: debt first, as with any award; the rest into the lots they came from.
    account = lock_account(session, user_id)
    paid = planner.debt_paid(account.debt, points)
    back = points - paid
    balance = account.balance + back
    a = account_table.c
    session.execute(
        update(account_table)
        .where(a.user_id == user_id)
        .values(balance=balance, debt=a.debt - paid, redeemed=a.redeemed - points, updated_at=now)
    )
    what = "returned to the sender" if to_status == RedemptionStatus.returned else "cancelled"
    entry_id = session.execute(
        insert(ledger_table)
        .values(
            user_id=user_id,
            kind=EntryKind.redemption_refund.value,
            ref=str(redemption_id),
            points=back,
            pending=0,
            debt=-paid,
            balance=balance,
            detail=f"{moved.sku} x{moved.quantity}",
            source_id=spent_id,
            operator=operator,
            reason=f"redemption {redemption_id} {what}" + (f": {detail}" if detail else ""),
            created_at=now,
        )
        .returning(ledger.id)
    ).scalar_one()
    _put_back_into_lots(session, spent_id, entry_id, skip=paid)

    stock_back = _stock_back(session, redemption_id, moved.sku, moved.quantity, to_status, operator, now)
    add_event(session, redemption_id, status=to_status.value, source=source, detail=detail, now=now)
    return Refund(redemption_id, entry_id, points, paid, balance, stock_back)


def _put_back_into_lots(session: Session, spent_id: int, refund_id: int, *, skip: int) -> None:
    """The points the redemption took out of each lot go back into it (its expiry kept: a lot that
    expired meanwhile lapses again at the next `award expire`), as negative uses by the refund.
    ``skip`` points paid the debt instead: they are the oldest ones, which expire first."""
    lot, use = lot_table.c, use_table.c
    taken = session.execute(
        select(use.lot_id, use.points)
        .select_from(use_table.join(lot_table, lot.id == use.lot_id))
        .where(use.entry_id == spent_id)
        .order_by(lot.available_at, lot.id)
    ).all()
    for lot_id, back in planner.put_back([(row.lot_id, row.points) for row in taken], skip=skip):
        session.execute(
            update(lot_table)
            .where(lot.id == lot_id)
            .values(
                remaining=lot.remaining + back,
                state=case((lot.state == LotState.pending.value, lot.state), else_=LotState.available.value),
            )
        )
        session.execute(insert(use_table).values(lot_id=lot_id, entry_id=refund_id, points=-back))


def _stock_back(
    session: Session,
    redemption_id: int,
    sku: str,
    quantity: int,
    to_status: RedemptionStatus,
    operator: str,
    now,
) -> int:
    """The stock back, when the redemption took some (a gift made unlimited since takes none back)."""
    took = session.execute(
        select(_movement.c.id).where(
            _movement.c.ref == str(redemption_id), _movement.c.kind == StockKind.redeem.value
        )
    ).first()
    if took is None:
        return 0
    after = session.execute(
        update(_item)
        .where(_item.c.sku == sku, _item.c.stock.is_not(None))
        .values(stock=_item.c.stock + quantity, updated_at=now)
        .returning(_item.c.stock)
    ).scalar_one_or_none()
    if after is None:
        return 0
    kind = StockKind.ret if to_status == RedemptionStatus.returned else StockKind.cancel
    record_movement(
        session,
        sku=sku,
        kind=kind,
        delta=quantity,
        stock_after=after,
        ref=str(redemption_id),
        operator=operator,
        now=now,
    )
    return quantity


# --- redeem cancel --------------------------------------------------------------------------------


def cancel_message_body(*, message_id: str, redemption_id: int, reason: str, created_at: datetime) -> str:
    """The redemption.cancelled body (messaging.md)."""
    return json.dumps(
        {
            "message_id": message_id,
            "redemption_id": redemption_id,
            "reason": reason,
            "created_at": created_at.isoformat(),
        },
        ensure_ascii=False,
    )


def cancel_redemption(session: Session, redemption_id: str | int, *, reason: str, operator: str) -> dict:
    """`redeem cancel`: one transaction on the redemption's row (locked).

    Short path: its redemption.created message was never handed to the broker (pending, no
    attempt, never claimed by a relay): the message is withdrawn and the redemption refunded and
    cancelled at once. Before it publishes, a relay commits its claim: on SQLite on the message
    (``first_claimed_at``), on Postgres as the mark the message's created_at is under
    (outbox_claim_mark), so a message that may be at the broker always carries one or the other;
    on Postgres the message's row lock is taken too (a row a relay holds right now is passed by,
    and the long path taken). Long path:
    ``cancelling`` and a redemption.cancelled message for the relay to deliver."""

    number = parse_int(redemption_id, "redemption id", minimum=1)
    reason = checked_text(reason, "reason", REASON_MAX)
    row = session.execute(
        select(_r.c.id, _r.c.status, _r.c.message_id).where(_r.c.id == number).with_for_update()
    ).first()
    if row is None:
        session.rollback()
        raise UnknownRedemption(f"no redemption {redemption_id}")
    if row.status in FINAL_DELIVERIES:
        session.rollback()
        raise NotCancellable(f"redemption {number} is {row.status}: it can no longer be cancelled")
    if row.status in CANCEL_UNDERWAY:
        session.rollback()
        return get_redemption(session, number) | {"duplicate": True, "cancel": None}
    now = utcnow()
    if row.status == RedemptionStatus.pending.value and _withdraw(session, row.message_id, now):
        refund = refund_redemption(
            session,
            number,
            from_statuses=(RedemptionStatus.pending.value,),
            to_status=RedemptionStatus.cancelled,
            source=EventSource.cancel,
            detail=reason,
            operator=operator,
            now=now,
        )
        if refund is None:  # the row is locked: cannot happen, but never refund half-way
            raise RuntimeError(f"redemption {number} moved while it was locked")
        session.commit()
        return get_redemption(session, number) | {"duplicate": False, "cancel": "withdrawn"}

    moved = session.execute(
        update(_r)
        .where(_r.c.id == number, _r.c.status == row.status)
        .values(status=RedemptionStatus.cancelling.value, updated_at=now)
    ).rowcount
    if moved != 1:
        raise RuntimeError(f"redemption {number} moved while it was locked")
    message_id = str(uuid.uuid4())
    session.execute(
        insert(_o).values(
            id=message_id,
            redemption_id=number,
            routing_key=REDEMPTION_CANCELLED,
            body=cancel_message_body(
                message_id=message_id, redemption_id=number, reason=reason, created_at=now
            ),
            state=MessageState.pending.value,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )
    add_event(
        session,
        number,
        status=RedemptionStatus.cancelling.value,
        source=EventSource.cancel,
        detail=reason,
        now=now,
    )
    session.commit()
    return get_redemption(session, number) | {"duplicate": False, "cancel": "requested"}


def _withdraw(session: Session, message_id: str, now: datetime) -> bool:
    """Withdraw the redemption.created message if no relay ever claimed it; False otherwise (or
    when a relay holds its row right now, on Postgres)."""
    o = _o.c
    fresh = (
        o.id == message_id,
        o.routing_key == REDEMPTION_CREATED,
        o.state == MessageState.pending.value,
        o.attempts == 0,
        o.first_claimed_at.is_(None),
    )
    held = session.execute(select(o.id).where(*fresh).with_for_update(skip_locked=True)).first()
    if held is None:
        return False
    # Read once the row is locked, in a statement of its own: a relay that published it and died
    # since had committed its mark first (credex/relay/claims.py).
    never_published = o.created_at > select(_mark.c.through).where(_mark.c.id == 1).scalar_subquery()
    done = session.execute(
        update(_o)
        .where(*fresh, never_published)
        .values(state=MessageState.cancelled.value, last_error=WITHDRAWN, claimed_by=None, claimed_until=None)
    ).rowcount
    return done == 1


def wait_for_outcome(database_url: str, redemption_id: int, *, seconds: float) -> dict:
    """Poll the redemption until it leaves ``cancelling`` or ``seconds`` have passed."""
    from credex.db.engine import session_for

    deadline = time.monotonic() + seconds
    while True:
        with session_for(database_url) as session:
            shown = get_redemption(session, redemption_id)
        if shown["status"] != RedemptionStatus.cancelling.value or time.monotonic() >= deadline:
            return shown
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
