"""The warehouse's statements for many shipment requests at once do the same thing on both
backends, and on Postgres their text does not grow with the number of requests: one array
parameter per list, so that psycopg converts and prepares the text once (it caches only texts
under 4 kB with at most 50 parameters; credex/db/sql.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import event

from credex.db.engine import get_engine, session_for, upgrade
from credex.db.models import ShipmentStatus
from credex.logistics.model import Waybill
from credex.warehouse.messages import RedemptionMessage
from credex.warehouse.shipments import claim, open_requests, requests_of, save_waybills

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def messages(first: int, count: int) -> list[RedemptionMessage]:
    return [
        RedemptionMessage(f"m-{rid}", rid, f"u{rid}", "MUG", 1 + rid % 3, f"{rid} High St")
        for rid in range(first, first + count)
    ]


def run_recording(url: str, work) -> tuple[object, list[str]]:
    """work(session) in one committed transaction; returns its result and the SQL texts it sent
    (about shipment requests: not the driver's own questions on a new connection)."""
    texts: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        if "shipment_request" in statement:
            texts.append(statement)

    engine = get_engine(url)  # the write sessions' engine is an option of this one: it shares its events
    event.listen(engine, "before_cursor_execute", seen)
    try:
        with session_for(url, write=True) as session:
            result = work(session)
            session.commit()
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    return result, texts


def a_round(url: str, first: int, count: int) -> dict[str, list[str]]:
    """Open, claim, read and give waybills to ``count`` new requests (and one seen before);
    checks what each step did, returns the texts each step sent."""
    batch = messages(first, count)
    rids = [m.redemption_id for m in batch]
    texts = {}
    created, texts["open"] = run_recording(url, lambda s: open_requests(s, batch, now=NOW))
    assert sorted(created) == rids
    assert {row.status for row in created.values()} == {ShipmentStatus.requested.value}
    again, _ = run_recording(url, lambda s: open_requests(s, batch[:1], now=NOW))
    assert again == {}, "a request seen before is not created again"
    claimed, texts["claim"] = run_recording(url, lambda s: claim(s, rids, now=NOW))
    assert sorted(claimed) == rids
    rows, texts["read"] = run_recording(url, lambda s: requests_of(s, rids))
    assert {row.status for row in rows.values()} == {ShipmentStatus.requesting.value}
    waybills = [(rows[rid].id, Waybill("sandbox", f"SB{rid:08d}", f"s-{rid}")) for rid in rids]
    saved, texts["save"] = run_recording(url, lambda s: save_waybills(s, waybills, now=NOW))
    assert {row.redemption_id: row.express_no for row in saved.values()} == {
        rid: f"SB{rid:08d}" for rid in rids
    }
    after, _ = run_recording(url, lambda s: requests_of(s, rids))
    assert {row.status for row in after.values()} == {ShipmentStatus.waybill.value}
    assert {row.carrier_shipment_id for row in after.values()} == {f"s-{rid}" for rid in rids}
    assert {row.quantity for row in after.values()} == {m.quantity for m in batch}
    return texts


def test_many_requests_at_once_are_opened_claimed_and_given_their_waybills(db_url) -> None:
    upgrade(db_url)
    a_round(db_url, 1, 1)
    a_round(db_url, 100, 80)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_on_postgres_the_statements_are_one_text_whatever_the_number_of_requests(db_url) -> None:
    one = a_round(db_url, 1, 1)
    many = a_round(db_url, 100, 120)
    for step, texts in many.items():
        assert texts == one[step], f"{step}: the text changed with the number of requests"
        for text in texts:
            assert text.count("%(") <= 50 and len(text) <= 4096, f"{step}: {text}"
