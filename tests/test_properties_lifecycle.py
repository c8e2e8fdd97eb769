"""Random lives of two shoppers: purchases, reviews, grants, refunds, redemptions, settle and
expire runs, with a clock that moves on between steps. After every step every lifecycle rule
holds (tests/test_lifecycle_invariants.py), and the cron jobs leave nothing due behind them."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, example, given, settings, target
from hypothesis import strategies as st
from sqlalchemy import bindparam, text

from credex.db.engine import dispose_engines, get_engine, session_for, upgrade
from credex.db.models import UTCDateTime
from credex.errors import CredexError
from credex.points.accounts import get_account
from credex.points.awards import award_grant, award_purchase, award_review
from credex.points.catalog import add_item
from credex.points.lifecycle import expire_lapsed, refund_order, settle_pending
from credex.points.redemptions import redeem
from tests.test_lifecycle_invariants import check_lifecycle_invariants

PENDING_DAYS = 10
EXPIRY_DAYS = 90
RATE = Decimal(1)
START = datetime(2025, 1, 1, tzinfo=UTC)
GIFT_POINTS = 25

users = st.sampled_from(["u1", "u1", "u1", "u2"])  # mostly one shopper: her edges meet more often
purchase = st.tuples(st.just("purchase"), users, st.integers(1, 300), st.booleans())  # with a return window?
# an order picked among those bought so far; a refund id from a small set, so repeats happen
refund = st.tuples(
    st.just("refund"), users, st.integers(0, 30), st.integers(0, 6), st.none() | st.integers(1, 200)
)
spend = st.tuples(st.just("redeem"), users, st.integers(1, 3) | st.just("all"))  # "all": a splurge
operations = st.one_of(
    purchase,
    purchase,
    spend,
    spend,
    refund,
    refund,
    st.tuples(st.just("review"), users, st.booleans()),
    st.tuples(st.just("grant"), users, st.integers(-150, 200).filter(bool)),
    st.tuples(st.just("settle")),
    st.tuples(st.just("expire")),
)
# the clock mostly creeps, now and then jumps past a return window or an expiry date
days = st.sampled_from([0, 0, 0, 1, 1, 2, 3, 5, 9, 11, 30, 95])
lives = st.lists(st.tuples(operations, days, st.integers(0, 23)), min_size=10, max_size=30)


class Life:
    """One shopper's life replayed through the service functions, as the commands call them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.orders: list[tuple[str, str]] = []
        self.counter = 0
        self.edges = 0  # steps that ended with debt beside pending points: the rarest edge

    def session(self):
        return session_for(self.url, write=True)

    def apply(self, operation: tuple) -> None:
        kind, *args = operation
        self.counter += 1
        n = self.counter
        with self.session() as session:
            try:
                if kind == "purchase":
                    user, amount, returnable = args
                    award_purchase(
                        session,
                        user,
                        order_id=f"o-{n}",
                        amount=str(amount),
                        rate=RATE,
                        operator="prop",
                        pending_days=PENDING_DAYS if returnable else 0,
                        expiry_days=EXPIRY_DAYS,
                    )
                    self.orders.append((user, f"o-{n}"))
                elif kind == "review":
                    user, photos = args
                    award_review(
                        session,
                        user,
                        review_id=f"rv-{n}",
                        photos=photos,
                        points=20 if photos else 10,
                        operator="prop",
                        expiry_days=EXPIRY_DAYS,
                    )
                elif kind == "grant":
                    user, points = args
                    award_grant(
                        session,
                        user,
                        points,
                        reason="prop",
                        ref=f"g-{n}",
                        operator="prop",
                        expiry_days=EXPIRY_DAYS,
                    )
                elif kind == "refund":
                    user, pick, refund_id, amount = args
                    owner, order = self.orders[pick % len(self.orders)] if self.orders else (user, "o-none")
                    refund_order(
                        session,
                        owner if pick % 7 else user,  # now and then someone else's order: refused
                        order_id=order,
                        refund_id=f"rf-{refund_id}",
                        amount=None if amount is None else str(amount),
                        rate=RATE,
                        operator="prop",
                    )
                elif kind == "redeem":
                    user, quantity = args
                    if quantity == "all":
                        quantity = max(1, get_account(session, user)["balance"] // GIFT_POINTS)
                    redeem(session, user, "GIFT", address="1 Prop Lane", quantity=quantity, operator="prop")
                elif kind == "settle":
                    settle_pending(session, operator="prop")
                elif kind == "expire":
                    expire_lapsed(session, operator="prop")
            except CredexError:
                pass  # refused: insufficient points, unknown order, a conflict; it must change nothing

    def debt_paid_by_settling(self) -> int:
        with get_engine(self.url).connect() as connection:
            return connection.execute(
                text("SELECT count(*) FROM ledger_entry WHERE kind = 'settle' AND debt < 0")
            ).scalar()

    def check(self, now: datetime, after: str) -> None:
        totals = check_lifecycle_invariants(self.url)
        self.edges += totals["debt"] > 0 and totals["pending"] > 0
        due = {
            "settle": "SELECT count(*) FROM point_lot WHERE state = 'pending' AND available_at <= :now",
            "expire": "SELECT count(*) FROM point_lot WHERE state = 'available' AND expires_at <= :now",
        }.get(after)
        if due is not None:
            query = text(due).bindparams(bindparam("now", type_=UTCDateTime()))  # stored as credex stores it
            with get_engine(self.url).connect() as connection:
                assert connection.execute(query, {"now": now}).scalar() == 0, f"{after} left due lots behind"


def live(url: str, steps) -> None:
    with freeze_time(START, ignore=["_pytest"]) as clock:
        with session_for(url, write=True) as session:
            add_item(session, "GIFT", name="Gift", points=GIFT_POINTS, stock=None)
        life = Life(url)
        now = START
        for operation, days, hours in steps:
            now += timedelta(days=days, hours=hours)
            clock.move_to(now)
            life.apply(operation)
            life.check(now, operation[0])
        target(life.edges / 10 + life.debt_paid_by_settling(), label="debt paid by settling")


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite:///{path}")
    dispose_engines()
    return str(path)


# The rarest edges, always walked: debt beside pending points, settled; expired points refunded.
EDGES = [
    (("purchase", "u1", 200, False), 0, 0),
    (("redeem", "u1", "all"), 1, 0),
    (("purchase", "u1", 120, True), 0, 3),
    (("refund", "u1", 0, 1, None), 1, 0),
    (("settle",), 11, 0),
    (("review", "u1", True), 0, 1),
    (("grant", "u1", 90), 95, 0),
    (("expire",), 95, 0),
    (("refund", "u1", 1, 2, 50), 1, 0),
    (("grant", "u1", 60), 0, 1),
]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=lives)
@example(steps=EDGES)
def test_random_lives_keep_every_rule_on_sqlite(steps, sqlite_template, tmp_path):
    path = tmp_path / f"{uuid.uuid4().hex}.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite:///{path}"
    try:
        live(url, steps)
    finally:
        dispose_engines()
        path.unlink()


@pytest.mark.postgres
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=lives)
@example(steps=EDGES)
def test_random_lives_keep_every_rule_on_postgres(steps, postgres_template):
    from tests.conftest import make_postgres_database

    url, drop = make_postgres_database(postgres_template)
    try:
        live(url, steps)
    finally:
        drop()
