"""How a relay holds a batch of due messages while it publishes them, so that relays running at
once never publish the same due message in one round, and how it lets go. Two ways, picked once
from the database's dialect (``claim_strategy``):

- ``LeaseClaims`` (SQLite: one writer at a time, so no transaction may stay open while the batch is
  published): the claim is written on the rows (``claimed_by``, ``claimed_until``, and the first
  time ``first_claimed_at``) and committed; the record clears the lease. A relay that dies
  leaves its lease behind until it runs out.
- ``LockClaims`` (Postgres): the claim is the row locks of the batch's own transaction
  (``FOR UPDATE SKIP LOCKED``), held while the batch is published and ended by the commit that
  records it. A relay that dies releases the locks with its connection. Before publishing, one
  row is committed on another connection: the created_at of the batch's newest fresh message
  (outbox_claim_mark), so that a message the broker may have is never taken for one no relay
  ever held (`redeem cancel`), even after this relay crashed. Other writers of the locked rows
  pass them by rather than wait (``outbox``'s statements say ``SKIP LOCKED``).

Every method runs on one of the relay's database threads (``writers`` of them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select, text, true
from sqlalchemy.engine import Dialect
from sqlmodel import Session

from credex.db.engine import open_session, session_for
from credex.relay.outbox import (
    ClaimedMessage,
    PublishTally,
    RedeliveryPolicy,
    bury_exhausted,
    claim_due_messages,
    lock_due_messages,
    mark_claimed_through,
    outbox_table,
    record_publish_outcomes,
    release_lease,
)

_RELAXED = text("SET LOCAL synchronous_commit TO OFF")
# The earliest due time of an unconfirmed message, off the front of the partial index
# ix_outbox_message_due (its WHERE written out, as the claim's is).
_NEXT_DUE = select(func.min(outbox_table.c.next_attempt_at)).where(
    text("outbox_message.state IN ('pending', 'sent')")
)


@dataclass
class Claim:
    """A batch taken for publishing, oldest first. ``buried``: messages found out of attempts
    (and made dead) when it was taken."""

    messages: list[ClaimedMessage]
    session: Session | None = field(default=None, repr=False)  # LockClaims: the transaction holding it
    buried: int = 0


class ClaimStrategy(ABC):
    """claim, then record or release: every claim ends one way or the other."""

    writers = 1  # database threads a relay gives its claims and records

    def __init__(self, database_url: str, policy: RedeliveryPolicy) -> None:
        self.database_url = database_url
        self.policy = policy

    @abstractmethod
    def claim(self, limit: int, *, now: datetime) -> Claim:
        """Up to ``limit`` due messages, oldest first, held for this relay. Messages out of
        attempts (``policy.max_attempts``) are made dead first."""

    @abstractmethod
    def record(self, claim: Claim, outcomes: Mapping[str, str | None], *, now: datetime) -> PublishTally:
        """What the broker said of each claimed message, committed; the claim ends."""

    @abstractmethod
    def release(self, claim: Claim) -> None:
        """Give the claim up unrecorded (after a failure): its messages are due for every relay
        again as they were."""

    def seconds_to_next_due(self, *, now: datetime) -> float | None:
        """How long until the next unconfirmed message is due (<= 0: one is due now but held by
        another relay, or became due since the last claim); None when none is waiting."""
        with session_for(self.database_url) as session:
            due = session.execute(_NEXT_DUE).scalar()
        return None if due is None else (due - now).total_seconds()

    def relax_commit(self, session: Session) -> None:  # noqa: B027 - nothing to do by default
        """Let the transaction's commit answer before its record is flushed to disk, where the
        database can (see ``LockClaims``)."""

    def _bury(self, session: Session, now: datetime) -> int:
        if not self.policy.max_attempts:
            return 0
        return bury_exhausted(session, max_attempts=self.policy.max_attempts, now=now)


class LeaseClaims(ClaimStrategy):
    def __init__(self, database_url: str, policy: RedeliveryPolicy, *, relay_id: str, lease: float) -> None:
        super().__init__(database_url, policy)
        self.relay_id = relay_id
        self.lease = lease
        self._ours = outbox_table.c.claimed_by == relay_id  # a lease that ran out and was taken over is not

    def claim(self, limit: int, *, now: datetime) -> Claim:
        with session_for(self.database_url, write=True) as session:
            buried = self._bury(session, now)
            messages = claim_due_messages(
                session, relay_id=self.relay_id, limit=limit, lease=self.lease, now=now
            )
            session.commit()
        return Claim(messages, buried=buried)

    def record(self, claim: Claim, outcomes: Mapping[str, str | None], *, now: datetime) -> PublishTally:
        with session_for(self.database_url, write=True) as session:
            tally = record_publish_outcomes(
                session,
                claimed=claim.messages,
                outcomes=dict(outcomes),
                policy=self.policy,
                now=now,
                still_claimed=self._ours,
            )
            session.commit()
        return tally

    def release(self, claim: Claim) -> None:
        if not claim.messages:
            return
        with session_for(self.database_url, write=True) as session:
            release_lease(session, relay_id=self.relay_id, message_ids=[m.id for m in claim.messages])
            session.commit()


class LockClaims(ClaimStrategy):
    writers = 2  # a claim and a record at once: their rows are apart, and neither waits on a lock

    def relax_commit(self, session: Session) -> None:
        """Postgres need not flush the relay's commits to disk before answering: everything the
        relay writes can be lost in a server crash without harm (a lost claim or "sent" means one
        more publish, a lost "confirmed" one more confirmation from the warehouse), and never
        half-way."""
        session.execute(_RELAXED)

    def claim(self, limit: int, *, now: datetime) -> Claim:
        session = open_session(self.database_url, write=True)
        try:
            buried = self._bury(session, now)
            batch = lock_due_messages(session, limit=limit, now=now)
            if batch.newest_fresh is not None:
                # Before anything is published, durably (not relaxed), on another connection
                # (its one row is no row this transaction locks): a fresh message the broker may
                # get from now on is never taken for one no relay ever held, even after a crash.
                with session_for(self.database_url, write=True) as marking:
                    mark_claimed_through(marking, batch.newest_fresh)
                    marking.commit()
            if batch.messages:
                self.relax_commit(session)  # for the record that ends this transaction
                return Claim(batch.messages, session, buried)
            if buried:  # nothing to hold: keep what was buried
                self.relax_commit(session)
                session.commit()
        except BaseException:
            session.close()
            raise
        session.close()  # an idle poll costs its query and the rollback
        return Claim([], buried=buried)

    def record(self, claim: Claim, outcomes: Mapping[str, str | None], *, now: datetime) -> PublishTally:
        if claim.session is None:
            return PublishTally()
        with claim.session as session:  # closed afterwards: the locks go with the commit
            tally = record_publish_outcomes(
                session,
                claimed=claim.messages,
                outcomes=dict(outcomes),
                policy=self.policy,
                now=now,
                still_claimed=true(),
            )
            session.commit()
        return tally

    def release(self, claim: Claim) -> None:
        if claim.session is not None:
            claim.session.close()  # rolled back: the locks go


def claim_strategy(
    dialect: Dialect, database_url: str, policy: RedeliveryPolicy, *, relay_id: str, lease: float
) -> ClaimStrategy:
    """The way to claim on this database: row locks where the database has them for a
    transaction that stays open (Postgres), a lease otherwise (SQLite)."""
    if dialect.name == "postgresql":
        return LockClaims(database_url, policy)
    return LeaseClaims(database_url, policy, relay_id=relay_id, lease=lease)
