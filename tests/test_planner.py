"""The planner's rules without a database: a batch planned at once ends exactly as its rows
planned one at a time (each on the state the previous one left), debt, corrections and expiry
included; and the small rules the lifecycle's jobs and refunds use."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from credex.db.models import LotState
from credex.points.planner import (
    AVAILABLE,
    NEW_LOT_IDS,
    PENDING,
    USED,
    Account,
    Entry,
    Planner,
    Refusal,
    StoredLot,
    clawback,
    debt_paid,
    expire,
    put_back,
    settle,
)

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
USERS = ("u1", "u2", "u3")


def accounts_and_lots():
    """Accounts with stored lots (their balance is the lots' sum) or a debt, some absent."""

    def build(specs):
        accounts, lots, next_id = {}, {}, 1
        for user, (exists, debt, remainders, ages) in zip(USERS, specs, strict=True):
            if not exists:
                continue
            stored = []
            for remaining, age in zip(remainders, ages, strict=False):
                stored.append(StoredLot(next_id, NOW - timedelta(days=age), remaining))
                next_id += 1
            balance = sum(lot.remaining for lot in stored)
            accounts[user] = Account(balance, 0, 0 if stored else debt, balance + 50)
            lots[user] = stored
        return accounts, lots

    account = st.tuples(
        st.booleans(),
        st.integers(0, 300),
        st.lists(st.integers(1, 120), max_size=4),
        st.lists(st.integers(0, 3), min_size=4, max_size=4),  # equal ages: the id decides
    )
    return st.lists(account, min_size=len(USERS), max_size=len(USERS)).map(build)


rows_strategy = st.lists(
    st.tuples(st.sampled_from(USERS), st.integers(-200, 250).filter(lambda p: p != 0)),
    min_size=1,
    max_size=40,
)


def award(planner: Planner, n: int, user: str, points: int, expiry_days: int) -> int | Refusal:
    return planner.award(
        user,
        points,
        kind="grant",
        ref=f"r-{n}",
        detail=f"points={points}",
        reason=None,
        expiry_days=expiry_days,
    )


def in_one_batch(accounts, lots, rows, expiry_days):
    """Entries, refusals, uses, lots (by the entry that made them, or stored id) and accounts."""
    planner = Planner(accounts, {user: lots.get(user, []) for user in USERS}, now=NOW)
    outcomes = [award(planner, n, user, points, expiry_days) for n, (user, points) in enumerate(rows)]
    plan = planner.plan
    entry_of = [n for n, outcome in enumerate(outcomes) if not isinstance(outcome, Refusal)]
    made = {number: ("new", entry_of[lot.entry]) for number, lot in enumerate(plan.lots)}
    uses = [
        (made[use.lot] if use.new else ("stored", use.lot), entry_of[use.entry], use.points)
        for use in plan.uses
    ]
    final = {("stored", lot.id): lot.remaining for user_lots in lots.values() for lot in user_lots}
    final.update({("stored", lot_id): left for lot_id, left in plan.stored_lots.items()})
    new_lots = {
        made[number]: (lot.user_id, lot.points, lot.state, lot.available_at, lot.expires_at)
        for number, lot in enumerate(plan.lots)
    }
    final.update({made[number]: lot.remaining for number, lot in enumerate(plan.lots)})
    entries = [plan.entries[outcome] if not isinstance(outcome, Refusal) else outcome for outcome in outcomes]
    return entries, uses, new_lots, final, {**accounts, **plan.accounts}, sorted(plan.created)


def one_at_a_time(accounts, lots, rows, expiry_days):
    """The same rows, each planned alone on the state the previous one stored."""
    accounts = dict(accounts)
    stored = {user: list(user_lots) for user, user_lots in lots.items()}
    identity = {lot.id: ("stored", lot.id) for user_lots in lots.values() for lot in user_lots}
    final = {("stored", lot.id): lot.remaining for user_lots in lots.values() for lot in user_lots}
    entries, uses, new_lots, created = [], [], {}, []
    next_id = NEW_LOT_IDS // 2  # above every stored id, as a database's next id would be
    for n, (user, points) in enumerate(rows):
        planner = Planner(accounts, {u: stored.get(u, []) for u in USERS}, now=NOW)
        outcome = award(planner, n, user, points, expiry_days)
        plan = planner.plan
        if isinstance(outcome, Refusal):
            entries.append(outcome)
            assert plan.entries == [] and plan.accounts == {}
            continue
        (entry,) = plan.entries
        entries.append(entry)
        ids = []
        for lot in plan.lots:
            identity[next_id] = ("new", n)
            new_lots[("new", n)] = (lot.user_id, lot.points, lot.state, lot.available_at, lot.expires_at)
            final[("new", n)] = lot.remaining
            if lot.state == AVAILABLE:
                stored.setdefault(user, []).append(StoredLot(next_id, lot.available_at, lot.remaining))
            ids.append(next_id)
            next_id += 1
        for use in plan.uses:
            lot_id = ids[use.lot] if use.new else use.lot
            uses.append((identity[lot_id], n, use.points))
        for lot_id, left in plan.stored_lots.items():
            final[identity[lot_id]] = left
            if identity[lot_id] in new_lots and not left:  # as the writer stores an emptied lot
                new_lots[identity[lot_id]] = (
                    new_lots[identity[lot_id]][:2] + (USED,) + new_lots[identity[lot_id]][3:]
                )
            stored[user] = [
                lot._replace(remaining=left) if lot.id == lot_id else lot
                for lot in stored[user]
                if lot.id != lot_id or left
            ]
        accounts.update(plan.accounts)
        created += plan.created
    return entries, uses, new_lots, final, accounts, sorted(created)


@settings(max_examples=200, deadline=None)
@given(accounts_and_lots(), rows_strategy, st.sampled_from([0, 30]))
def test_a_batch_planned_at_once_ends_as_its_rows_planned_one_at_a_time(state, rows, expiry_days):
    accounts, lots = state
    batch = in_one_batch(accounts, lots, rows, expiry_days)
    single = one_at_a_time(accounts, lots, rows, expiry_days)
    assert batch == single
    entries, _uses, new_lots, final, after, _created = batch
    # What a user checks: no balance below zero, each balance the sum of its spendable lots, and
    # every new lot expiring when the run said.
    for user, account in after.items():
        assert account.balance >= 0 and account.debt >= 0
        spendable = sum(
            left
            for key, left in final.items()
            if (key[0] == "stored" and any(lot.id == key[1] for lot in lots.get(user, [])))
            or (key[0] == "new" and new_lots[key][0] == user and new_lots[key][2] != PENDING)
        )
        assert spendable == account.balance
    for _user, _points, _state, available_at, expires_at in new_lots.values():
        assert expires_at == (available_at + timedelta(days=expiry_days) if expiry_days else None)


def test_a_credit_pays_the_debt_first_and_its_lot_keeps_the_rest():
    planner = Planner({"u1": Account(0, 0, 70, 0)}, {"u1": []}, now=NOW)
    entry = planner.award("u1", 100, kind="grant", ref="g", detail=None, reason=None)
    assert planner.plan.entries[entry] == Entry("u1", "grant", "g", 30, 0, -70, 30, None, None)
    (lot,) = planner.plan.lots
    assert (lot.points, lot.remaining, lot.state) == (100, 30, AVAILABLE)
    assert planner.plan.accounts["u1"] == Account(30, 0, 0, 100)


def test_a_debit_takes_the_oldest_lots_first_and_refuses_what_the_balance_cannot_cover():
    lots = [StoredLot(2, NOW - timedelta(days=1), 40), StoredLot(1, NOW - timedelta(days=5), 10)]
    planner = Planner({"u1": Account(50, 0, 0, 50)}, {"u1": lots}, now=NOW)
    refused = planner.award("u1", -51, kind="grant", ref="a", detail=None, reason=None)
    assert refused == Refusal("u1 has 50 points; taking 51 would go below zero", True)
    planner.award("u1", -30, kind="grant", ref="b", detail=None, reason=None)
    assert [(use.lot, use.points) for use in planner.plan.uses] == [(1, 10), (2, 20)]
    assert planner.plan.stored_lots == {1: 0, 2: 20}


def test_a_pending_award_waits_and_pays_no_debt():
    planner = Planner({"u1": Account(0, 0, 70, 0)}, {}, now=NOW)
    entry = planner.award("u1", 100, kind="purchase", ref="o", detail=None, reason=None, pending_days=14)
    assert planner.plan.entries[entry][3:7] == (0, 100, 0, 0)
    (lot,) = planner.plan.lots
    assert (lot.state, lot.available_at) == (PENDING, NOW + timedelta(days=14))


def test_the_lifecycle_rules():
    assert debt_paid(70, 100) == 70 and debt_paid(170, 100) == 100
    assert clawback(20, 100, pending_in_lot=50) == (50, 20, 30)
    assert put_back([(1, 10), (2, 40)], skip=25) == [(2, 25)]
    assert [tuple(s) for s in settle(0, 30, [20, 50])] == [(20, 0, 0, 10), (10, 40, 40, 0)]
    assert expire(100, [30, 70]) == [70, 0]
    assert (
        LotState.pending.value,
        LotState.available.value,
        LotState.used.value,
    ) == (PENDING, AVAILABLE, USED)
