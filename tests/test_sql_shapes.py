"""The warehouse's statements for many shipment requests at once (and the relay's record of
many confirmations) do the same thing on both backends, and on Postgres their text does not
grow with the number of rows: one array
parameter per list, so that psycopg converts and prepares the text once (it caches only texts
under 4 kB with at most 50 parameters; credex/db/sql.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import event
from sqlalchemy import text as sql_text

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


def run_recording(url: str, work, about: tuple[str, ...] = ("shipment_request",)) -> tuple[object, list[str]]:
    """work(session) in one committed transaction; returns its result and the SQL texts it sent
    (about the tables ``about``: not the driver's own questions on a new connection)."""
    texts: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        if any(table in statement for table in about):
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


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_on_postgres_the_relay_records_a_few_or_many_confirmations_with_the_same_texts(
    db_url, credex
) -> None:
    """The relay's record of the warehouse's confirmations (messages confirmed, each checked against
    the redemption its body names, waybills copied onto the redemptions, their ``shipping``
    events) sends the same texts for 1 and for 60."""
    from credex.relay.answers import Confirmation, record_confirmations

    assert credex("catalog", "add", "MUG", "--name", "Mug", "--points", "1", "--stock", "100").exit_code == 0
    assert credex("award", "grant", "u1", "1000", "--reason", "opening", "--ref", "open-u1").exit_code == 0
    made = []
    for _ in range(61):
        done = credex("redeem", "create", "u1", "MUG", "--address", "1 High St", "--json")
        assert done.exit_code == 0, done.stderr
        made.append(done.json())

    def confirm(batch: list[dict]) -> list[str]:
        confirmations = [  # every other one names its redemption, as the first warehouses did not
            Confirmation(
                r["message_id"],
                "sandbox",
                f"SB{r['redemption_id']:08d}",
                r["redemption_id"] if n % 2 else None,
            )
            for n, r in enumerate(batch)
        ]

        def work(session):
            return record_confirmations(session, confirmations, now=NOW)

        (confirmed, put_off), texts = run_recording(db_url, work, about=("outbox_message", "redemption"))
        assert (confirmed, put_off) == (len(batch), [])
        return texts

    one, many = confirm(made[:1]), confirm(made[1:])
    assert many == one, "the texts changed with the number of confirmations"
    for text in many:
        assert text.count("%(") <= 50 and len(text) <= 4096, text
    with get_engine(db_url).connect() as connection:
        shipping = connection.execute(
            sql_text("SELECT id, express_no FROM redemption WHERE status = 'shipping'")
        ).all()
    assert dict(shipping) == {r["redemption_id"]: f"SB{r['redemption_id']:08d}" for r in made}
