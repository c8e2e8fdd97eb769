"""The tables. Status values live beside the tables that hold them.

(A little over 400 lines on purpose: every table of both databases with its constraints and
indexes, and why each is there, in one place.)
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum, StrEnum

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    literal_column,
)
from sqlmodel import Field, SQLModel

# SQLite only autoincrements an INTEGER PRIMARY KEY; Postgres gets a 64-bit identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timestamps stored in UTC and always read back with an offset."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None:
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            value = value.astimezone(UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None:
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value


def _ts(nullable: bool = False, index: bool = False) -> Column:
    return Column(UTCDateTime(), nullable=nullable, index=index)


def _points(nullable: bool = False) -> Column:
    return Column(BigInteger(), nullable=nullable)


class EntryKind(StrEnum):
    purchase = "purchase"
    review = "review"
    grant = "grant"
    redemption = "redemption"
    refund = "refund"  # a refunded order's points taken back
    settle = "settle"  # pending points made available
    expiry = "expiry"  # what was left of an award, written off
    redemption_refund = "redemption_refund"  # a cancelled or returned redemption's points back (ref: its id)


class LotState(StrEnum):
    pending = "pending"  # waiting out the return window: not spendable
    available = "available"  # in the balance, remaining > 0
    used = "used"  # nothing left: spent, clawed back or paid to debt
    expired = "expired"  # what was left was written off by an expiry entry


class RedemptionStatus(StrEnum):
    """docs/redemptions.md: who moves a redemption from each status, and where to."""

    pending = "pending"  # its redemption.created message is on its way; no waybill yet
    shipping = "shipping"  # the carrier issued a waybill
    cancelling = "cancelling"  # a redemption.cancelled message is on its way to the warehouse
    cancelled = "cancelled"  # final: no parcel leaves; points and stock are back
    delivered = "delivered"  # final: the carrier says delivered
    returned = "returned"  # final: back with the sender; points and stock are back
    exception = "exception"  # the carrier refused the shipment for good (shipment.failed)


# A cancel is refused from these (not_cancellable), and is a repeat from those.
FINAL_DELIVERIES = (RedemptionStatus.delivered.value, RedemptionStatus.returned.value)
CANCEL_UNDERWAY = (RedemptionStatus.cancelling.value, RedemptionStatus.cancelled.value)


class EventSource(StrEnum):
    """Who changed a redemption's status (redemption_event.source)."""

    create = "create"
    relay = "relay"
    warehouse = "warehouse"
    cancel = "cancel"
    sync = "sync"


class StockKind(StrEnum):
    set = "set"  # catalog add/update set the stock (delta: new - old; unlimited counts as 0)
    redeem = "redeem"  # a redemption took it
    cancel = "cancel"  # a cancelled redemption gave it back
    ret = "return"  # a returned parcel gave it back


class MessageState(StrEnum):
    pending = "pending"
    sent = "sent"
    confirmed = "confirmed"
    dead = "dead"
    cancelled = "cancelled"  # withdrawn: its redemption was cancelled, it will never be published again


class ShipmentStatus(StrEnum):
    """A shipment request's row state machine (docs/redemptions.md), changed only by conditional
    updates."""

    requested = "requested"  # written; no waybill yet (a carrier call may have been made: asked_at)
    requesting = "requesting"  # a consumer is asking the carrier for the waybill right now
    waybill = "waybill"  # the carrier issued a waybill, kept on the row
    cancelled = "cancelled"  # no parcel will leave: never asked, or the waybill voided at the carrier
    failed = "failed"  # the carrier refused the shipment for good (shipment.failed)


class ShipmentType(int, Enum):
    purchase = 1
    redemption = 2


def _delta() -> Column:
    return Column(BigInteger(), nullable=False, default=0, server_default="0")


class Account(SQLModel, table=True):
    """``balance`` is what can be spent; ``pending`` waits for its return window; ``debt`` is what
    a refund could not take back, paid out of later points before they reach the balance."""

    __tablename__ = "account"
    __table_args__ = (
        CheckConstraint("balance >= 0", name="ck_account_balance_nonnegative"),
        CheckConstraint("pending >= 0", name="ck_account_pending_nonnegative"),
        CheckConstraint("debt >= 0", name="ck_account_debt_nonnegative"),
        {"postgresql_with": {"fillfactor": 50}},  # room for HOT updates: migration 0013
    )

    user_id: str = Field(sa_column=Column(String(128), primary_key=True))
    balance: int = Field(default=0, sa_column=_points())
    earned: int = Field(default=0, sa_column=_points())
    redeemed: int = Field(default=0, sa_column=_points())
    pending: int = Field(default=0, sa_column=_delta())
    debt: int = Field(default=0, sa_column=_delta())
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())


class LedgerEntry(SQLModel, table=True):
    """One change of one balance. ``ref`` is unique per kind: it makes awards idempotent.

    ``points``, ``pending`` and ``debt`` are this entry's effect on the account's balance, pending
    points and debt: each of the three is the sum of its column over the account's ledger."""

    __tablename__ = "ledger_entry"
    __table_args__ = (
        UniqueConstraint("kind", "ref", name="uq_ledger_entry_kind_ref"),
        # On SQLite (user_id) alone (migration 0014): id is the rowid every index entry ends with.
        Index("ix_ledger_entry_user_id_id", "user_id", "id"),
        # Partial, WHERE source_id IS NOT NULL (migration 0011): grants and purchases have none.
        Index("ix_ledger_entry_source_id", "source_id"),
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    # A foreign key on SQLite; on Postgres the account's trigger instead (migration 0016), as for
    # point_lot.user_id: a per-row check there cost bulk grants 40% of the server's time.
    user_id: str = Field(sa_column=Column(String(128), ForeignKey("account.user_id"), nullable=False))
    kind: str = Field(sa_column=Column(String(32), nullable=False))
    ref: str = Field(sa_column=Column(String(255), nullable=False))
    points: int = Field(sa_column=_points())
    balance: int = Field(sa_column=_points())  # the balance right after this entry
    detail: str | None = Field(default=None, sa_column=Column(String(255)))  # what made the points
    operator: str = Field(sa_column=Column(String(128), nullable=False))
    reason: str | None = Field(default=None, sa_column=Column(Text()))
    created_at: datetime = Field(sa_column=_ts())
    pending: int = Field(default=0, sa_column=_delta())
    debt: int = Field(default=0, sa_column=_delta())
    # The entry this one acts on: a refund's purchase, a settled or expired award.
    source_id: int | None = Field(default=None, sa_column=Column(BigInteger(), nullable=True))


class PointLot(SQLModel, table=True):
    """The points of one award, spent oldest first. The available lots' ``remaining`` add up to
    the balance, the pending lots' to the pending points."""

    __tablename__ = "point_lot"
    __table_args__ = (
        CheckConstraint("remaining >= 0 AND remaining <= points", name="ck_point_lot_remaining"),
        UniqueConstraint("entry_id", name="uq_point_lot_entry_id"),
        # Partial (migration 0009): each indexes only the lots its queries read, so that a plain
        # grant (available, never expiring) pays for one of the three. Their WHERE clauses are
        # LOT_AVAILABLE_SQL, LOT_PENDING_SQL and LOT_EXPIRABLE_SQL below; not said here, for the
        # reason given at outbox_message. A query must say the predicate in so many words
        # (``lot_state_is``): a bound parameter proves nothing to a planner. The available lots
        # are keyed on the shopper alone (migration 0014): spending sorts a shopper's few.
        Index("ix_point_lot_available", "user_id"),  # spending, oldest first
        Index("ix_point_lot_pending", "user_id", "available_at", "id"),  # award settle
        Index("ix_point_lot_expirable", "expires_at", "user_id"),  # award expire
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    # A foreign key on SQLite, the account's trigger on Postgres: see ledger_entry.user_id.
    user_id: str = Field(sa_column=Column(String(128), ForeignKey("account.user_id"), nullable=False))
    # The award that made the points (none for the balances carried over by migration 0002).
    entry_id: int | None = Field(default=None, sa_column=Column(BigInteger(), nullable=True))
    points: int = Field(sa_column=_points())
    remaining: int = Field(sa_column=_points())
    state: str = Field(sa_column=Column(String(16), nullable=False))
    available_at: datetime = Field(sa_column=_ts())
    expires_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    created_at: datetime = Field(sa_column=_ts())


# The predicates of point_lot's partial indexes, written out for the migration and the queries.
LOT_AVAILABLE_SQL = "state = 'available'"
LOT_PENDING_SQL = "state = 'pending'"
LOT_EXPIRABLE_SQL = "state = 'available' AND expires_at IS NOT NULL"


def lot_state_is(state: LotState):
    """``point_lot.state = '<state>'`` with the value written out, so that a planner can match
    it to a partial index's WHERE."""
    return PointLot.__table__.c.state == literal_column(f"'{LotState(state).value}'")


class LotUse(SQLModel, table=True):
    """Points taken out of a lot by one ledger entry: spent, clawed back, paid to debt or expired;
    or put back into it (negative) by a redemption_refund."""

    __tablename__ = "lot_use"
    # Negative: points put back into the lot by a redemption_refund (migration 0004).
    __table_args__ = (
        CheckConstraint("points <> 0", name="ck_lot_use_points_nonzero"),
        # A refund reads the lots its redemption took from (migration 0009).
        Index("ix_lot_use_entry_id", "entry_id"),
    )

    lot_id: int = Field(sa_column=Column(BigInteger(), ForeignKey("point_lot.id"), primary_key=True))
    entry_id: int = Field(sa_column=Column(BigInteger(), ForeignKey("ledger_entry.id"), primary_key=True))
    points: int = Field(sa_column=_points())


class CatalogItem(SQLModel, table=True):
    __tablename__ = "catalog_item"
    __table_args__ = (
        CheckConstraint("stock IS NULL OR stock >= 0", name="ck_catalog_item_stock_nonnegative"),
        CheckConstraint("points > 0", name="ck_catalog_item_points_positive"),
    )

    sku: str = Field(sa_column=Column(String(64), primary_key=True))
    name: str = Field(sa_column=Column(String(255), nullable=False))
    points: int = Field(sa_column=_points())
    stock: int | None = Field(default=None, sa_column=_points(nullable=True))  # None: unlimited
    active: bool = Field(default=True)
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())


class Redemption(SQLModel, table=True):
    __tablename__ = "redemption"
    __table_args__ = (Index("ix_redemption_user_id_id", "user_id", "id"),)

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    request_id: str | None = Field(default=None, sa_column=Column(String(255), unique=True))
    user_id: str = Field(sa_column=Column(String(128), ForeignKey("account.user_id"), nullable=False))
    sku: str = Field(sa_column=Column(String(64), ForeignKey("catalog_item.sku"), nullable=False))
    quantity: int = Field(sa_column=Column(Integer(), nullable=False))
    points: int = Field(sa_column=_points())
    balance: int = Field(sa_column=_points())  # the balance right after the redemption
    address: str = Field(sa_column=Column(Text(), nullable=False))
    status: str = Field(
        default=RedemptionStatus.pending.value, sa_column=Column(String(16), nullable=False, index=True)
    )
    message_id: str = Field(sa_column=Column(String(36), nullable=False))
    carrier: str | None = Field(default=None, sa_column=Column(String(64)))
    express_no: str | None = Field(default=None, sa_column=Column(String(64)))
    operator: str = Field(sa_column=Column(String(128), nullable=False))
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())
    # The carrier's last normalised status, and when the carrier gave it (its last answer).
    delivery_status: str | None = Field(default=None, sa_column=Column(String(32)))
    delivery_checked_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    # The carrier's checkpoints with that status (JSON, newest first), for `track` while fresh.
    delivery_checkpoints: str | None = Field(default=None, sa_column=Column(Text(), nullable=True))
    # When track sync (or track) last asked, answered or not: the claim that keeps concurrent syncs
    # from asking twice within CREDEX_TRACK_MIN_INTERVAL (index (status, delivery_asked_at)).
    delivery_asked_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class RedemptionEvent(SQLModel, table=True):
    """One change of a redemption's status: who made it (``source``) and why (``detail``)."""

    __tablename__ = "redemption_event"
    __table_args__ = (Index("ix_redemption_event_redemption_id_id", "redemption_id", "id"),)

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    redemption_id: int = Field(sa_column=Column(BigId, ForeignKey("redemption.id"), nullable=False))
    at: datetime = Field(sa_column=_ts())
    status: str = Field(sa_column=Column(String(16), nullable=False))
    source: str = Field(sa_column=Column(String(16), nullable=False))
    detail: str | None = Field(default=None, sa_column=Column(Text()))


class StockMovement(SQLModel, table=True):
    """One change of a gift's stock, with who made it: a gift's stock is the sum of its deltas
    (unlimited counting as 0)."""

    __tablename__ = "stock_movement"
    __table_args__ = (
        Index("ix_stock_movement_sku_id", "sku", "id"),
        Index("ix_stock_movement_ref", "ref"),
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    sku: str = Field(sa_column=Column(String(64), ForeignKey("catalog_item.sku"), nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    delta: int = Field(sa_column=_points())
    stock_after: int | None = Field(default=None, sa_column=_points(nullable=True))  # None: unlimited
    ref: str | None = Field(default=None, sa_column=Column(String(255)))  # the redemption id
    operator: str = Field(sa_column=Column(String(128), nullable=False))
    at: datetime = Field(sa_column=_ts())


class OutboxMessage(SQLModel, table=True):
    """A message to deliver, written in the same transaction as what it announces."""

    __tablename__ = "outbox_message"
    # The relay's claim reads the oldest due unconfirmed messages off the front of this index. It
    # is partial, WHERE state IN ('pending', 'sent') (migration 0003): saying so here would import
    # the Postgres dialect on every start of the command line, SQLite included.
    __table_args__ = (Index("ix_outbox_message_due", "next_attempt_at", "id"),)

    id: str = Field(sa_column=Column(String(36), primary_key=True))  # a UUID, the AMQP message_id
    # A redemption's messages: its redemption.created (one, a partial unique index of migration
    # 0004) and its redemption.cancelled ones.
    redemption_id: int | None = Field(
        default=None, sa_column=Column(BigId, ForeignKey("redemption.id"), index=True)
    )
    routing_key: str = Field(sa_column=Column(String(255), nullable=False))
    body: str = Field(sa_column=Column(Text(), nullable=False))
    state: str = Field(default=MessageState.pending.value, sa_column=Column(String(16), nullable=False))
    attempts: int = Field(default=0, sa_column=Column(Integer(), nullable=False))
    next_attempt_at: datetime = Field(sa_column=_ts())
    claimed_by: str | None = Field(default=None, sa_column=Column(String(64)))
    claimed_until: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    # When a relay first claimed it (SQLite: its lease, committed before any publish; Postgres:
    # its first record, the claim itself being outbox_claim_mark's); never cleared. A message
    # without it, created after that mark, was never handed to the broker: `redeem cancel` may
    # withdraw it on the spot.
    first_claimed_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    last_error: str | None = Field(default=None, sa_column=Column(Text()))
    sent_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    confirmed_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    created_at: datetime = Field(sa_column=_ts())


class OutboxClaimMark(SQLModel, table=True):
    """One row (id 1): every message a relay may have handed to the broker without a claim
    written on its own row was created at or before ``through`` (Postgres relays: their claims
    are row locks, and before publishing a batch a relay moves this mark to the batch's newest
    fresh message, durably; migration 0012). `redeem cancel` withdraws a message on the spot
    only if it was created after the mark."""

    __tablename__ = "outbox_claim_mark"

    id: int = Field(sa_column=Column(Integer(), primary_key=True, autoincrement=False))
    through: datetime = Field(sa_column=_ts())


class ShipmentRequest(SQLModel, table=True):
    """The warehouse's side. The UNIQUE redemption id turns a replayed message into a look-up; the
    UNIQUE (carrier, express number) refuses a waybill number a carrier hands out twice.

    A tombstone is a ``cancelled`` row written by a cancel that came before its redemption's
    create: it has no sku, quantity, address or key, and makes the create answer "cancelled"."""

    __tablename__ = "shipment_request"
    __table_args__ = (
        UniqueConstraint("carrier", "express_no", name="uq_shipment_request_carrier_express_no"),
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    type: int = Field(default=ShipmentType.redemption.value, sa_column=Column(Integer(), nullable=False))
    redemption_id: int = Field(sa_column=Column(BigInteger(), nullable=False, unique=True))
    message_id: str | None = Field(default=None, sa_column=Column(String(36), nullable=True))
    sku: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    quantity: int | None = Field(default=None, sa_column=Column(Integer(), nullable=True))
    address: str | None = Field(default=None, sa_column=Column(Text(), nullable=True))
    carrier: str | None = Field(default=None, sa_column=Column(String(64)))
    express_no: str | None = Field(default=None, sa_column=Column(String(64)))
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())
    status: str = Field(
        default=ShipmentStatus.requested.value,
        sa_column=Column(String(16), nullable=False, server_default=ShipmentStatus.requested.value),
    )
    # The carrier's Idempotency-Key: the redemption message's id (rows older than migration 0005
    # keep the key they were asked with, ``redemption-<id>``).
    idempotency_key: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    recipient: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))  # the user id
    carrier_shipment_id: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    asked_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))  # first carrier call
    reason: str | None = Field(default=None, sa_column=Column(Text(), nullable=True))


metadata = SQLModel.metadata
