"""The row state machine of docs/redemptions.md ("The warehouse serialises create and cancel on
one row"): what a ``redemption.created`` or a ``redemption.cancelled`` does to its shipment
request, what it asks the carrier, and the answer the warehouse publishes.

Every change of status is a conditional update (``shipments.move``) committed on its own before
the carrier is called or an answer is published, so that two consumers, a message delivered
twice, or create and cancel in either order meet on the row, and whoever loses a race reads the
row again and goes on from what it says. The one rule under it all: a waybill that is not the one
kept on a live row is cancelled at the carrier, so a cancelled redemption never keeps a live one.

(A little over 400 lines on purpose: create and cancel meet on one row, and their state machine
reads best in one place.)

The desk never publishes and never acks: it returns a ``Handled`` (the outcome, the answer to
publish or None) and the consumer publishes the answers, then acks. When the carrier cannot be
reached nothing is answered; the relay sends the message again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError

from credex.db.engine import session_for
from credex.db.models import ShipmentStatus, utcnow
from credex.errors import CredexError, Unavailable
from credex.logistics.model import CancelResult, CarrierError, Waybill, cancel_key
from credex.warehouse import answers, shipments
from credex.warehouse.answers import Handled, reason_of
from credex.warehouse.messages import CancelMessage, RedemptionMessage

log = logging.getLogger("credex.warehouse")


def log_waybill(row, waybill: Waybill) -> None:
    """The line a saved waybill leaves in the warehouse's log (one create or a batch's)."""
    log.info(
        "redemption %s: waybill %s %s",
        row.redemption_id,
        waybill.carrier,
        waybill.express_no,
        extra={"redemption_id": row.redemption_id, "express_no": waybill.express_no},
    )


S = ShipmentStatus
OPEN = (S.requested, S.requesting)  # a waybill may still be saved on the row
ROUNDS = 8  # races lost in a row before a message is left for the relay's next attempt


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

    def write(self, work: Callable):
        with session_for(self.database_url, write=True) as session:
            result = work(session)
            session.commit()
        return result

    def _read(self, shipment_id: int):
        with session_for(self.database_url) as session:
            row = shipments.request_by_id(session, shipment_id)
            session.rollback()
        return row

    def read_of(self, redemption_id: int):
        """The request of a redemption as it is now."""
        with session_for(self.database_url) as session:
            row = shipments.request_of(session, redemption_id)
            session.rollback()
        return row

    def _move(self, row, to: ShipmentStatus, from_: tuple[ShipmentStatus, ...], **values) -> bool:
        now = self.clock()
        return self.write(
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
            log_waybill(row, waybill)
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

    def ask(self, row, recipient: str | None = None) -> Waybill:
        """The waybill of the row's key: the same key with the same content gets the same waybill."""
        return self.carrier.create_shipment(
            idempotency_key=row.idempotency_key,
            order_ref=f"redemption-{row.redemption_id}",
            recipient={"name": row.recipient or recipient or "", "phone": "", "address": row.address},
            items=[{"sku": row.sku, "quantity": row.quantity}],
        )

    def _void(self, shipment_id: str, key: str) -> CancelResult:
        return self.carrier.cancel_shipment(shipment_id, idempotency_key=cancel_key(key))

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
        return answers.requested(message_id, row, now=self.clock())

    def _cancel_answer(self, message_id: str, row, outcome: str, reason: str) -> Handled:
        return answers.cancel_answer(message_id, row, outcome, reason, now=self.clock())

    def _failed(self, message_id: str, row, reason: str) -> Handled:
        return answers.failed(message_id, row, reason, now=self.clock())

    # --- redemption.created ---------------------------------------------------------------------------

    def created(self, message: RedemptionMessage) -> Handled:
        now = self.clock()
        row, created = self.write(lambda session: shipments.open_request(session, message, now=now))
        handled = self.created_from(message, row)
        if created:
            handled = Handled(handled.outcome, handled.answer, True, handled.waybill)
        return handled

    def created_from(self, message: RedemptionMessage, row) -> Handled:
        """A create taken on from its row as last read, whatever its status."""
        reason = answers.not_its_create(message, row)  # what opened a row never changes
        if reason is not None:
            return answers.refuse_create(message, row, reason, now=self.clock())
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
            settled = self.settle(message, row, waybill)
            if settled is not None:
                return settled
        return Handled("deferred")

    def settle(self, message: RedemptionMessage, row, waybill: Waybill) -> Handled | None:
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
            waybill = self.ask(row, recipient)
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
            reason = reason_of(error)
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
            reason = reason_of(error)
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
        row, written = self.write(lambda session: shipments.write_tombstone(session, message, now=now))
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
                shipment_id = self.ask(row).shipment_id
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
            reason = f"the carrier would not cancel waybill {row.express_no}: {reason_of(error)}"
            return self._cancel_answer(message.message_id, row, "refused", reason)
        if not result.cancelled:
            reason = f"waybill {row.carrier} {row.express_no} was already picked up" + (
                f": {result.detail}" if result.detail else ""
            )
            now = self.clock()
            self.write(lambda session: shipments.note_reason(session, row.id, S.waybill, reason, now=now))
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
