"""The tables. Status values live beside the tables that hold them."""

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


class LotState(StrEnum):
    pending = "pending"  # waiting out the return window: not spendable
    available = "available"  # in the balance, remaining > 0
    used = "used"  # nothing left: spent, clawed back or paid to debt
    expired = "expired"  # what was left was written off by an expiry entry


class RedemptionStatus(StrEnum):
    pending = "pending"
    shipping = "shipping"


class MessageState(StrEnum):
    pending = "pending"
    sent = "sent"
    confirmed = "confirmed"
    dead = "dead"


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
        Index("ix_ledger_entry_user_id_id", "user_id", "id"),
        Index("ix_ledger_entry_source_id", "source_id"),
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
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
        Index("ix_point_lot_user_id_state_available_at", "user_id", "state", "available_at", "id"),
        Index("ix_point_lot_state_available_at", "state", "available_at"),
        Index("ix_point_lot_state_expires_at", "state", "expires_at"),
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    user_id: str = Field(sa_column=Column(String(128), ForeignKey("account.user_id"), nullable=False))
    # The award that made the points (none for the balances carried over by migration 0002).
    entry_id: int | None = Field(default=None, sa_column=Column(BigInteger(), nullable=True))
    points: int = Field(sa_column=_points())
    remaining: int = Field(sa_column=_points())
    state: str = Field(sa_column=Column(String(16), nullable=False))
    available_at: datetime = Field(sa_column=_ts())
    expires_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    created_at: datetime = Field(sa_column=_ts())


class LotUse(SQLModel, table=True):
    """Points taken out of a lot by one ledger entry: spent, clawed back, paid to debt or expired."""

    __tablename__ = "lot_use"
    __table_args__ = (CheckConstraint("points > 0", name="ck_lot_use_points_positive"),)

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


class OutboxMessage(SQLModel, table=True):
    """A message to deliver, written in the same transaction as what it announces."""

    __tablename__ = "outbox_message"
    # The relay's claim reads the oldest due unconfirmed messages off the front of this index. It
    # is partial, WHERE state IN ('pending', 'sent') (migration 0003): saying so here would import
    # the Postgres dialect on every start of the command line, SQLite included.
    __table_args__ = (Index("ix_outbox_message_due", "next_attempt_at", "id"),)

    id: str = Field(sa_column=Column(String(36), primary_key=True))  # a UUID, the AMQP message_id
    redemption_id: int | None = Field(
        default=None, sa_column=Column(BigId, ForeignKey("redemption.id"), unique=True)
    )
    routing_key: str = Field(sa_column=Column(String(255), nullable=False))
    body: str = Field(sa_column=Column(Text(), nullable=False))
    state: str = Field(default=MessageState.pending.value, sa_column=Column(String(16), nullable=False))
    attempts: int = Field(default=0, sa_column=Column(Integer(), nullable=False))
    next_attempt_at: datetime = Field(sa_column=_ts())
    claimed_by: str | None = Field(default=None, sa_column=Column(String(64)))
    claimed_until: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    last_error: str | None = Field(default=None, sa_column=Column(Text()))
    sent_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    confirmed_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    created_at: datetime = Field(sa_column=_ts())


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
