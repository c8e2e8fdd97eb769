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


class RedemptionStatus(StrEnum):
    pending = "pending"
    shipping = "shipping"


class MessageState(StrEnum):
    pending = "pending"
    sent = "sent"
    confirmed = "confirmed"
    dead = "dead"


class ShipmentType(int, Enum):
    purchase = 1
    redemption = 2


class Account(SQLModel, table=True):
    __tablename__ = "account"
    __table_args__ = (CheckConstraint("balance >= 0", name="ck_account_balance_nonnegative"),)

    user_id: str = Field(sa_column=Column(String(128), primary_key=True))
    balance: int = Field(default=0, sa_column=_points())
    earned: int = Field(default=0, sa_column=_points())
    redeemed: int = Field(default=0, sa_column=_points())
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())


class LedgerEntry(SQLModel, table=True):
    """One change of one balance. ``ref`` is unique per kind: it makes awards idempotent."""

    __tablename__ = "ledger_entry"
    __table_args__ = (
        UniqueConstraint("kind", "ref", name="uq_ledger_entry_kind_ref"),
        Index("ix_ledger_entry_user_id_id", "user_id", "id"),
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
    __table_args__ = (Index("ix_outbox_message_state_next_attempt_at", "state", "next_attempt_at"),)

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
    """The warehouse's side. The UNIQUE redemption id turns a replayed message into a look-up."""

    __tablename__ = "shipment_request"

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    type: int = Field(default=ShipmentType.redemption.value, sa_column=Column(Integer(), nullable=False))
    redemption_id: int = Field(sa_column=Column(BigInteger(), nullable=False, unique=True))
    message_id: str = Field(sa_column=Column(String(36), nullable=False))
    sku: str = Field(sa_column=Column(String(64), nullable=False))
    quantity: int = Field(sa_column=Column(Integer(), nullable=False))
    address: str = Field(sa_column=Column(Text(), nullable=False))
    carrier: str | None = Field(default=None, sa_column=Column(String(64)))
    express_no: str | None = Field(default=None, sa_column=Column(String(64)))
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())


metadata = SQLModel.metadata
