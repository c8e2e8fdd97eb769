"""Many ``redemption.created`` at once, the common case under load: one message per redemption,
its request written and claimed with the others in one transaction, the carrier asked for all of
them at once, and the waybills saved in one more, each step one statement for the whole batch.
Whatever is not plain (a race lost, a duplicate express number, a row in another state, a row
another redemption.created opened) goes through the row state machine one message at a time
(``ShippingDesk.created_from``)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.exc import IntegrityError

from credex.db.models import ShipmentStatus
from credex.errors import CredexError, Unavailable
from credex.logistics.model import CarrierError, Waybill
from credex.warehouse import answers, shipments
from credex.warehouse.answers import Handled, reason_of
from credex.warehouse.lifecycle import OPEN, ShippingDesk, log_waybill
from credex.warehouse.messages import RedemptionMessage

log = logging.getLogger("credex.warehouse")

S = ShipmentStatus


def created_many(desk: ShippingDesk, messages: list[RedemptionMessage], run_all: Callable) -> list[Handled]:
    """One Handled per message (of different redemptions), in order. ``run_all(calls)`` runs the
    carrier calls and returns their results or exceptions, in order."""
    now = desk.clock()

    def open_and_claim(session):
        rows = shipments.open_requests(session, messages, now=now, asking=True)  # new: claimed already
        created = {row.id for row in rows.values()}
        seen = [m for m in messages if m.redemption_id not in rows]  # a request was there
        if seen:
            rows.update(shipments.requests_of(session, [m.redemption_id for m in seen]))
            # Claimed as it is, unless another redemption.created opened it: that one is refused.
            ours = [m.redemption_id for m in seen if answers.not_its_create(m, rows[m.redemption_id]) is None]
            rows.update(shipments.claim(session, ours, now=now))  # the rows claimed, as they are now
        return created, rows

    created, rows = desk.write(open_and_claim)
    handled: list[Handled | None] = [None] * len(messages)
    asking: list[int] = []  # indexes of the messages whose row is being asked for
    for index, message in enumerate(messages):
        row = rows[message.redemption_id]
        if answers.not_its_create(message, row) is not None:
            handled[index] = desk.created_from(message, row)  # refused, the row left as it is
        elif S(row.status) is S.requesting:  # ours now, or another consumer's (same key, same waybill)
            asking.append(index)
        elif S(row.status) in (S.waybill, S.cancelled):
            handled[index] = desk.created_from(message, row)  # answered from the row as it is
    results = run_all(
        [
            lambda row=rows[messages[i].redemption_id], user=messages[i].user_id: desk.ask(row, user)
            for i in asking
        ]
    )

    saves, reverts, failures = [], [], []
    for index, result in zip(asking, results, strict=True):
        row = rows[messages[index].redemption_id]
        if isinstance(result, Waybill):
            saves.append((index, row, result))
        elif isinstance(result, CarrierError) and not result.final:
            log.warning(
                "redemption %s: no waybill yet (%s); acked without answering, the relay will send it again",
                row.redemption_id,
                result.message,
                extra={"redemption_id": row.redemption_id},
            )
            reverts.append(row.id)
            handled[index] = Handled("carrier_unreachable")
        elif isinstance(result, CredexError) and not isinstance(result, Unavailable | CarrierError):
            failures.append((index, row, reason_of(result)))
        elif isinstance(result, CarrierError):
            log.warning(
                "redemption %s: the carrier refused the shipment: %s",
                row.redemption_id,
                reason_of(result),
                extra={"redemption_id": row.redemption_id},
            )
            failures.append((index, row, reason_of(result)))
        else:
            raise result  # the database or a bug: the batch fails and comes back

    def record(session, with_saves: bool) -> tuple[set[int], dict[int, object]]:
        """The reverts, the final refusals (one by one: rare) and the waybills (one statement);
        returns the indexes of the refusals kept, and the rows that took their waybill by id."""
        for row_id in reverts:
            shipments.move(session, row_id, from_=(S.requesting,), to=S.requested, now=now)
        refused = {
            index
            for index, row, reason in failures
            if shipments.move(session, row.id, from_=OPEN, to=S.failed, now=now, reason=reason)
        }
        saved = (
            shipments.save_waybills(session, [(row.id, w) for _, row, w in saves], now=now)
            if with_saves
            else {}
        )
        return refused, saved

    try:
        refused, saved = desk.write(lambda session: record(session, True))
    except IntegrityError:  # a number another request holds: each waybill settled on its own
        refused, saved = desk.write(lambda session: record(session, False))
    for index, row, reason in failures:
        if index in refused:  # the body names the redemption only: the row as read will do
            handled[index] = answers.failed(messages[index].message_id, row, reason, now=desk.clock())
    for index, row, waybill in saves:
        after = saved.get(row.id)
        if after is not None:
            log_waybill(row, waybill)
            handled[index] = desk.settle(messages[index], after, waybill)
    for index, message in enumerate(messages):
        if handled[index] is None:  # a race lost, a duplicate number, a row in no plain state
            handled[index] = desk.created_from(message, desk.read_of(message.redemption_id))
    return [
        Handled(h.outcome, h.answer, h.created or rows[m.redemption_id].id in created, h.waybill)
        for h, m in zip(handled, messages, strict=True)
    ]
