"""The rules of domain.md, checked straight on the database."""

from sqlalchemy import text

from credex.db.engine import get_engine


def check_points_invariants(db_url: str) -> dict:
    """Assert every invariant about points and the outbox; return a few totals for the test."""
    with get_engine(db_url).connect() as connection:
        negative = connection.execute(text("SELECT count(*) FROM account WHERE balance < 0")).scalar()
        assert negative == 0, "a balance is below zero"
        mismatched = connection.execute(
            text(
                "SELECT a.user_id, a.balance, COALESCE(SUM(l.points), 0) AS total FROM account a "
                "LEFT JOIN ledger_entry l ON l.user_id = a.user_id "
                "GROUP BY a.user_id, a.balance HAVING a.balance <> COALESCE(SUM(l.points), 0)"
            )
        ).all()
        assert mismatched == [], f"balances differ from their ledger: {mismatched}"
        without_message = connection.execute(
            text(
                "SELECT count(*) FROM redemption r LEFT JOIN outbox_message m ON m.redemption_id = r.id "
                "WHERE m.id IS NULL OR m.id <> r.message_id"
            )
        ).scalar()
        assert without_message == 0, "a redemption has no outbox message of its own"
        messages_per_redemption = connection.execute(
            text("SELECT max(c) FROM (SELECT count(*) AS c FROM outbox_message GROUP BY redemption_id) t")
        ).scalar()
        assert messages_per_redemption in (None, 1), "a redemption has several outbox messages"
        ledger_per_redemption = connection.execute(
            text(
                "SELECT count(*) FROM redemption r WHERE (SELECT count(*) FROM ledger_entry l "
                "WHERE l.kind = 'redemption' AND l.ref = CAST(r.id AS VARCHAR(32))) <> 1"
            )
        ).scalar()
        assert ledger_per_redemption == 0, "a redemption does not have exactly one ledger entry"
        negative_stock = connection.execute(
            text("SELECT count(*) FROM catalog_item WHERE stock < 0")
        ).scalar()
        assert negative_stock == 0, "a stock is below zero"
        return {
            "redemptions": connection.execute(text("SELECT count(*) FROM redemption")).scalar(),
            "messages": connection.execute(text("SELECT count(*) FROM outbox_message")).scalar(),
        }
