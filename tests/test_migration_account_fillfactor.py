"""0013: on Postgres the account table leaves half of each page free, so rewriting balances (every
award, redemption and bulk batch) keeps each row's new version on its page without a new key entry
(a HOT update) instead of growing the table and its key until something vacuums them."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from credex.db.engine import get_engine, upgrade
from tests.test_migration_lifecycle import empty_url, migrate  # noqa: F401 - a fixture


def fillfactor(url: str) -> str | None:
    if not url.startswith("postgresql"):
        return None
    with get_engine(url).connect() as connection:
        options = connection.execute(
            sa.text("SELECT reloptions FROM pg_class WHERE relname = 'account'")
        ).scalar()
    return next((option for option in options or () if option.startswith("fillfactor=")), None)


def test_upgrading_sets_it_and_downgrading_resets_it(empty_url):  # noqa: F811
    migrate(empty_url, "0012_outbox_claim_mark")
    assert fillfactor(empty_url) is None
    upgrade(empty_url)
    expected = "fillfactor=50" if empty_url.startswith("postgresql") else None
    assert fillfactor(empty_url) == expected
    migrate(empty_url, "0012_outbox_claim_mark", down=True)
    assert fillfactor(empty_url) is None
    migrate(empty_url, "head")
    assert fillfactor(empty_url) == expected


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_rewriting_every_account_keeps_each_row_on_its_page(db_url) -> None:
    upgrade(db_url)
    engine = get_engine(db_url)
    sizes = sa.text("SELECT pg_relation_size('account'), pg_relation_size('account_pkey')")
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO account (user_id, balance, earned, redeemed, pending, debt, created_at, "
                "updated_at) SELECT 'u-' || n, 0, 0, 0, 0, 0, now(), now() FROM generate_series(1, 2000) n"
            )
        )
    with engine.connect() as connection:
        before = connection.execute(sizes).one()
    stats = sa.text("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = 'account'")
    with engine.begin() as connection:  # as a bulk batch or a redemption does to its accounts
        counted = connection.execute(stats).one()  # what this backend has not reported yet
        connection.execute(sa.text("UPDATE account SET updated_at = now()"))
        now_counted = connection.execute(stats).one()
    with engine.connect() as connection:
        after = connection.execute(sizes).one()
    # At the default fillfactor the freshly written pages are full: none of these updates fits on
    # its page, the table doubles and every row gets a second key entry. The room left is what
    # later versions reuse too, once the ones before are pruned (which a transaction still open
    # elsewhere can delay, so that is not asserted here).
    assert (now_counted[0] - counted[0], now_counted[1] - counted[1]) == (2000, 2000)
    assert after == before
