"""The cron jobs at work while shoppers redeem: `award expire` and `award settle` (two of each,
real processes) run beside six redeeming processes; every point is settled or expired once."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time

from credex.db.engine import dispose_engines, session_for
from credex.points.awards import award_grant, award_purchase
from tests.invariants import check_points_invariants
from tests.support import ROOT, credex_command, subprocess_env
from tests.test_lifecycle_invariants import check_lifecycle_invariants

USERS = ["u0", "u1", "u2"]
REDEEMERS_PER_USER = 2
ATTEMPTS_EACH = 60
PRICE = 2  # the old points outlast the first redemptions: expiry and spending meet
OLD_GRANTS = 15  # per user: 20 points each, earned 400 days ago, expiring after 365
RETURNABLE_ORDERS = 15  # per user: 50 points each, bought 30 days ago, a 14-day window


def fill(db_url: str) -> None:
    now = datetime.now(UTC)
    for user in USERS:
        with freeze_time(now - timedelta(days=400)), session_for(db_url, write=True) as session:
            for n in range(OLD_GRANTS):
                award_grant(
                    session, user, 20, reason="old", ref=f"old-{user}-{n}", operator="t", expiry_days=365
                )
        with freeze_time(now - timedelta(days=30)), session_for(db_url, write=True) as session:
            for n in range(RETURNABLE_ORDERS):
                award_purchase(
                    session,
                    user,
                    order_id=f"o-{user}-{n}",
                    amount="50",
                    rate=1,
                    operator="t",
                    pending_days=14,
                    expiry_days=365,
                )
        with session_for(db_url, write=True) as session:
            award_grant(session, user, 300, reason="fresh", ref=f"fresh-{user}", operator="t")
    dispose_engines()


@pytest.mark.slow
def test_expire_and_settle_run_beside_six_redeeming_processes(credex, db_url, tmp_path):
    credex("catalog", "add", "GIFT", "--name", "Gift", "--points", str(PRICE))
    fill(db_url)
    go = tmp_path / "go"
    env = subprocess_env()
    redeemers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.workers.redeemer"]
            + [db_url, str(go), user, "GIFT", str(ATTEMPTS_EACH)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for user in USERS
        for _ in range(REDEEMERS_PER_USER)
    ]
    crons = [
        subprocess.Popen(
            credex_command("--database-url", db_url, "award", job, "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for job in ("expire", "settle", "expire", "settle")
    ]
    go.touch()
    redeemed = 0
    for redeemer in redeemers:
        out, err = redeemer.communicate(timeout=120)
        assert redeemer.returncode == 0, err
        lines = out.splitlines()
        assert len(lines) == ATTEMPTS_EACH
        assert {line.split()[0] for line in lines} <= {"ok", "refused"}
        assert all(line == "refused insufficient_points" for line in lines if line.startswith("refused"))
        redeemed += sum(line.startswith("ok ") for line in lines)
    reports: dict[str, list[dict]] = {"expire": [], "settle": []}
    for cron, job in zip(crons, ("expire", "settle", "expire", "settle"), strict=True):
        out, err = cron.communicate(timeout=120)
        assert cron.returncode == 0, err
        reports[job].append(json.loads(out))

    # Between them the two runs of each job handled every due lot exactly once; the old lots that
    # redemptions emptied first were spent, not expired.
    totals = check_lifecycle_invariants(db_url)
    assert sum(r["lots"] for r in reports["expire"]) == totals["expired_lots"] > 0
    assert sum(r["lots"] for r in reports["settle"]) == len(USERS) * RETURNABLE_ORDERS
    assert sum(r["points"] for r in reports["settle"]) == len(USERS) * RETURNABLE_ORDERS * 50
    for job in ("expire", "settle"):
        again = credex("award", job, "--json").json()
        assert (again["lots"], again["points"]) == (0, 0)

    check_lifecycle_invariants(db_url)
    check_points_invariants(db_url)
    supplied = len(USERS) * (OLD_GRANTS * 20 + RETURNABLE_ORDERS * 50 + 300)
    expired = sum(r["points"] for r in reports["expire"])
    balances = sum(credex("account", "show", user, "--json").json()["balance"] for user in USERS)
    assert redeemed > 0
    assert balances == supplied - expired - redeemed * PRICE
