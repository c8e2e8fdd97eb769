"""The one backoff every wait between attempts uses: doubling to a cap, stretched at random but
never shorter than its step, and a streak of failures that starts again after a success."""

from __future__ import annotations

import random

import pytest

from credex.retry import Backoff, Streak


def test_a_wait_doubles_per_attempt_up_to_the_cap_and_is_never_shorter_than_its_step():
    backoff = Backoff(base=1.0, cap=10.0, spread=0.1, rng=random.Random(3))
    for attempt, step in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (500, 10.0)):
        waits = [backoff.delay(attempt) for _ in range(100)]
        assert all(step <= wait <= step * 1.1 for wait in waits), (attempt, min(waits), max(waits))
        assert len(set(waits)) > 90  # spread out, so that clients that failed together part


def test_a_backoff_that_could_not_work_is_refused():
    for base, cap, spread in ((0, 1, 0.1), (2, 1, 0.1), (1, 2, -0.5)):
        with pytest.raises(ValueError):
            Backoff(base=base, cap=cap, spread=spread)


def test_a_streak_grows_with_each_failure_and_starts_again_after_a_success():
    streak = Streak(Backoff(base=0.5, cap=4.0, spread=0.0))
    assert [streak.failed() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    streak.succeeded()
    assert streak.failed() == 0.5
