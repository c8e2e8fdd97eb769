"""Shoppers racing for the same points: no balance ever goes below zero."""

import subprocess
import sys

import pytest

from tests.invariants import check_points_invariants
from tests.support import ROOT, subprocess_env

RACERS = 8
ATTEMPTS_EACH = 3
PRICE = 100
AFFORDABLE = 10  # the balance covers 10 of the 24 attempts


@pytest.mark.slow
def test_racing_processes_redeem_exactly_what_the_balance_covers(credex, db_url, tmp_path):
    credex("catalog", "add", "GIFT", "--name", "Gift", "--points", str(PRICE))
    credex("award", "grant", "u-race", str(PRICE * AFFORDABLE + PRICE // 2), "--reason", "race", "--ref", "r")
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.workers.redeemer",
                db_url,
                str(go),
                "u-race",
                "GIFT",
                str(ATTEMPTS_EACH),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=subprocess_env(),
        )
        for _ in range(RACERS)
    ]
    go.touch()
    outcomes = []
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
        outcomes += out.split("\n")[:-1]

    succeeded = [line for line in outcomes if line.startswith("ok ")]
    refused = [line for line in outcomes if line.startswith("refused ")]
    assert len(outcomes) == RACERS * ATTEMPTS_EACH
    assert len(succeeded) == AFFORDABLE
    assert set(refused) == {"refused insufficient_points"}
    assert len({line.split()[1] for line in succeeded}) == AFFORDABLE  # distinct redemptions

    account = credex("account", "show", "u-race", "--json").json()
    assert account["balance"] == PRICE // 2
    assert account["redeemed"] == PRICE * AFFORDABLE
    totals = check_points_invariants(db_url)
    assert totals == {"redemptions": AFFORDABLE, "messages": AFFORDABLE}
    assert credex("relay", "status", "--json").json()["pending"] == AFFORDABLE
