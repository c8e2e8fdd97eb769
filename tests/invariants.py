"""Every rule of domain.md (and of the points lifecycle), checked straight on the databases.

``check_invariants(db_url)`` reads everything once and reports every broken rule at once, each
naming the ids involved, the way ``credex audit verify`` will. The ``db_url`` tests run it at
teardown (conftest.py); a test that breaks data on purpose opts out with
``@pytest.mark.breaks_invariants``.

To grow it with a new state or ledger kind, add a line to ``REDEMPTION_STATES`` or
``LEDGER_KINDS``: a status or kind the tables below do not know is itself reported, so a new
one cannot slip past unchecked.

(Over 400 lines on purpose: one checker for every rule, so that every test's teardown and
``credex audit verify``'s tests read the rules from one place; split, a rule could be left out.)
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import text

from credex.db.engine import get_engine

# --- what each state and kind means to the rules ---------------------------------------------


class RedemptionState(NamedTuple):
    holds_stock: bool  # the gift's stock stays taken (False: a cancel or a return gave it back)
    # The warehouse confirmed it: a waybill, a confirmed (or purged) message. None: either way
    # (a cancel may come before or after the waybill).
    confirmed: bool | None
    refunded: bool = False  # exactly one redemption_refund of exactly its points


REDEMPTION_STATES: dict[str, RedemptionState] = {
    "pending": RedemptionState(holds_stock=True, confirmed=False),
    "shipping": RedemptionState(holds_stock=True, confirmed=True),
    "cancelling": RedemptionState(holds_stock=True, confirmed=None),
    "cancelled": RedemptionState(holds_stock=False, confirmed=None, refunded=True),
    "delivered": RedemptionState(holds_stock=True, confirmed=True),
    "returned": RedemptionState(holds_stock=False, confirmed=True, refunded=True),
    "exception": RedemptionState(holds_stock=True, confirmed=False),
}


class LedgerKind(NamedTuple):
    earned: bool = False  # counts in account.earned: its gross points (balance + pending - debt)
    redeemed: bool = False  # counts in account.redeemed: minus its gross points
    makes_lot: bool = False  # a positive entry of this kind is a lot of its own


LEDGER_KINDS: dict[str, LedgerKind] = {
    "purchase": LedgerKind(earned=True, makes_lot=True),
    "review": LedgerKind(earned=True, makes_lot=True),
    "grant": LedgerKind(earned=True, makes_lot=True),
    "refund": LedgerKind(earned=True),  # a clawback: earned goes down by what it took back
    "settle": LedgerKind(),
    "expiry": LedgerKind(),
    "redemption": LedgerKind(redeemed=True),
    # A cancelled or returned redemption's points back (debt paid first): redeemed goes down by all of them.
    "redemption_refund": LedgerKind(redeemed=True),
}
REFUND_KIND = "redemption_refund"

MESSAGE_STATES = ("pending", "sent", "confirmed", "dead", "cancelled")


class ShipmentState(NamedTuple):
    waybill: str  # "kept": the row holds its express number; "none": it holds none; "any"


# The warehouse's row state machine (docs/redemptions.md). Whether a cancelled row's waybill is
# void is the carrier's to say (tests ask the sandbox), not the database's.
SHIPMENT_STATES: dict[str, ShipmentState] = {
    "requested": ShipmentState(waybill="none"),
    "requesting": ShipmentState(waybill="none"),
    "waybill": ShipmentState(waybill="kept"),
    "cancelled": ShipmentState(waybill="any"),  # a tombstone, or a waybill cancelled at the carrier
    "failed": ShipmentState(waybill="none"),
}
REDEMPTION_CREATED = "redemption.created"
REDEMPTION_CANCELLED = "redemption.cancelled"
ROUTING_KEYS = (REDEMPTION_CREATED, REDEMPTION_CANCELLED)
STOCK_KINDS = ("set", "redeem", "cancel", "return")


# --- the stock a test set ------------------------------------------------------------------------


@dataclass
class StockSet:
    """``catalog add/update`` left ``sku`` at ``stock`` units costing ``points`` each, when the
    newest redemption was ``after`` (``uncertain``: a redemption committed during the change)."""

    stock: int | None
    points: int
    after: int
    uncertain: bool = False


@dataclass
class CatalogBook:
    """What a test did to the catalog, in order: the stock each gift was set to and its price,
    and which redemptions came after. The ``credex`` fixture records every ``catalog add`` and
    ``catalog update``; a test that fills the catalog another way calls ``record`` itself."""

    sets: dict[str, list[StockSet]] = field(default_factory=lambda: defaultdict(list))

    def record(self, sku: str, *, stock: int | None, points: int, after: int, before: int | None = None):
        uncertain = before is not None and before != after
        self.sets[sku].append(StockSet(stock, points, after, uncertain))

    def record_from(self, db_url: str, sku: str, *, before: int) -> None:
        """Read what ``sku`` is now (right after a successful change) and record it."""
        with get_engine(db_url).connect() as connection:
            row = connection.execute(
                text("SELECT stock, points FROM catalog_item WHERE sku = :sku"), {"sku": sku}
            ).first()
            after = newest_redemption(connection)
        if row is not None:
            self.record(sku, stock=row.stock, points=row.points, after=after, before=before)


def newest_redemption(connection) -> int:
    return connection.execute(text("SELECT coalesce(max(id), 0) FROM redemption")).scalar()


# --- the check ---------------------------------------------------------------------------------


@dataclass
class Violation:
    check: str
    ids: object
    detail: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.ids}: {self.detail}"


class InvariantsBroken(AssertionError):
    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        shown = "\n  ".join(str(v) for v in violations[:40])
        more = f"\n  … and {len(violations) - 40} more" if len(violations) > 40 else ""
        super().__init__(f"{len(violations)} invariant(s) broken:\n  {shown}{more}")


def _rows(connection, sql: str):
    return connection.execute(text(sql)).all()


def check_invariants(
    db_url: str,
    *,
    warehouse_db_url: str | None = None,
    book: CatalogBook | None = None,
    stocks: dict[str, int] | None = None,
    shipped: bool = False,
    legacy_upto: int = 0,
) -> dict:
    """Check every rule; raise InvariantsBroken listing each broken one. Returns totals.

    ``book`` (or ``stocks``: sku -> the stock set at the start, never changed since) turns on
    stock conservation and price checks for those gifts. ``shipped``: a warehouse really ran, so
    every confirmed redemption must have its shipment request. ``legacy_upto``: ledger entries up
    to this id predate the lots (migration 0002 carried their points over as one lot per account).
    """
    violations: list[Violation] = []

    def bad(check: str, ids: object, detail: str) -> None:
        violations.append(Violation(check, ids, detail))

    if db_url.startswith("sqlite:///") and not Path(db_url.removeprefix("sqlite:///")).exists():
        return {}  # never created: nothing to check (and asking would create it)
    engine = get_engine(db_url)
    with engine.connect() as connection:
        if not _has_table(connection, "account"):
            return {}  # credex never got as far as creating its schema: nothing to check
        accounts = _rows(connection, "SELECT user_id, balance, pending, debt, earned, redeemed FROM account")
        entries = _rows(
            connection,
            "SELECT id, user_id, kind, ref, points, pending, debt, balance, source_id, detail "
            "FROM ledger_entry ORDER BY id",
        )
        lots = _rows(connection, "SELECT id, user_id, entry_id, points, remaining, state FROM point_lot")
        uses = _rows(connection, "SELECT lot_id, entry_id, points FROM lot_use")
        items = _rows(connection, "SELECT sku, points, stock FROM catalog_item")
        redemptions = _rows(
            connection,
            "SELECT id, request_id, user_id, sku, quantity, points, balance, address, status, "
            "message_id, carrier, express_no, created_at FROM redemption ORDER BY id",
        )
        messages = _rows(
            connection,
            "SELECT id, redemption_id, routing_key, body, state, attempts, sent_at, confirmed_at, "
            "created_at FROM outbox_message",
        )
        texts = _rows(
            connection,
            "SELECT 'ledger_entry' AS tbl, CAST(id AS VARCHAR(20)) AS id, operator, reason, NULL AS name "
            "FROM ledger_entry UNION ALL "
            "SELECT 'catalog_item', sku, NULL, NULL, name FROM catalog_item UNION ALL "
            "SELECT 'redemption', CAST(id AS VARCHAR(20)), operator, NULL, NULL FROM redemption",
        )
        guards = _append_only_guards(connection)
        movements = (
            _rows(connection, "SELECT id, sku, kind, delta, stock_after, ref FROM stock_movement ORDER BY id")
            if _has_table(connection, "stock_movement")
            else None
        )
    shipment_requests = []
    warehouse_url = warehouse_db_url or db_url
    with get_engine(warehouse_url).connect() as connection:
        if _has_table(connection, "shipment_request"):
            from sqlalchemy import inspect

            columns = {c["name"] for c in inspect(connection).get_columns("shipment_request")}
            lifecycle = (
                "status, idempotency_key"
                if "status" in columns
                else "'waybill' AS status, message_id AS idempotency_key"  # before migration 0005
            )
            shipment_requests = _rows(
                connection,
                "SELECT id, type, redemption_id, message_id, sku, quantity, address, carrier, express_no, "
                f"{lifecycle} FROM shipment_request",
            )

    _check_ledger_and_accounts(bad, accounts, entries)
    _check_lots(bad, accounts, entries, lots, uses, legacy_upto)
    _check_redemptions(bad, redemptions, entries, messages, items)
    _check_refunds(bad, redemptions, entries, messages)
    _check_stock(bad, items, redemptions, book, stocks)
    if movements is not None:
        _check_movements(bad, items, redemptions, movements)
    _check_shipments(bad, redemptions, messages, shipment_requests, shipped)
    _check_input_rules(bad, accounts, entries, items, redemptions, texts)
    for action in sorted({"UPDATE", "DELETE"} - guards):
        bad("ledger.append_only", action, f"no trigger refuses {action} of ledger entries (migration 0008)")
    if violations:
        raise InvariantsBroken(violations)
    return {
        "accounts": len(accounts),
        "balance": sum(a.balance for a in accounts),
        "pending": sum(a.pending for a in accounts),
        "debt": sum(a.debt for a in accounts),
        "entries": len(entries),
        "lots": len(lots),
        "expired_lots": sum(1 for lot in lots if lot.state == "expired"),
        "redemptions": len(redemptions),
        "messages": len(messages),
        "shipment_requests": len(shipment_requests),
    }


def check_points_invariants(db_url: str) -> dict:
    """Every rule (``check_invariants``); the counts of redemptions and outbox messages."""
    totals = check_invariants(db_url)
    return {"redemptions": totals["redemptions"], "messages": totals["messages"]}


def _append_only_guards(connection) -> set[str]:
    """The statements a trigger refuses on ledger_entry: a migration that rebuilds the table (SQLite's
    batch mode copies it) must put the append-only triggers back."""
    if connection.dialect.name == "sqlite":
        sql = "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'ledger_entry'"
    else:
        sql = (
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger "
            "WHERE tgrelid = 'ledger_entry'::regclass AND NOT tgisinternal AND tgenabled <> 'D'"
        )
    found = " ".join(row[0].upper() for row in _rows(connection, sql))
    return {
        action for action in ("UPDATE", "DELETE") if f"BEFORE {action}" in found or f"OR {action}" in found
    }


def _has_table(connection, name: str) -> bool:
    from sqlalchemy import inspect

    return inspect(connection).has_table(name)


def _check_ledger_and_accounts(bad, accounts, entries) -> None:
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])  # balance pending debt earned redeemed
    seen_refs: dict[tuple[str, str], int] = {}
    for entry in entries:
        kind = LEDGER_KINDS.get(entry.kind)
        if kind is None:
            bad("ledger.kind", entry.id, f"unknown kind {entry.kind!r}: add it to invariants.LEDGER_KINDS")
            continue
        if (entry.kind, entry.ref) in seen_refs:
            bad(
                "ledger.ref_once",
                (seen_refs[entry.kind, entry.ref], entry.id),
                f"{entry.kind} {entry.ref} twice",
            )
        seen_refs[entry.kind, entry.ref] = entry.id
        total = sums[entry.user_id]
        total[0] += entry.points
        total[1] += entry.pending
        total[2] += entry.debt
        if kind.earned:
            total[3] += entry.points + entry.pending - entry.debt
        if kind.redeemed:
            total[4] -= entry.points + entry.pending - entry.debt
        if entry.balance != total[0]:
            bad(
                "ledger.running_balance",
                entry.id,
                f"{entry.user_id}'s entry records balance {entry.balance}, its ledger sums to {total[0]}",
            )
    known = set()
    for account in accounts:
        known.add(account.user_id)
        where = f"account {account.user_id}"
        for column in ("balance", "pending", "debt"):
            if getattr(account, column) < 0:
                bad(f"account.{column}_nonnegative", account.user_id, f"{column} {getattr(account, column)}")
        balance, pending, debt, earned, redeemed = sums[account.user_id]
        found = (account.balance, account.pending, account.debt)
        if found != (balance, pending, debt):
            bad(
                "account.ledger",
                account.user_id,
                f"{where}: balance/pending/debt {found}, the ledger sums to {(balance, pending, debt)}",
            )
        if account.earned != earned:
            bad("account.earned", account.user_id, f"earned {account.earned}, the ledger says {earned}")
        if account.redeemed != redeemed:
            bad(
                "account.redeemed",
                account.user_id,
                f"redeemed {account.redeemed}, the ledger says {redeemed}",
            )
        if account.debt and account.balance:
            bad(
                "account.debt_paid_first",
                account.user_id,
                f"debt {account.debt} beside balance {account.balance}",
            )
    for user in sorted(set(sums) - known):
        bad("ledger.account", user, "ledger entries without an account")


def _check_lots(bad, accounts, entries, lots, uses, legacy_upto: int) -> None:
    by_entry = {e.id: e for e in entries}
    in_lots: dict[str, dict[str, int]] = defaultdict(lambda: {"available": 0, "pending": 0})
    used_by_lot: dict[int, list] = defaultdict(list)
    used_by_entry: dict[int, int] = defaultdict(int)
    for use in uses:
        put_back = use.entry_id in by_entry and by_entry[use.entry_id].kind == REFUND_KIND
        if put_back and use.points >= 0:
            bad("lot_use.put_back", (use.lot_id, use.entry_id), f"a refund took {use.points} points out")
        elif not put_back and use.points <= 0:
            bad("lot_use.positive", (use.lot_id, use.entry_id), f"{use.points} points")
        used_by_lot[use.lot_id].append(use)
        used_by_entry[use.entry_id] += use.points
    made_by_entry: dict[int, int] = defaultdict(int)
    for lot in lots:
        where = f"lot {lot.id} ({lot.state}, {lot.user_id})"
        if lot.state in ("available", "pending"):
            in_lots[lot.user_id][lot.state] += lot.remaining
        if not 0 <= lot.remaining <= lot.points:
            bad("lot.remaining", lot.id, f"{where}: remaining {lot.remaining} of {lot.points}")
        taken = sum(u.points for u in used_by_lot[lot.id])
        if lot.points - lot.remaining != taken:
            bad(
                "lot.uses",
                lot.id,
                f"{where}: {lot.points - lot.remaining} taken out, its uses add up to {taken}",
            )
        if lot.state == "available" and lot.remaining <= 0:
            bad("lot.state", lot.id, f"{where}: nothing left in an available lot")
        elif lot.state in ("used", "expired") and lot.remaining != 0:
            bad("lot.state", lot.id, f"{where}: {lot.remaining} left in a finished lot")
        elif lot.state not in ("available", "pending", "used", "expired"):
            bad("lot.state", lot.id, f"{where}: unknown state")
        _check_expiries(bad, lot, where, sorted(used_by_lot[lot.id], key=lambda u: u.entry_id), by_entry)
        if lot.entry_id is not None:
            made_by_entry[lot.entry_id] += lot.points
            entry = by_entry.get(lot.entry_id)
            if entry is None or not LEDGER_KINDS.get(entry.kind, LedgerKind()).makes_lot:
                bad("lot.award", lot.id, f"{where}: made by entry {lot.entry_id}, which is not an award")
    for account in accounts:
        found = in_lots[account.user_id]
        if account.balance != found["available"]:
            bad(
                "lots.balance",
                account.user_id,
                f"balance {account.balance}, available lots {found['available']}",
            )
        if account.pending != found["pending"]:
            bad(
                "lots.pending", account.user_id, f"pending {account.pending}, pending lots {found['pending']}"
            )
    clawed: dict[int, int] = defaultdict(int)
    for entry in entries:
        if entry.id > legacy_upto:
            moved = made_by_entry[entry.id] - used_by_entry[entry.id]
            if moved != entry.points + entry.pending:
                bad(
                    "lots.entry",
                    entry.id,
                    f"{entry.kind} {entry.ref}: its lots moved {moved}, "
                    f"its effect is {entry.points + entry.pending}",
                )
        if entry.kind == "refund":
            clawback = -(entry.points + entry.pending - entry.debt)
            if clawback < 0 or entry.debt < 0:
                bad(
                    "refund.sign",
                    entry.id,
                    f"refund {entry.ref} gives points back ({clawback}, debt {entry.debt})",
                )
            clawed[entry.source_id] += clawback
    for purchase_id, taken in clawed.items():
        purchase = by_entry.get(purchase_id)
        if purchase is None or purchase.kind != "purchase":
            bad("refund.order", purchase_id, "a refund of an entry that is not a purchase")
            continue
        earned = purchase.points + purchase.pending - purchase.debt
        if taken > earned:
            bad("refund.at_most_earned", purchase.ref, f"refunds took back {taken} of the {earned} it earned")


def _check_expiries(bad, lot, where: str, uses, by_entry) -> None:
    """A lot expires once, as its last use; points a refund puts back into an expired lot lapse
    again at the next expiry (one more expiry entry, after the put-back)."""
    kinds = [by_entry[u.entry_id].kind if u.entry_id in by_entry else None for u in uses]
    expiries = [u for u, kind in zip(uses, kinds, strict=True) if kind == "expiry"]
    lapsed_open = False  # an expiry with no put-back after it yet
    for kind in kinds:
        if kind == "expiry":
            if lapsed_open:
                bad("lot.expired_once", lot.id, f"{where}: expired twice with nothing put back between")
            lapsed_open = True
        elif kind == REFUND_KIND:
            lapsed_open = False
        elif lapsed_open:
            bad("lot.expired_last", lot.id, f"{where}: points taken after it expired")
    if lot.state == "expired":
        if not expiries:
            bad("lot.expired_once", lot.id, f"{where}: {len(expiries)} expiry entries")
        elif kinds[-1] != "expiry":
            bad("lot.expired_last", lot.id, f"{where}: points taken or put back after it expired")
    elif lapsed_open:
        bad("lot.expired_once", lot.id, f"{where}: expiry entries on a lot that did not expire")


def _check_refunds(bad, redemptions, entries, messages) -> None:
    """A cancelled or returned redemption has exactly one redemption_refund, of exactly its points,
    to its shopper; nothing else is refunded; and no refunded redemption may still ship: its
    redemption.created message is not on its way, and a waybill it had was cancelled by the
    warehouse (a confirmed redemption.cancelled) unless the parcel came back."""
    by_id = {r.id: r for r in redemptions}
    refunds: dict[str, list] = defaultdict(list)
    for entry in entries:
        if entry.kind == REFUND_KIND:
            refunds[entry.ref].append(entry)
    per_redemption: dict[int, list] = defaultdict(list)
    for message in messages:
        per_redemption[message.redemption_id].append(message)
    for ref in refunds:
        r = by_id.get(int(ref)) if ref.isdigit() else None
        if r is None:
            bad("refund.redemption", ref, "a redemption_refund of no redemption")
            continue
        if not REDEMPTION_STATES.get(r.status, RedemptionState(True, None)).refunded:
            bad("refund.status", r.id, f"redemption {r.id} is {r.status} and was refunded")
    for r in redemptions:
        state = REDEMPTION_STATES.get(r.status)
        if state is None or not state.refunded:
            continue
        found = refunds.get(str(r.id), [])
        if len(found) != 1:
            bad("refund.once", r.id, f"{r.status} redemption {r.id}: {len(found)} refunds")
            continue
        entry = found[0]
        gross = entry.points + entry.pending - entry.debt
        if entry.user_id != r.user_id or gross != r.points or entry.pending != 0 or entry.debt > 0:
            bad(
                "refund.points",
                (r.id, entry.id),
                f"redemption {r.id}: {r.points} points of {r.user_id}, refund of {gross} to {entry.user_id}",
            )
        own = per_redemption.get(r.id, [])
        created = [m for m in own if m.routing_key == REDEMPTION_CREATED]
        if any(m.state in ("pending", "sent") for m in created):
            bad("refund.still_shipping", r.id, f"refunded redemption {r.id}: its message may still ship it")
        cancel_confirmed = any(m.routing_key == REDEMPTION_CANCELLED and m.state == "confirmed" for m in own)
        if r.status == "cancelled" and r.express_no is not None and not cancel_confirmed:
            bad(
                "refund.live_waybill",
                r.id,
                f"cancelled redemption {r.id} has waybill {r.express_no}, no cancel the warehouse confirmed",
            )


def _check_movements(bad, items, redemptions, movements) -> None:
    """A gift's stock is the sum of its movements (unlimited counts as 0); each movement says the
    stock it left; a redemption takes stock once and gets it back at most once, and only when
    it was refunded."""
    by_sku: dict[str, list] = defaultdict(list)
    for m in movements:
        by_sku[m.sku].append(m)
        if m.kind not in STOCK_KINDS:
            bad("stock_movement.kind", m.id, f"unknown kind {m.kind!r}")
    for item in items:
        running = 0
        for m in by_sku.get(item.sku, []):
            running += m.delta
            if m.stock_after is not None and m.stock_after != running:
                bad(
                    "stock_movement.after",
                    m.id,
                    f"{item.sku}: says {m.stock_after} left, the sum is {running}",
                )
        if (item.stock or 0) != running:
            bad("stock.movements", item.sku, f"stock {item.stock}, its movements add up to {running}")
    by_id = {r.id: r for r in redemptions}
    per_ref: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for m in movements:
        if m.kind != "set":
            per_ref[m.ref][m.kind].append(m)
    for ref, kinds in per_ref.items():
        r = by_id.get(int(ref)) if ref and ref.isdigit() else None
        if r is None:
            bad("stock_movement.redemption", ref, "a movement of no redemption")
            continue
        took, back = kinds.get("redeem", []), kinds.get("cancel", []) + kinds.get("return", [])
        if len(took) > 1 or len(back) > 1 or (back and not took):
            bad("stock_movement.once", r.id, f"{len(took)} takes, {len(back)} gives back")
        if any(m.delta != -r.quantity for m in took) or any(m.delta != r.quantity for m in back):
            bad("stock_movement.quantity", r.id, f"moved other than its quantity {r.quantity}")
        holds = REDEMPTION_STATES.get(r.status, RedemptionState(True, None)).holds_stock
        if back and holds:
            bad("stock_movement.back", r.id, f"{r.status} redemption {r.id} gave its stock back")


def _check_redemptions(bad, redemptions, entries, messages, items) -> None:
    ledger = {(e.kind, e.ref): e for e in entries}
    created_messages: dict[int, list] = defaultdict(list)
    for message in messages:
        if message.state not in MESSAGE_STATES:
            bad("message.state", message.id, f"unknown state {message.state!r}")
        if message.routing_key == REDEMPTION_CREATED:
            created_messages[message.redemption_id].append(message)
        elif message.routing_key == REDEMPTION_CANCELLED:
            _check_cancel_body(bad, message)
        else:
            bad("message.routing_key", message.id, f"unknown routing key {message.routing_key!r}")
    ids = {r.id for r in redemptions}
    for redemption_id in sorted(set(created_messages) - ids, key=str):
        bad("message.redemption", redemption_id, "a redemption.created message without its redemption")
    request_ids: dict[str, int] = {}
    for r in redemptions:
        where = f"redemption {r.id} ({r.user_id}, {r.quantity} x {r.sku})"
        state = REDEMPTION_STATES.get(r.status)
        if state is None:
            bad(
                "redemption.status",
                r.id,
                f"{where}: unknown status {r.status!r}: add it to REDEMPTION_STATES",
            )
            state = RedemptionState(holds_stock=True, confirmed=None)
        if r.request_id is not None:
            if r.request_id in request_ids:
                bad(
                    "redemption.request_once", (request_ids[r.request_id], r.id), f"request id {r.request_id}"
                )
            request_ids[r.request_id] = r.id
        if r.quantity < 1 or r.points < 1 or r.points % r.quantity:
            bad("redemption.points", r.id, f"{where}: {r.points} points is no price x {r.quantity}")
        entry = ledger.get(("redemption", str(r.id)))
        if entry is None:
            bad("redemption.ledger", r.id, f"{where}: no ledger entry")
        elif (entry.user_id, entry.points, entry.balance) != (r.user_id, -r.points, r.balance):
            bad(
                "redemption.ledger",
                (r.id, entry.id),
                f"{where}: entry {entry.user_id} {entry.points} (balance {entry.balance}), "
                f"redemption {-r.points} (balance {r.balance})",
            )
        found = created_messages.get(r.id, [])
        if len(found) > 1:
            bad("redemption.one_message", r.id, f"{where}: {len(found)} redemption.created messages")
        if not found:
            # `relay purge` deletes confirmed messages: only a redemption whose create may have been
            # confirmed (a waybill, or cancelled by the warehouse's answer) may lack its own.
            if not ((state.confirmed is not False and r.express_no) or r.status == "cancelled"):
                bad("redemption.one_message", r.id, f"{where}: no outbox message")
            continue
        message = found[0]
        if message.id != r.message_id:
            bad("redemption.message_id", (r.id, message.id), f"{where}: its message id is {r.message_id}")
        if message.created_at != r.created_at:
            bad(
                "redemption.same_transaction",
                (r.id, message.id),
                f"{where}: written at {r.created_at}, its message at {message.created_at}",
            )
        _check_body(bad, r, message, where)
        if (
            message.state == "confirmed"
            and state.confirmed is not None
            and not (state.confirmed and r.express_no)
        ):
            bad("redemption.confirmed", r.id, f"{where}: message confirmed, status {r.status}, no waybill")
        if message.state == "cancelled" and r.status != "cancelled":
            bad("redemption.withdrawn", r.id, f"{where}: message withdrawn, status {r.status}")
        if message.state == "dead" and r.status == "shipping":
            bad("redemption.dead", r.id, f"{where}: shipping with a dead message")
        if message.state != "confirmed" and state.confirmed:
            bad("redemption.confirmed", r.id, f"{where}: {r.status} but its message is {message.state}")


def _check_cancel_body(bad, message) -> None:
    try:
        body = json.loads(message.body)
    except ValueError:
        body = None
    if not isinstance(body, dict) or (body.get("message_id"), body.get("redemption_id")) != (
        message.id,
        message.redemption_id,
    ):
        bad("message.body", message.id, f"redemption.cancelled body {message.body!r}")


def _check_body(bad, r, message, where: str) -> None:
    try:
        body = json.loads(message.body)
    except ValueError:
        bad("message.body", message.id, f"{where}: the body is not JSON")
        return
    expected = {
        "message_id": r.message_id,
        "redemption_id": r.id,
        "user_id": r.user_id,
        "sku": r.sku,
        "quantity": r.quantity,
        "points": r.points,
        "address": r.address,
    }
    found = {key: body.get(key) for key in expected} if isinstance(body, dict) else body
    if found != expected:
        bad("message.body", message.id, f"{where}: the body says {found}")


def _check_stock(bad, items, redemptions, book: CatalogBook | None, stocks: dict[str, int] | None) -> None:
    sets: dict[str, list[StockSet]] = {}
    if book is not None:
        sets.update(book.sets)
    for sku, stock in (stocks or {}).items():
        sets[sku] = [StockSet(stock, 0, 0)]  # no price known: the points rule is left to the book
    catalog = {item.sku: item for item in items}
    by_sku: dict[str, list] = defaultdict(list)
    for r in redemptions:
        by_sku[r.sku].append(r)
    for item in items:
        if item.stock is not None and item.stock < 0:
            bad("stock.nonnegative", item.sku, f"stock {item.stock}")
    for sku, history in sets.items():
        item = catalog.get(sku)
        if item is None:
            bad("stock.item", sku, "the test set its stock, the catalog has no such gift")
            continue
        # The price in force when each redemption was made.
        for r in by_sku[sku]:
            index = _set_before(history, r.id)
            if index is None or history[index].points == 0:
                continue
            if history[index].uncertain and history[index].after >= r.id:
                continue
            if r.points != history[index].points * r.quantity:
                bad(
                    "redemption.price",
                    r.id,
                    f"{r.quantity} x {sku} at {history[index].points} is "
                    f"{history[index].points * r.quantity}, it cost {r.points}",
                )
        last = history[-1]
        if last.uncertain:
            continue  # a redemption raced the change: which side of it it fell on is unknown
        if last.stock is None:
            if item.stock is not None:
                bad("stock.conserved", sku, f"set unlimited, the catalog says {item.stock}")
            continue
        taken = sum(r.quantity for r in by_sku[sku] if r.id > last.after and _holds_stock(r))
        if item.stock != last.stock - taken:
            bad(
                "stock.conserved",
                sku,
                f"set to {last.stock}, redemptions since took {taken}, the catalog says {item.stock}",
            )


def _holds_stock(redemption) -> bool:
    return REDEMPTION_STATES.get(redemption.status, RedemptionState(True, False)).holds_stock


def _set_before(history: list[StockSet], redemption_id: int) -> int | None:
    """The last change made before ``redemption_id`` (None: the gift was set up another way)."""
    found = None
    for index, change in enumerate(history):
        if change.after < redemption_id:
            found = index
    return found


def _check_shipment_row(bad, request) -> None:
    where = f"shipment request {request.id} (redemption {request.redemption_id}, {request.status})"
    state = SHIPMENT_STATES.get(request.status)
    if state is None:
        bad("shipment.status", request.id, f"{where}: unknown status: add it to SHIPMENT_STATES")
        return
    if state.waybill == "kept" and (request.express_no is None or request.carrier is None):
        bad("shipment.waybill_kept", request.id, f"{where}: no express number")
    if state.waybill == "none" and request.express_no is not None:
        bad("shipment.waybill_kept", request.id, f"{where}: holds express number {request.express_no}")
    tombstone = request.sku is None
    if tombstone and request.status != "cancelled":
        bad("shipment.tombstone", request.id, f"{where}: no sku, quantity or address, yet not cancelled")
    if tombstone and request.express_no is not None:
        bad("shipment.tombstone", request.id, f"{where}: a tombstone with a waybill")
    if not tombstone and (request.quantity is None or request.address is None or not request.idempotency_key):
        bad("shipment.complete", request.id, f"{where}: a request without quantity, address or carrier key")


def _check_shipments(bad, redemptions, messages, shipment_requests, shipped: bool) -> None:
    by_id = {r.id: r for r in redemptions}
    per_redemption: dict[int, list] = defaultdict(list)
    express: dict[tuple, list] = defaultdict(list)
    for request in shipment_requests:
        per_redemption[request.redemption_id].append(request)
        if request.express_no is not None:
            express[request.carrier, request.express_no].append(request.id)
        _check_shipment_row(bad, request)
    for redemption_id, requests in per_redemption.items():
        if len(requests) > 1:
            bad("shipment.once", redemption_id, f"{len(requests)} shipment requests")
    for (carrier, number), ids in express.items():
        if len(ids) > 1:
            bad("waybill.once", ids, f"express number {carrier} {number} on several shipment requests")
    for redemption_id, (request, *_) in per_redemption.items():
        r = by_id.get(redemption_id)
        if r is None or request.type != 2 or request.sku is None:
            continue  # a purchase, a tombstone, or a message a test made up: nothing to compare with
        found = (request.message_id, request.sku, request.quantity, request.address)
        if found != (r.message_id, r.sku, r.quantity, r.address):
            bad("shipment.matches", (redemption_id, request.id), f"the request says {found}")
        if r.express_no is not None and request.express_no != r.express_no:
            bad(
                "shipment.waybill",
                (redemption_id, request.id),
                f"the redemption shows {r.express_no}, its shipment request {request.express_no}",
            )
    if shipped:
        for r in redemptions:
            if REDEMPTION_STATES.get(r.status, RedemptionState(True, False)).confirmed is True:
                requests = per_redemption.get(r.id, [])
                if len(requests) != 1 or requests[0].express_no is None:
                    bad(
                        "shipment.confirmed", r.id, "confirmed without a shipment request holding its waybill"
                    )


def _check_input_rules(bad, accounts, entries, items, redemptions, texts) -> None:
    """Everything stored went through the input rules (cli.md): identifiers printable and within
    their column's length, free text without NUL or other controls. Free text may hold the tabs and
    line breaks that credex accepted before it refused them: such rows are still read (test_quick
    keeps one)."""
    from credex.points import rules

    def identifier(check: str, ids: object, value: str | None, longest: int) -> None:
        if value is not None and (problem := rules.text_problem(value, check, longest)):
            bad("input rules", ids, f"{problem}: {value!r}")

    def free_text(check: str, ids: object, value: str | None, longest: int) -> None:
        older = value and value.translate({ord(c): " " for c in "\t\r\n\u2028\u2029"})
        if value is not None and value.strip() and (problem := rules.text_problem(older, check, longest)):
            bad("input rules", ids, f"{problem}: {value!r}")

    for account in accounts:
        identifier("account user id", account.user_id, account.user_id, rules.USER_ID_MAX)
    for entry in entries:
        identifier("ledger ref", entry.id, entry.ref, rules.REF_MAX)
    for item in items:
        identifier("sku", item.sku, item.sku, rules.SKU_MAX)
    for r in redemptions:
        identifier("request id", r.id, r.request_id, rules.REQUEST_ID_MAX)
        free_text("address", r.id, r.address, rules.ADDRESS_MAX)
    for row in texts:
        identifier(f"{row.tbl} operator", row.id, row.operator, rules.OPERATOR_MAX)
        free_text(f"{row.tbl} reason", row.id, row.reason, rules.REASON_MAX)
        free_text(f"{row.tbl} name", row.id, row.name, rules.NAME_MAX)
