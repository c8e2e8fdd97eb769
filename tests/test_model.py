"""A model of the points program in plain Python, and the real one driven through its command line
beside it: hypothesis picks the steps (purchases with and without a return window, reviews,
grants and takings, refunds, redemptions, catalog changes, settle and expire runs, the clock
moving on, bad input), and after every step, refused ones included, the balances, pending
points, debt, earned and redeemed, the lots, the expiring points, the stock and the outbox must
be what the model says, and every rule of domain.md must hold.

On SQLite and on Postgres; the number of examples comes from the hypothesis profile
(conftest.py: more on CI).

(Over 400 lines on purpose: the model and the state machine that drives the real program beside it
are one thing; apart, a rule could change on one side only.)
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from freezegun import freeze_time
from hypothesis import settings, target
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text

from tests.invariants import CatalogBook, check_invariants, newest_redemption

START = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
PENDING_DAYS = 10
EXPIRY_DAYS = 60
REVIEW_POINTS, PHOTO_POINTS = 10, 20
USERS = ["u1", "u2"]
SKUS = ["MUG", "CAP"]
ENV = {
    "CREDEX_PENDING_DAYS": str(PENDING_DAYS),
    "CREDEX_EXPIRY_DAYS": str(EXPIRY_DAYS),
    "CREDEX_OPERATOR": "model",
}


# --- the model ------------------------------------------------------------------------------------


@dataclass
class Lot:
    seq: int  # the order lots are made in: the database's ids grow the same way
    user: str
    remaining: int
    state: str  # pending, available, used, expired
    available_at: datetime
    expires_at: datetime
    order: str | None = None


@dataclass
class Account:
    balance: int = 0
    pending: int = 0
    debt: int = 0
    earned: int = 0
    redeemed: int = 0


@dataclass
class Gift:
    price: int
    stock: int | None
    active: bool = True


@dataclass
class Redemption:
    id: int
    user: str
    sku: str
    quantity: int
    cost: int
    takes: list[tuple[Lot, int]]  # the points it took out of each lot, oldest first
    took_stock: bool
    status: str = "pending"


@dataclass
class Model:
    accounts: dict[str, Account] = field(default_factory=dict)
    lots: list[Lot] = field(default_factory=list)
    gifts: dict[str, Gift] = field(default_factory=dict)
    refs: dict[tuple[str, str], tuple] = field(default_factory=dict)  # (kind, ref) -> content
    orders: dict[str, tuple[str, int]] = field(default_factory=dict)  # order -> (user, points earned)
    clawed: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # order -> taken back
    requests: dict[str, tuple] = field(default_factory=dict)  # redemption request id -> content
    redemptions: list[Redemption] = field(default_factory=list)
    messages: int = 0

    def account(self, user: str) -> Account:
        return self.accounts.setdefault(user, Account())

    def spendable(self, user: str) -> list[Lot]:
        lots = [lot for lot in self.lots if lot.user == user and lot.state == "available"]
        return sorted(lots, key=lambda lot: (lot.available_at, lot.seq))

    def take(self, user: str, points: int) -> list[tuple[Lot, int]]:
        """Oldest points first; what was taken from each lot."""
        takes = []
        for lot in self.spendable(user):
            if points == 0:
                break
            taken = min(lot.remaining, points)
            lot.remaining -= taken
            points -= taken
            takes.append((lot, taken))
            if lot.remaining == 0:
                lot.state = "used"
        assert points == 0, "the model spent points its lots do not hold"
        return takes

    def cancel(self, redemption: Redemption) -> None:
        """A redemption never handed to the broker, cancelled: its message withdrawn, its points
        back (debt first, as with any award; the rest into the lots they came from, whose
        expiry stands: an expired one lapses again at the next expiry run) and its stock back."""
        account = self.account(redemption.user)
        paid = min(account.debt, redemption.cost)
        account.debt -= paid
        account.balance += redemption.cost - paid
        account.redeemed -= redemption.cost
        skip = paid  # the oldest points paid the debt: they would have expired first
        for lot, taken in redemption.takes:
            skipped = min(skip, taken)
            skip -= skipped
            if taken - skipped:
                lot.remaining += taken - skipped
                lot.state = "pending" if lot.state == "pending" else "available"
        gift = self.gifts.get(redemption.sku)
        if redemption.took_stock and gift is not None and gift.stock is not None:
            gift.stock += redemption.quantity
        self.messages -= 1
        redemption.status = "cancelled"

    def award(
        self, user: str, points: int, now: datetime, *, pending: bool, order: str | None = None
    ) -> None:
        account = self.account(user)
        account.earned += points
        available_at = now + timedelta(days=PENDING_DAYS) if pending else now
        lot = Lot(
            len(self.lots), user, points, "pending", available_at, available_at + timedelta(days=EXPIRY_DAYS)
        )
        lot.order = order
        if pending:
            account.pending += points
        else:
            paid = min(account.debt, points)
            account.debt -= paid
            account.balance += points - paid
            lot.remaining = points - paid
            lot.state = "available" if lot.remaining else "used"
        self.lots.append(lot)

    def settle(self, now: datetime) -> None:
        for user in sorted(self.accounts):
            account = self.accounts[user]
            due = [
                lot
                for lot in self.lots
                if lot.user == user and lot.state == "pending" and lot.available_at <= now
            ]
            for lot in sorted(due, key=lambda lot: (lot.available_at, lot.seq)):
                paid = min(account.debt, lot.remaining)
                account.debt -= paid
                account.pending -= lot.remaining
                account.balance += lot.remaining - paid
                lot.remaining -= paid
                lot.state = "available" if lot.remaining else "used"

    def expire(self, now: datetime) -> None:
        for lot in self.lots:
            if lot.state == "available" and lot.expires_at <= now:
                self.accounts[lot.user].balance -= lot.remaining
                lot.remaining, lot.state = 0, "expired"

    def expiring(self, user: str) -> list[dict]:
        days: dict[str, int] = {}
        for lot in sorted(self.spendable(user), key=lambda lot: lot.expires_at):
            day = lot.expires_at.date().isoformat()
            days[day] = days.get(day, 0) + lot.remaining
        return [{"points": points, "on": day} for day, points in days.items()]


# --- the machine ----------------------------------------------------------------------------------

users = st.sampled_from(USERS)
amounts = st.integers(2_000, 12_000).map(lambda cents: f"{cents // 100}.{cents % 100:02d}")
BAD_INPUT = [
    ("award", "grant", "u1", "0", "--reason", "nothing"),
    ("award", "grant", "u1", "1e3", "--reason", "not a number"),
    ("award", "purchase", "u1", "--order", "o-bad", "--amount", "-5"),
    ("award", "purchase", "u1", "--order", "o-bad", "--amount", "NaN"),
    ("redeem", "create", "u1", "MUG", "--address", "x", "--quantity", "0"),
    ("redeem", "create", "u1", "MUG", "--address", " "),
    ("award", "refund", "u1", "--order", "o-1", "--refund", "rf-bad", "--amount", "-1"),
    ("catalog", "update", "MUG", "--stock", "-2"),
    ("catalog", "add", "PEN", "--name", "Pen", "--points", "0"),
]


class PointsProgram(RuleBasedStateMachine):
    """One example: a fresh database, a frozen clock, the model; ``make_database`` is set by the test."""

    make_database = None  # () -> (url, drop)

    def __init__(self) -> None:
        super().__init__()
        from typer.testing import CliRunner

        self.url, self._drop = type(self).make_database()
        self.runner = CliRunner()
        self.model = Model()
        self.book = CatalogBook()
        self.now = START
        self._clock = freeze_time(START, ignore=["_pytest", "hypothesis"])
        self.frozen = self._clock.start()
        self.counter = 0
        self.edges = 0  # how often the rare edges were walked: hypothesis steers towards more

    def teardown(self) -> None:
        self._clock.stop()
        self._drop()
        if currently_in_test_context():  # not when a test walks the machine by hand
            target(float(self.edges), label="debt met pending points or was paid by settling")
        print(
            "EDGES",
            self.edges,
            self.counter,
            {u: (a.balance, a.pending, a.debt) for u, a in self.model.accounts.items()},
            len(self.model.clawed),
        )

    # --- talking to credex --------------------------------------------------------------------------

    def credex(self, *args: object, env: dict[str, str] | None = None):
        from credex.cli import app

        words = [str(arg) for arg in args]
        changes_catalog = words[:2] in (["catalog", "add"], ["catalog", "update"])
        before = self._newest() if changes_catalog else 0
        result = self.runner.invoke(
            app,
            ["--database-url", self.url, *words, "--json"],
            env={**ENV, **(env or {})},
            catch_exceptions=False,
        )
        if changes_catalog and result.exit_code == 0:
            self.book.record_from(self.url, words[2], before=before)
        return result

    def _newest(self) -> int:
        from credex.db.engine import get_engine

        with get_engine(self.url).connect() as connection:
            return newest_redemption(connection)

    def expect(self, result, exit_code: int, code: str | None = None) -> dict | None:
        assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
        if exit_code == 0:
            return json.loads(result.stdout)
        assert result.stdout == ""
        assert json.loads(result.stderr)["error"]["code"] == code, result.stderr
        return None

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    # --- the steps ----------------------------------------------------------------------------

    @initialize(amount=amounts, returnable=st.booleans(), later=amounts)
    def open_the_shop(self, amount: str, returnable: bool, later: str) -> None:
        self.expect(self.credex("catalog", "add", "MUG", "--name", "Mug", "--points", 30, "--stock", 4), 0)
        self.model.gifts["MUG"] = Gift(30, 4)
        # A point apiece and no end of them: a splurge on caps empties a balance, so refunds leave debt.
        self.expect(self.credex("catalog", "add", "CAP", "--name", "Cap", "--points", 1), 0)
        self.model.gifts["CAP"] = Gift(1, None)
        # A first order whose points are spent at once: refunding it later leaves debt (or takes
        # back pending points), the edges the steps below would rarely reach on their own.
        self.purchase("u1", amount, returnable, again=False, pick=0)
        self.grant("u1", 40, again=False)
        self.redeem("u1", "CAP", "all", again=False)
        self.purchase("u1", later, True, again=False, pick=0)  # pending: settling it pays the debt

    @rule(days=st.sampled_from([0, 1, 3, 9, 11, 30, 61]), hours=st.integers(0, 23), cron=st.booleans())
    def time_passes(self, days: int, hours: int, cron: bool) -> None:
        self.now += timedelta(days=days, hours=hours)
        self.frozen.move_to(self.now)
        if cron:  # the nightly jobs ran
            self.settle()
            self.expire()

    @rule(user=users, amount=amounts, returnable=st.booleans(), again=st.booleans(), pick=st.integers(0, 50))
    def purchase(self, user: str, amount: str, returnable: bool, again: bool, pick: int) -> None:
        # Now and then an order already recorded: the same content is a repeat, other content a conflict.
        known = sorted(self.model.orders)
        order = known[pick % len(known)] if again and known else self.next_id("o")
        points = int(amount.split(".")[0])
        env = {"CREDEX_PENDING_DAYS": str(PENDING_DAYS if returnable else 0)}
        result = self.credex("award", "purchase", user, "--order", order, "--amount", amount, env=env)
        previous = self.model.refs.get(("purchase", order))
        content = (user, Decimal(amount))
        if previous is None:
            self.expect(result, 0)
            self.model.refs["purchase", order] = content
            self.model.orders[order] = (user, points)
            self.model.award(user, points, self.now, pending=returnable, order=order)
        elif previous == content:
            assert self.expect(result, 0)["duplicate"] is True
        else:
            self.expect(result, 1, "conflict")

    @rule(user=users, photos=st.booleans(), again=st.booleans())
    def review(self, user: str, photos: bool, again: bool) -> None:
        review = f"rv-{self.counter}" if again and self.counter else self.next_id("rv")
        result = self.credex("award", "review", user, "--review", review, *(["--photos"] if photos else []))
        previous = self.model.refs.get(("review", review))
        if previous is None:
            self.expect(result, 0)
            self.model.refs["review", review] = (user, photos)
            self.model.award(user, PHOTO_POINTS if photos else REVIEW_POINTS, self.now, pending=False)
        elif previous == (user, photos):
            assert self.expect(result, 0)["duplicate"] is True
        else:
            self.expect(result, 1, "conflict")

    @rule(user=users, points=st.integers(-200, 200).filter(bool), again=st.booleans())
    def grant(self, user: str, points: int, again: bool) -> None:
        ref = f"g-{self.counter}" if again and self.counter else self.next_id("g")
        result = self.credex("award", "grant", user, points, "--reason", "model", "--ref", ref)
        previous = self.model.refs.get(("grant", ref))
        account = self.model.accounts.get(user)
        if previous is not None:
            if previous == (user, points):
                assert self.expect(result, 0)["duplicate"] is True
            else:
                self.expect(result, 1, "conflict")
        elif points > 0:
            self.expect(result, 0)
            self.model.refs["grant", ref] = (user, points)
            self.model.award(user, points, self.now, pending=False)
        elif account is None or account.balance < -points:
            self.expect(result, 1, "insufficient_points")  # and no account is left behind
        else:
            self.expect(result, 0)
            self.model.refs["grant", ref] = (user, points)
            account.balance += points
            account.earned += points
            self.model.take(user, -points)

    @rule(
        pick=st.integers(0, 50),
        amount=st.none() | st.integers(1, 150),
        refund=st.integers(0, 5),
        other=st.sampled_from([False, False, False, True]),  # now and then someone else's order
    )
    def refund(self, pick: int, amount: int | None, refund: int, other: bool) -> None:
        orders = sorted(self.model.orders)
        order = orders[pick % len(orders)] if orders else "o-none"
        owner = self.model.orders.get(order, ("u1", 0))[0]
        user = ("u2" if owner == "u1" else "u1") if other else owner
        refund_id = f"rf-{refund}"
        args = ["award", "refund", user, "--order", order, "--refund", refund_id]
        result = self.credex(*args, *(["--amount", amount] if amount is not None else []))
        detail = (user, order, "all" if amount is None else f"{amount}")
        previous = self.model.refs.get(("refund", refund_id))
        if previous is not None:
            if previous == detail:
                assert self.expect(result, 0)["duplicate"] is True
            else:
                self.expect(result, 1, "conflict")
            return
        if order not in self.model.orders or owner != user:
            self.expect(result, 1, "unknown_order")
            return
        answer = self.expect(result, 0)
        self.model.refs["refund", refund_id] = detail
        earned = self.model.orders[order][1]
        wanted = earned if amount is None else amount
        clawback = max(0, min(wanted, earned - self.model.clawed[order]))
        self.model.clawed[order] += clawback
        account = self.model.accounts[user]
        (lot,) = [lot for lot in self.model.lots if lot.order == order]
        from_pending = min(clawback, lot.remaining) if lot.state == "pending" else 0
        from_balance = min(account.balance, clawback - from_pending)
        to_debt = clawback - from_pending - from_balance
        lot.remaining -= from_pending
        if lot.state == "pending" and lot.remaining == 0:
            lot.state = "used"
        account.pending -= from_pending
        account.balance -= from_balance
        self.model.take(user, from_balance)
        account.debt += to_debt
        account.earned -= clawback
        assert (answer["clawback"], answer["debt"]) == (clawback, to_debt)

    @rule(amount=st.none() | st.integers(1, 150), refund=st.integers(0, 5))
    def refund_the_first_order(self, amount: int | None, refund: int) -> None:
        """The order whose points were spent at once: its refund leaves debt."""
        self.refund(0, amount, refund, other=False)

    @rule(
        user=users,
        sku=st.sampled_from(SKUS),
        quantity=st.integers(1, 3) | st.just("all"),
        again=st.booleans(),
    )
    def redeem(self, user: str, sku: str, quantity: int | str, again: bool) -> None:
        if quantity == "all":  # a splurge: as many as the balance buys
            gift, account = self.model.gifts.get(sku), self.model.accounts.get(user)
            quantity = max(1, account.balance // gift.price) if gift and account else 1
        request = f"req-{self.counter}" if again and self.counter else self.next_id("req")
        result = self.credex(
            "redeem",
            "create",
            user,
            sku,
            "--quantity",
            quantity,
            "--address",
            "1 Model Lane",
            "--request-id",
            request,
        )
        previous = self.model.requests.get(request)
        content = (user, sku, quantity)
        gift, account = self.model.gifts.get(sku), self.model.accounts.get(user)
        if previous is not None:
            if previous == content:
                assert self.expect(result, 0)["duplicate"] is True
            else:
                self.expect(result, 1, "conflict")
        elif gift is None or not gift.active:
            self.expect(result, 1, "unknown_sku")
        elif account is None:
            self.expect(result, 1, "unknown_user")
        elif account.balance < gift.price * quantity:
            self.expect(result, 1, "insufficient_points")
        elif gift.stock is not None and gift.stock < quantity:
            self.expect(result, 1, "out_of_stock")
        else:
            answer = self.expect(result, 0)
            cost = gift.price * quantity
            assert (answer["points"], answer["duplicate"]) == (cost, False)
            self.model.requests[request] = content
            account.balance -= cost
            account.redeemed += cost
            takes = self.model.take(user, cost)
            self.model.redemptions.append(
                Redemption(answer["redemption_id"], user, sku, quantity, cost, takes, gift.stock is not None)
            )
            if gift.stock is not None:
                gift.stock -= quantity
            self.model.messages += 1

    @rule(pick=st.integers(0, 50), known=st.booleans())
    def cancel(self, pick: int, known: bool) -> None:
        """No relay runs here: every redemption is still pending, so a cancel takes the short
        path (withdrawn and refunded at once); a second cancel is a repeat."""
        redemptions = self.model.redemptions
        if not known or not redemptions:
            number = 1 + max((r.id for r in redemptions), default=0) + pick
            self.expect(self.credex("redeem", "cancel", number, "--reason", "model"), 1, "unknown_redemption")
            return
        redemption = redemptions[pick % len(redemptions)]
        answer = self.expect(self.credex("redeem", "cancel", redemption.id, "--reason", "model"), 0)
        assert answer["status"] == "cancelled", answer
        if redemption.status == "cancelled":
            assert answer["duplicate"] is True
            return
        assert (answer["duplicate"], answer["cancel"]) == (False, "withdrawn"), answer
        self.model.cancel(redemption)

    @rule(sku=st.sampled_from(SKUS), price=st.integers(5, 80), stock=st.none() | st.integers(0, 5))
    def stock_the_catalog(self, sku: str, price: int, stock: int | None) -> None:
        if sku in self.model.gifts:
            stock_args = ["--stock", "unlimited" if stock is None else stock]
            result = self.credex("catalog", "update", sku, "--points", price, *stock_args, "--active")
        else:
            stock_args = [] if stock is None else ["--stock", stock]
            result = self.credex("catalog", "add", sku, "--name", sku.title(), "--points", price, *stock_args)
        self.expect(result, 0)
        self.model.gifts[sku] = Gift(price, stock)

    @precondition(lambda self: bool(self.model.gifts))
    @rule(sku=st.sampled_from(SKUS))
    def withdraw_a_gift(self, sku: str) -> None:
        result = self.credex("catalog", "update", sku, "--inactive")
        if sku in self.model.gifts:
            self.expect(result, 0)
            self.model.gifts[sku].active = False
        else:
            self.expect(result, 1, "unknown_sku")

    @rule()
    def settle(self) -> None:
        owed = sum(account.debt for account in self.model.accounts.values())
        self.expect(self.credex("award", "settle"), 0)
        self.model.settle(self.now)
        self.edges += 3 * (owed > sum(account.debt for account in self.model.accounts.values()))

    @rule()
    def expire(self) -> None:
        self.expect(self.credex("award", "expire"), 0)
        self.model.expire(self.now)

    @rule(command=st.sampled_from(BAD_INPUT))
    def bad_input(self, command: tuple) -> None:
        self.expect(self.credex(*command), 2, "invalid_input")

    # --- after every step -----------------------------------------------------------------------

    def _connect(self):
        from credex.db.engine import get_engine

        return get_engine(self.url).connect()

    @invariant()
    def the_database_is_what_the_model_says(self) -> None:
        model = self.model
        with self._connect() as connection:
            accounts = {
                row.user_id: Account(row.balance, row.pending, row.debt, row.earned, row.redeemed)
                for row in connection.execute(
                    text("SELECT user_id, balance, pending, debt, earned, redeemed FROM account")
                )
            }
            gifts = {
                row.sku: Gift(row.points, row.stock, bool(row.active))
                for row in connection.execute(text("SELECT sku, points, stock, active FROM catalog_item"))
            }
            messages = connection.execute(
                text("SELECT count(*) FROM outbox_message WHERE state = 'pending'")
            ).scalar()
            lots = connection.execute(
                text("SELECT user_id, remaining, state FROM point_lot ORDER BY id")
            ).all()
        assert accounts == model.accounts
        assert gifts == model.gifts
        assert messages == model.messages
        assert [tuple(lot) for lot in lots] == [(lot.user, lot.remaining, lot.state) for lot in model.lots]

    @invariant()
    def every_rule_holds(self) -> None:
        check_invariants(self.url, book=self.book)
        self.edges += any(account.debt and account.pending for account in self.model.accounts.values())

    @precondition(lambda self: bool(self.model.accounts) and self.counter % 3 == 0)
    @invariant()
    def account_show_tells_the_same(self) -> None:  # every third step: the command line costs most
        user = sorted(self.model.accounts)[self.counter % len(self.model.accounts)]
        shown = self.expect(self.credex("account", "show", user), 0)
        account = self.model.accounts[user]
        assert (shown["balance"], shown["pending"], shown["debt"]) == (
            account.balance,
            account.pending,
            account.debt,
        )
        assert shown["expiring"] == self.model.expiring(user)


# --- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory) -> str:
    from credex.db.engine import dispose_engines, upgrade

    path = tmp_path_factory.mktemp("model") / "template.db"
    upgrade(f"sqlite:///{path}")
    dispose_engines()
    return str(path)


def steps_settings(share: float = 1.0) -> settings:
    """The profile's number of examples (conftest.py), ``share`` of them."""
    return settings(
        settings.default,
        max_examples=max(3, int(settings.default.max_examples * share)),
        stateful_step_count=18,
    )


@pytest.mark.timeout(900)
def test_the_points_program_does_what_its_model_says_on_sqlite(sqlite_template, tmp_path):
    from credex.db.engine import dispose_engines

    def make_database():
        path = tmp_path / f"{uuid.uuid4().hex}.db"
        shutil.copy(sqlite_template, path)

        def drop() -> None:
            dispose_engines()
            path.unlink()

        return f"sqlite:///{path}", drop

    PointsProgram.make_database = staticmethod(make_database)
    run_state_machine_as_test(PointsProgram, settings=steps_settings())


@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_the_points_program_does_what_its_model_says_on_postgres(postgres_template):
    from tests.conftest import make_postgres_database

    PointsProgram.make_database = staticmethod(lambda: make_postgres_database(postgres_template))
    run_state_machine_as_test(PointsProgram, settings=steps_settings(share=0.4))


def walk(machine: PointsProgram, steps: list[tuple]) -> None:
    """Run ``steps`` (rule name, arguments) on ``machine``, checking after each as hypothesis does."""
    try:
        for name, kwargs in steps:
            getattr(machine, name)(**kwargs)
            machine.the_database_is_what_the_model_says()
            machine.every_rule_holds()
            if machine.model.accounts:
                machine.account_show_tells_the_same()
    finally:
        machine.teardown()


# The rarest edges, walked on every run: debt beside pending points, paid by settling; points
# that expire after part of them paid debt; a refund of pending points; refused steps between.
EDGES = [
    ("open_the_shop", {"amount": "80.00", "returnable": False, "later": "50.00"}),
    ("refund_the_first_order", {"amount": None, "refund": 1}),  # 80 spent: all of it is debt
    ("redeem", {"user": "u1", "sku": "MUG", "quantity": 1, "again": False}),  # refused: nothing to spend
    ("purchase", {"user": "u1", "amount": "30.00", "returnable": True, "again": False, "pick": 0}),
    ("refund", {"pick": 2, "amount": 10, "refund": 2, "other": False}),  # 10 of the pending 30
    ("review", {"user": "u1", "photos": True, "again": False}),  # pays 20 of the debt
    ("time_passes", {"days": 11, "hours": 0, "cron": True}),  # settles 50 + 20: pays the rest first
    ("grant", {"user": "u1", "points": -5, "again": False}),
    ("time_passes", {"days": 61, "hours": 1, "cron": True}),  # what is left expires
    ("bad_input", {"command": BAD_INPUT[0]}),
]

# A cancel's rarest edges: the opening splurge on caps (its points from the first order and a
# grant) cancelled while debt is left and after those lots' expiry: debt first, the rest back
# into the lots it came from, which lapse again at the next expiry run; a repeat; an unknown id.
CANCEL_EDGES = [
    ("open_the_shop", {"amount": "80.00", "returnable": False, "later": "50.00"}),
    ("refund_the_first_order", {"amount": None, "refund": 1}),  # 80 spent: all of it is debt
    ("time_passes", {"days": 61, "hours": 0, "cron": True}),  # the pending 50 pays part of it
    ("cancel", {"pick": 0, "known": True}),
    ("cancel", {"pick": 0, "known": True}),
    ("cancel", {"pick": 7, "known": False}),
    ("time_passes", {"days": 1, "hours": 0, "cron": True}),
]


@pytest.mark.parametrize("edges", [EDGES, CANCEL_EDGES], ids=["lifecycle", "cancel"])
def test_the_model_walks_the_rarest_edges_on_sqlite(sqlite_template, tmp_path, edges):
    from credex.db.engine import dispose_engines

    path = tmp_path / "edges.db"
    shutil.copy(sqlite_template, path)
    PointsProgram.make_database = staticmethod(lambda: (f"sqlite:///{path}", dispose_engines))
    walk(PointsProgram(), edges)


@pytest.mark.postgres
@pytest.mark.parametrize("edges", [EDGES, CANCEL_EDGES], ids=["lifecycle", "cancel"])
def test_the_model_walks_the_rarest_edges_on_postgres(postgres_template, edges):
    from tests.conftest import make_postgres_database

    PointsProgram.make_database = staticmethod(lambda: make_postgres_database(postgres_template))
    walk(PointsProgram(), edges)


def test_a_purchase_too_small_to_earn_a_point_is_answered_and_changes_nothing(db_url, credex):
    credex("award", "grant", "u1", "5", "--reason", "opening", "--ref", "open-u1")
    result = credex("award", "purchase", "u1", "--order", "o-cheap", "--amount", "0.50", "--json")
    # points = floor(amount x rate) = 0: nothing to record, said as bad input naming --amount.
    assert result.exit_code == 2, result.stderr
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "invalid_input" and "--amount" in error["message"], error
    assert credex("account", "show", "u1", "--json").json()["balance"] == 5
    assert [e["ref"] for e in credex("account", "history", "u1", "--json").json()] == ["open-u1"]
