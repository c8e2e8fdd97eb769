"""Delivery status: `track sync` asks the carrier about redemptions on their way and records
what it says (delivered, returned and refunded), and `track REDEMPTION_ID` answers from that
record while it is fresh.

A redemption is asked about at most once per ``CREDEX_TRACK_MIN_INTERVAL`` (kuaidi100 locks a
number queried more often): the claim *is* the conditional update of ``delivery_asked_at``,
committed before the carrier is asked, so concurrent runs never ask twice for one number within
the interval. ``delivery_checked_at`` is the time of the carrier's last answer, written with the
status it gave: a claim whose question found no answer (an unknown number, a carrier down) leaves
the last answer and its time as they were. Each redemption's record is a short transaction of its
own.

A refused API key is the same answer for every parcel: the run stops there (exit 1), and the
claim of the parcel it was asking about is given back, so the first run after the key is fixed
asks about every parcel at once. A refusal about one parcel (an unknown number, a final error)
counts as failed, is said on stderr, and keeps its claim.

``delivered`` and ``returned`` are final: once a redemption is either, an answer that says
otherwise (a carrier's mistake, a number handed out again) is not stored over the one that made
it final. It is reported (a warning, and in `track sync` an event), and changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlmodel import Session

from credex.db import tables
from credex.db.engine import session_for
from credex.db.models import EventSource, RedemptionStatus, utcnow
from credex.errors import CarrierRejected, Unavailable, UnknownParcel
from credex.logistics.model import CarrierClient, CarrierKeyRefused

_r = tables.redemption
_ST = RedemptionStatus
# Asked about: on its way, or with a cancel on its way and a waybill (the parcel may still come back).
ON_THE_WAY = (_ST.shipping.value, _ST.cancelling.value)
# Moved there by the carrier's word, for good: their delivery status stays the one that moved them.
FINAL = (_ST.delivered.value, _ST.returned.value)


@dataclass
class SyncReport:
    checked: int = 0  # asked the carrier
    delivered: int = 0
    returned: int = 0  # and refunded
    unchanged: int = 0
    skipped: int = 0  # checked by another run within the interval
    failed: int = 0  # the carrier refused to answer about it (unknown number, a final error): said on stderr

    def to_json(self) -> dict:
        return asdict(self)


def _not_asked_since(cutoff: datetime):
    return or_(_r.c.delivery_asked_at.is_(None), _r.c.delivery_asked_at <= cutoff)


def due_for_check(session: Session, *, limit: int, now: datetime, interval: timedelta) -> list:
    """Redemptions on their way not asked about within ``interval``, the longest unasked first."""
    return session.execute(
        select(_r.c.id, _r.c.express_no, _r.c.carrier, _r.c.delivery_asked_at)
        .where(_r.c.status.in_(ON_THE_WAY), _r.c.express_no.is_not(None), _not_asked_since(now - interval))
        .order_by(_r.c.delivery_asked_at.is_not(None), _r.c.delivery_asked_at, _r.c.id)
        .limit(limit)
    ).all()


def claim_check(session: Session, redemption_id: int, *, now: datetime, interval: timedelta) -> bool:
    """Take the right to ask about this redemption now (the caller commits before asking)."""
    return (
        session.execute(
            update(_r)
            .where(
                _r.c.id == redemption_id,
                _r.c.status.in_(ON_THE_WAY),
                _r.c.express_no.is_not(None),
                _not_asked_since(now - interval),
            )
            .values(delivery_asked_at=now)
        ).rowcount
        == 1
    )


def release_claim(
    session: Session, redemption_id: int, *, claimed_at: datetime, before: datetime | None
) -> None:
    """Give back a claim whose question the carrier did not take (the caller commits): the number
    was not asked about, so it is due again as it was before (``before``). A claim taken since by
    another run (it no longer holds ``claimed_at``) is left alone."""
    session.execute(
        update(_r)
        .where(_r.c.id == redemption_id, _r.c.delivery_asked_at == claimed_at)
        .values(delivery_asked_at=before)
    )


def _store_answer(
    session: Session, redemption_id: int, status: str, *, now: datetime, checkpoints: list[dict] | None
) -> str | None:
    """Keep the carrier's answer, given at ``now``, as the stored one (the caller commits), unless
    the redemption is final and the answer says otherwise. Returns None when it was kept, else the
    final status that stays (with the answer that made it final)."""
    kept = {} if checkpoints is None else {"delivery_checkpoints": json.dumps(checkpoints)}
    stored = session.execute(
        update(_r)
        .where(_r.c.id == redemption_id, or_(_r.c.status.not_in(FINAL), _r.c.status == status))
        .values(delivery_status=status, delivery_checked_at=now, **kept)
    ).rowcount
    if stored:
        return None
    return session.execute(select(_r.c.status).where(_r.c.id == redemption_id)).scalar_one_or_none()


def contradiction(redemption_id: int, status: str, final: str) -> str:
    """What is said about an answer that contradicts a final status."""
    return (
        f"redemption {redemption_id} is {final}, but the carrier now says {status}: "
        "a final status is kept, and nothing else changes"
    )


def record_delivery(
    session: Session,
    redemption_id: int,
    status: str,
    *,
    operator: str,
    now: datetime,
    checkpoints: list[dict] | None = None,
    warn: Callable[[str], None] | None = None,
) -> str:
    """Record the carrier's ``status``, answered at ``now`` (the caller commits); ``delivered`` or
    ``returned`` move the redemption (a return refunds it, once). Returns what happened:
    delivered, returned or unchanged. An answer that contradicts a final status is an event
    (source sync, the final status again) and a ``warn``, and is unchanged."""
    from credex.points.cancels import refund_redemption
    from credex.points.redemptions import add_event, move_redemption

    final = _store_answer(session, redemption_id, status, now=now, checkpoints=checkpoints)
    if final is not None:
        said = f"the carrier now says {status}; {final} is final and is kept"
        add_event(session, redemption_id, status=final, source=EventSource.sync, detail=said, now=now)
        if warn is not None:
            warn(contradiction(redemption_id, status, final))
        return "unchanged"
    if status == "delivered":
        if move_redemption(
            session,
            redemption_id,
            from_statuses=(_ST.shipping.value,),
            to=_ST.delivered,
            source=EventSource.sync,
            detail="the carrier says delivered",
            now=now,
        ):
            return "delivered"
    elif status == "returned":
        refund = refund_redemption(
            session,
            redemption_id,
            from_statuses=ON_THE_WAY,
            to_status=_ST.returned,
            source=EventSource.sync,
            detail="the carrier says returned to the sender",
            operator=operator,
            now=now,
        )
        if refund is not None:
            return "returned"
    return "unchanged"


def sync_deliveries(
    database_url: str,
    client: CarrierClient,
    *,
    limit: int,
    interval: timedelta,
    operator: str,
    warn: Callable[[str], None] | None = None,
) -> SyncReport:
    """`track sync`: ask the carrier about up to ``limit`` redemptions due for a check. A carrier
    that cannot be reached ends the run (Unavailable, exit 69); the numbers claimed so far wait
    for the next interval, as kuaidi100 wants (it may have counted the question). A refused key
    ends it too (CarrierKeyRefused, exit 1), giving back the claim of the parcel it asked about.
    ``warn`` hears why each parcel counted as failed."""
    report = SyncReport()
    now = utcnow()
    with session_for(database_url) as session:
        due = due_for_check(session, limit=limit, now=now, interval=interval)
    for row in due:
        now = utcnow()
        with session_for(database_url, write=True) as session:
            claimed = claim_check(session, row.id, now=now, interval=interval)
            session.commit()
        if not claimed:
            report.skipped += 1
            continue
        try:
            tracking = client.track(row.express_no, carrier=row.carrier)
        except CarrierKeyRefused:
            # No answer about this parcel, and none to come about the others until someone fixes
            # the key: counted as failed, every parcel would wait out the interval after the fix.
            with session_for(database_url, write=True) as session:
                release_claim(session, row.id, claimed_at=now, before=row.delivery_asked_at)
                session.commit()
            raise
        except (UnknownParcel, CarrierRejected) as refused:
            report.failed += 1
            if warn is not None:
                warn(f"redemption {row.id} not checked: {refused.message}")
            continue
        except Unavailable:
            raise
        report.checked += 1
        with session_for(database_url, write=True) as session:
            outcome = record_delivery(
                session,
                row.id,
                tracking.status,
                operator=operator,
                now=utcnow(),
                checkpoints=[point.to_json() for point in tracking.checkpoints],
                warn=warn,
            )
            session.commit()
        setattr(report, outcome, getattr(report, outcome) + 1)
    return report


def stored_tracking(session: Session, redemption_id: int, *, interval: timedelta) -> dict | None:
    """`track REDEMPTION_ID` without --fresh: the carrier's last answer while it is younger than
    ``interval`` (None: ask the carrier). ``checked_at`` is when the carrier gave it."""
    row = session.execute(
        select(
            _r.c.id,
            _r.c.express_no,
            _r.c.carrier,
            _r.c.delivery_status,
            _r.c.delivery_checked_at,
            _r.c.delivery_checkpoints,
        ).where(_r.c.id == redemption_id)
    ).first()
    if row is None or row.delivery_status is None or row.delivery_checked_at is None:
        return None
    if utcnow() - row.delivery_checked_at >= interval:
        return None
    return {
        "redemption_id": row.id,
        "express_no": row.express_no,
        "carrier": row.carrier,
        "status": row.delivery_status,
        "checkpoints": json.loads(row.delivery_checkpoints) if row.delivery_checkpoints else [],
        "stored": True,
        "checked_at": row.delivery_checked_at,
    }


def redemption_of_parcel(session: Session, *, carrier: str, express_no: str) -> int | None:
    """The redemption whose parcel this is (the newest, should a carrier have handed the number
    out twice), or None: `track --express-no` answers a known one as `track REDEMPTION_ID` does."""
    return session.execute(
        select(_r.c.id)
        .where(_r.c.carrier == carrier, _r.c.express_no == express_no)
        .order_by(_r.c.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def store_tracking(database_url: str, redemption_id: int, status: str, checkpoints: list[dict]) -> str | None:
    """What `track` just heard from the carrier (status and checkpoints), kept as the stored
    answer (the redemption's own status only moves with `track sync`). It was asked as well as
    answered: `track sync` leaves the number alone for the interval. Returns what to warn about
    an answer that contradicts a final status (it is not kept), else None."""
    now = utcnow()
    with session_for(database_url, write=True) as session:
        session.execute(update(_r).where(_r.c.id == redemption_id).values(delivery_asked_at=now))
        final = _store_answer(session, redemption_id, status, now=now, checkpoints=checkpoints)
        session.commit()
    return None if final is None else contradiction(redemption_id, status, final)
