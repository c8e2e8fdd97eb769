"""The row state machine of docs/redemptions.md ("The warehouse serialises create and cancel on
one row"): what a ``redemption.created`` or a ``redemption.cancelled`` does to its shipment
request, what it asks the carrier, and the answer the warehouse publishes.

Every change of status is a conditional update (``shipments.move``) committed on its own before
the carrier is called or an answer is published, so that two consumers, a message delivered
twice, or create and cancel in either order meet on the row, and whoever loses a race reads the
row again and goes on from what it says. The one rule under it all: a waybill that is not the one
kept on a live row is cancelled at the carrier, so a cancelled redemption never keeps a live one.

The desk never publishes and never acks: it returns a ``Handled`` (the outcome, the answer to
publish or None) and the consumer publishes the answers, then acks. When the carrier cannot be
reached nothing is answered; the relay sends the message again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError

from credex.db.engine import session_for
from credex.db.models import ShipmentStatus, utcnow
from credex.errors import CredexError, Unavailable
from credex.logistics.model import CancelResult, CarrierError, Waybill
from credex.warehouse import shipments
from credex.warehouse.shipments import CancelMessage, RedemptionMessage

log = logging.getLogger("credex.warehouse")

S = ShipmentStatus
OPEN = (S.requested, S.requesting)  # a waybill may still be saved on the row
ROUNDS = 8  # races lost in a row before a message is left for the relay's next attempt
# What a message comes to, as the warehouse's report and metrics name it (`invalid`: malformed,
# dropped by the consumer before it reaches the desk).
OUTCOMES = ("requested", "cancelled", "refused", "failed", "carrier_unreachable", "deferred", "invalid")


@dataclass(frozen=True)
class Answer:
    kind: str  # "requested", "cancelled" or "failed": the routing key is shipments.ANSWER_KEYS[kind]
    body: bytes
    correlation_id: str


@dataclass(frozen=True)
class Handled:
    """What one message came to. ``outcome`` (the metrics' names): requested, cancelled, refused,
    failed, carrier_unreachable, deferred (another consumer is asking the carrier right now)."""

    outcome: str
    answer: Answer | None = None
    created: bool = False  # this message wrote the shipment request
    waybill: bool = False  # this message got a waybill from the carrier


def _reason_of(error: BaseException) -> str:
    if isinstance(error, CarrierError):
        return f"{error.reason}: {error.message}"[:1000]
    return getattr(error, "message", str(error))[:1000]


class ShippingDesk:
    """One consumer's hands on the shipment table and the carrier. Safe to use from several threads
    at once for different redemptions (and, through the row's status, for the same one)."""

    def __init__(
        self,
        database_url: str,
        carrier,
        *,
        requesting_lease: timedelta = timedelta(seconds=120),
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.database_url = database_url
        self.carrier = carrier
        # A row left `requesting` this long is taken to be orphaned by a consumer that died: a
        # cancel asks the carrier itself instead of waiting for the create's next delivery.
        self.requesting_lease = requesting_lease
        self.clock = clock

    # --- the database, one short transaction at a time --------------------------------------------

    def _write(self, work: Callable):
        with session_for(self.database_url, write=True) as session:
            result = work(session)
            session.commit()
        return result

    def _read(self, shipment_id: int):
        with session_for(self.database_url) as session:
            row = shipments.request_by_id(session, shipment_id)
            session.rollback()
        return row

    def _move(self, row, to: ShipmentStatus, from_: tuple[ShipmentStatus, ...], **values) -> bool:
        now = self.clock()
        return self._write(
            lambda session: shipments.move(session, row.id, from_=from_, to=to, now=now, **values)
        )

    def _save_waybill(self, row, waybill: Waybill) -> str:
        """Keep the waybill on the row: "saved", "duplicate" (the carrier's number is already on
        another request of that carrier), or "lost" (the row is not open any more)."""
        try:
            moved = self._move(
                row,
                S.waybill,
                OPEN,
                carrier=waybill.carrier,
                express_no=waybill.express_no,
                carrier_shipment_id=waybill.shipment_id,
                reason=None,
            )
        except IntegrityError:
            return "duplicate"
        if moved:
            log.info(
                "redemption %s: waybill %s %s",
                row.redemption_id,
                waybill.carrier,
                waybill.express_no,
                extra={"redemption_id": row.redemption_id, "express_no": waybill.express_no},
            )
        return "saved" if moved else "lost"

    def _holder_of(self, waybill: Waybill) -> int | None:
        table = shipments.shipment_table
        with session_for(self.database_url) as session:
            found = session.execute(
                select(table.c.id).where(
                    table.c.carrier == waybill.carrier, table.c.express_no == waybill.express_no
                )
            ).scalar()
            session.rollback()
        return found

    # --- the carrier ----------------------------------------------------------------------------------

    def _ask(self, row, recipient: str | None = None) -> Waybill:
        """The waybill of the row's key: the same key with the same content gets the same waybill."""
        return self.carrier.create_shipment(
            idempotency_key=row.idempotency_key,
            order_ref=f"redemption-{row.redemption_id}",
            recipient={"name": row.recipient or recipient or "", "phone": "", "address": row.address},
            items=[{"sku": row.sku, "quantity": row.quantity}],
        )

    def _void(self, shipment_id: str, key: str) -> CancelResult:
        return self.carrier.cancel_shipment(shipment_id, idempotency_key=f"cancel-{key}"[:128])

    def _void_stray(self, row, waybill: Waybill) -> bool:
        """Cancel at the carrier a waybill that no live row keeps; whether the carrier has it voided
        (or it is already with the carrier: nothing more can be done, a person must look)."""
        try:
            result = self._void(waybill.shipment_id, row.idempotency_key or str(row.redemption_id))
        except CarrierError as error:
            if not error.final:
                log.warning(
                    "redemption %s: waybill %s %s could not be cancelled yet (%s)",
                    row.redemption_id,
                    waybill.carrier,
                    waybill.express_no,
                    error.message,
                    extra={"redemption_id": row.redemption_id, "express_no": waybill.express_no},
                )
                return False
            log.error(
                "redemption %s: the carrier refused to cancel waybill %s: %s",
                row.redemption_id,
                waybill.express_no,
                error.message,
                extra={"redemption_id": row.redemption_id, "express_no": waybill.express_no},
            )
            return True
        if not result.cancelled:
            log.error(
                "redemption %s: waybill %s %s was picked up before it could be cancelled: %s",
                row.redemption_id,
                waybill.carrier,
                waybill.express_no,
                result.detail,
                extra={"redemption_id": row.redemption_id, "express_no": waybill.express_no},
            )
        return True

    # --- answers --------------------------------------------------------------------------------------

    def _requested(self, message_id: str, row) -> Handled:
        body = shipments.confirmation_body(row, message_id=message_id, now=self.clock())
        return Handled("requested", Answer("requested", body, message_id))

    def _cancel_answer(self, message_id: str, row, outcome: str, reason: str) -> Handled:
        body = shipments.answer_cancelled_body(
            row.redemption_id, message_id=message_id, outcome=outcome, reason=reason, now=self.clock()
        )
        return Handled(outcome, Answer("cancelled", body, message_id))

    def _failed(self, message_id: str, row, reason: str) -> Handled:
        body = shipments.answer_failed_body(
            row.redemption_id, message_id=message_id, reason=reason, now=self.clock()
        )
        return Handled("failed", Answer("failed", body, message_id))

    # --- redemption.created ---------------------------------------------------------------------------

    def created(self, message: RedemptionMessage) -> Handled:
        now = self.clock()
        row, created = self._write(lambda session: shipments.open_request(session, message, now=now))
        handled = self._created(message, row)
        if created:
            handled = Handled(handled.outcome, handled.answer, True, handled.waybill)
        return handled

    def _created(self, message: RedemptionMessage, row) -> Handled:
        for _ in range(ROUNDS):
            status = S(row.status)
            if status is S.cancelled:
                return self._cancel_answer(message.message_id, row, "cancelled", row.reason or "cancelled")
            if status is S.waybill:
                return self._requested(message.message_id, row)
            if status in (S.requested, S.failed):  # failed: the relay sends it again after `relay retry`
                recipient = func.coalesce(
                    shipments.shipment_table.c.recipient, bindparam("recipient_now", message.user_id)
                )
                if not self._move(row, S.requesting, (status,), asked_at=self.clock(), recipient=recipient):
                    row = self._read(row.id)
                    continue
                row = self._read(row.id)
            # requesting: ours now, or a redelivery while another consumer asks (same key, same waybill)
            outcome = self._get_waybill(row, message.user_id)
            if isinstance(outcome, Handled):
                return outcome
            if isinstance(outcome, str):  # a final refusal, kept on the row as `failed`
                return self._failed(message.message_id, self._read(row.id), outcome)
            waybill, _ = outcome
            row = self._read(row.id)
            settled = self._settle(message, row, waybill)
            if settled is not None:
                return settled
        return Handled("deferred")

    def _settle(self, message: RedemptionMessage, row, waybill: Waybill) -> Handled | None:
        """The answer to a create whose waybill is in hand, the row as read after saving it; None
        when the row is open again (save it again)."""
        if self._keeps(row, waybill):
            handled = self._requested(message.message_id, row)
            return Handled(handled.outcome, handled.answer, waybill=True)
        if S(row.status) in OPEN:
            return None
        # Cancelled or failed while we asked: the waybill in hand must not stay live.
        if not self._void_stray(row, waybill):
            return Handled("carrier_unreachable")
        if S(row.status) is S.failed:
            return self._failed(message.message_id, row, row.reason or "refused by the carrier")
        if S(row.status) is S.cancelled:
            return self._cancel_answer(message.message_id, row, "cancelled", row.reason or "cancelled")
        return self._requested(message.message_id, row)  # it keeps another waybill: that one stands

    # --- many redemption.created at once --------------------------------------------------------------

    def created_many(self, messages: list[RedemptionMessage], run_all: Callable) -> list[Handled]:
        """The common case in bulk, one message per redemption: the requests written and claimed in
        one transaction, the carrier asked for all of them at once (``run_all(calls)`` runs the
        calls and returns their results or exceptions, in order), the waybills saved in one more.
        Whatever is not plain (a race lost, a duplicate number) goes through ``created`` one by
        one. Returns one Handled per message."""
        now = self.clock()

        def open_and_claim(session):
            created = shipments.open_requests(session, messages, now=now)
            rows = shipments.requests_of(session, [m.redemption_id for m in messages])
            claimable = [row.id for row in rows.values() if S(row.status) in (S.requested, S.failed)]
            claimed = shipments.claim(session, claimable, now=now)
            return created, rows, claimed

        created, rows, claimed = self._write(open_and_claim)
        handled: list[Handled | None] = [None] * len(messages)
        asking: list[int] = []  # indexes of the messages whose row is being asked for
        for index, message in enumerate(messages):
            row = rows[message.redemption_id]
            if row.id in claimed or S(row.status) is S.requesting:
                asking.append(index)
            elif S(row.status) in (S.waybill, S.cancelled):
                handled[index] = self._created(message, row)  # answered from the row as it is
        results = run_all(
            [
                lambda row=rows[messages[i].redemption_id], user=messages[i].user_id: self._ask(row, user)
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
                    "redemption %s: no waybill yet (%s); acked without answering, "
                    "the relay will send it again",
                    row.redemption_id,
                    result.message,
                    extra={"redemption_id": row.redemption_id},
                )
                reverts.append(row.id)
                handled[index] = Handled("carrier_unreachable")
            elif isinstance(result, CredexError) and not isinstance(result, Unavailable | CarrierError):
                failures.append((index, row, _reason_of(result)))
            elif isinstance(result, CarrierError):
                log.warning(
                    "redemption %s: the carrier refused the shipment: %s",
                    row.redemption_id,
                    _reason_of(result),
                    extra={"redemption_id": row.redemption_id},
                )
                failures.append((index, row, _reason_of(result)))
            else:
                raise result  # the database or a bug: the batch fails and comes back

        def record(session, with_saves: bool):
            moved = {}
            for row_id in reverts:
                shipments.move(session, row_id, from_=(S.requesting,), to=S.requested, now=now)
            for index, row, reason in failures:
                moved[index] = shipments.move(
                    session, row.id, from_=OPEN, to=S.failed, now=now, reason=reason
                )
            for index, row, waybill in saves if with_saves else ():
                moved[index] = shipments.move(
                    session,
                    row.id,
                    from_=OPEN,
                    to=S.waybill,
                    now=now,
                    carrier=waybill.carrier,
                    express_no=waybill.express_no,
                    carrier_shipment_id=waybill.shipment_id,
                    reason=None,
                )
            return moved

        try:
            moved = self._write(lambda session: record(session, True))
        except IntegrityError:  # a number another request holds: each waybill settled on its own
            moved = self._write(lambda session: record(session, False))
        after = self._read_many([m.redemption_id for m in messages]) if moved else {}
        for index, row, reason in failures:
            if moved.get(index):
                handled[index] = self._failed(messages[index].message_id, after[row.redemption_id], reason)
        for index, row, waybill in saves:
            if moved.get(index):
                log.info(
                    "redemption %s: waybill %s %s",
                    row.redemption_id,
                    waybill.carrier,
                    waybill.express_no,
                    extra={"redemption_id": row.redemption_id, "express_no": waybill.express_no},
                )
                handled[index] = self._settle(messages[index], after[row.redemption_id], waybill)
        for index, message in enumerate(messages):
            if handled[index] is None:  # a race lost, a duplicate number, a row in no plain state
                handled[index] = self._created(
                    message, self._read_many([message.redemption_id])[message.redemption_id]
                )
        return [
            Handled(h.outcome, h.answer, h.created or rows[m.redemption_id].id in created, h.waybill)
            for h, m in zip(handled, messages, strict=True)
        ]

    def _read_many(self, redemption_ids: list[int]) -> dict[int, object]:
        with session_for(self.database_url) as session:
            found = shipments.requests_of(session, redemption_ids)
            session.rollback()
        return found

    @staticmethod
    def _keeps(row, waybill: Waybill) -> bool:
        """Whether the row keeps this waybill as its live one."""
        return (
            S(row.status) is S.waybill
            and row.express_no == waybill.express_no
            and row.carrier == waybill.carrier
        )

    def _get_waybill(self, row, recipient: str | None):
        """Ask the carrier for the row's waybill and save it. Returns (waybill, got) when a waybill
        was had (saved on the row, or the row moved on meanwhile: the caller reads it again), the
        reason (str) of a final refusal now kept as `failed`, or a Handled to return as it is."""
        try:
            waybill = self._ask(row, recipient)
        except CarrierError as error:
            if not error.final:
                log.warning(
                    "redemption %s: no waybill yet (%s); acked without answering, "
                    "the relay will send it again",
                    row.redemption_id,
                    error.message,
                    extra={"redemption_id": row.redemption_id},
                )
                self._move(row, S.requested, (S.requesting,))
                return Handled("carrier_unreachable")
            reason = _reason_of(error)
            log.warning(
                "redemption %s: the carrier refused the shipment: %s",
                row.redemption_id,
                reason,
                extra={"redemption_id": row.redemption_id},
            )
            if self._move(row, S.failed, (S.requesting, S.requested), reason=reason):
                return reason
            return Handled("deferred")  # moved on meanwhile: the relay's next attempt finds out
        except Unavailable:  # not the carrier's: the database went away; the batch comes back
            raise
        except CredexError as error:  # a key the carrier client will not send: final
            reason = _reason_of(error)
            if self._move(row, S.failed, (S.requesting, S.requested), reason=reason):
                return reason
            return Handled("deferred")
        saved = self._save_waybill(row, waybill)
        if saved == "duplicate":
            return self._refuse_duplicate(row, waybill)
        return waybill, True

    def _refuse_duplicate(self, row, waybill: Waybill):
        """The carrier handed out a number another shipment request of that carrier holds: the
        waybill is cancelled at the carrier and the request fails (messaging.md, shipment.failed)."""
        holder = self._holder_of(waybill)
        reason = (
            f"the carrier issued {waybill.carrier} {waybill.express_no}, an express number shipment "
            f"request {holder} already holds"
        )
        log.error(
            "redemption %s: %s; cancelling that waybill",
            row.redemption_id,
            reason,
            extra={"redemption_id": row.redemption_id},
        )
        if not self._void_stray(row, waybill):
            self._move(row, S.requested, (S.requesting,))
            return Handled("carrier_unreachable")
        if self._move(row, S.failed, OPEN, reason=reason):
            return reason
        return Handled("deferred")

    # --- redemption.cancelled -------------------------------------------------------------------------

    def cancelled(self, message: CancelMessage) -> Handled:
        now = self.clock()
        row, written = self._write(lambda session: shipments.write_tombstone(session, message, now=now))
        if written:
            log.info(
                "redemption %s: cancelled before its shipment was asked for",
                message.redemption_id,
                extra={"redemption_id": message.redemption_id},
            )
            return self._cancel_answer(message.message_id, row, "cancelled", message.reason)
        for _ in range(ROUNDS):
            status = S(row.status)
            if status is S.cancelled:
                return self._cancel_answer(message.message_id, row, "cancelled", row.reason or message.reason)
            if status is S.failed or (status is S.requested and row.asked_at is None):
                # Nothing was ever issued (never asked, or refused for good): no carrier call.
                if self._move(row, S.cancelled, (status,), reason=message.reason):
                    return self._cancel_answer(message.message_id, row, "cancelled", message.reason)
                row = self._read(row.id)
                continue
            if status is S.waybill:
                return self._cancel_waybill(message, row)
            # requested after a carrier call, or requesting: a waybill may exist under the key
            if status is S.requesting:
                if self.clock() - row.updated_at < self.requesting_lease:
                    return Handled("deferred")  # the consumer asking will save it; the cancel comes again
                if not self._move(row, S.requesting, (S.requesting,), seen_at=row.updated_at):
                    row = self._read(row.id)
                    continue
            elif not self._move(row, S.requesting, (S.requested,), asked_at=self.clock()):
                row = self._read(row.id)
                continue
            row = self._read(row.id)
            outcome = self._get_waybill(row, None)
            if isinstance(outcome, str):
                # Refused for good: no waybill exists under this key; the request is simply cancelled.
                if self._move(row, S.cancelled, (S.failed,), reason=message.reason):
                    return self._cancel_answer(message.message_id, row, "cancelled", message.reason)
                row = self._read(row.id)
                continue
            if isinstance(outcome, Handled):
                return outcome
            waybill, _ = outcome
            row = self._read(row.id)  # keeping it: cancelled at the carrier next round
            if (
                not self._keeps(row, waybill)
                and S(row.status) not in OPEN
                and not self._void_stray(row, waybill)
            ):
                return Handled("carrier_unreachable")
        return Handled("deferred")

    def _cancel_waybill(self, message: CancelMessage, row) -> Handled:
        """Void the row's waybill at the carrier: "cancelled", or "refused" once the parcel is with
        the carrier; nothing answered while the carrier cannot be reached."""
        shipment_id = row.carrier_shipment_id
        try:
            if shipment_id is None:
                # Saved before credex kept the carrier's id: the same key and content give it back.
                if row.recipient is None:
                    reason = (
                        f"waybill {row.carrier} {row.express_no} predates credex keeping the carrier's "
                        "shipment id and its recipient is unknown: cancel it at the carrier by hand"
                    )
                    return self._cancel_answer(message.message_id, row, "refused", reason)
                shipment_id = self._ask(row).shipment_id
            result = self._void(shipment_id, row.idempotency_key)
        except CarrierError as error:
            if not error.final:
                log.warning(
                    "redemption %s: waybill %s not cancelled yet (%s); the relay will send the cancel again",
                    row.redemption_id,
                    row.express_no,
                    error.message,
                    extra={"redemption_id": row.redemption_id, "express_no": row.express_no},
                )
                return Handled("carrier_unreachable")
            reason = f"the carrier would not cancel waybill {row.express_no}: {_reason_of(error)}"
            return self._cancel_answer(message.message_id, row, "refused", reason)
        if not result.cancelled:
            reason = f"waybill {row.carrier} {row.express_no} was already picked up" + (
                f": {result.detail}" if result.detail else ""
            )
            now = self.clock()
            self._write(lambda session: shipments.note_reason(session, row.id, S.waybill, reason, now=now))
            return self._cancel_answer(message.message_id, row, "refused", reason)
        if not self._move(row, S.cancelled, (S.waybill,), reason=message.reason):
            row = self._read(row.id)  # another consumer cancelled it too: the same waybill
        log.info(
            "redemption %s: waybill %s cancelled at the carrier",
            row.redemption_id,
            row.express_no,
            extra={"redemption_id": row.redemption_id, "express_no": row.express_no},
        )
        return self._cancel_answer(message.message_id, row, "cancelled", message.reason)
