"""One backoff for every wait between attempts in credex: the carrier client's retries, the
workers' reconnects and database waits, a bulk batch started again, and the relay's wait for a
confirmation before it publishes again.

Kept as one small module rather than tenacity or stamina: the callers wait in their own ways (the
carrier client within a bound on its total time and after a carrier's Retry-After, the workers
while answering the broker's heartbeats and waking up at once when told to stop, the relay by
writing a due time into the outbox), so what they share is the formula, not a retry loop.

A wait is the attempt's step, ``base`` doubled per attempt up to ``cap``, stretched by a random
share of up to ``spread`` of itself: never shorter than the step (a relay told to wait 60 s for
the warehouse never republishes sooner), and spread out so that clients that failed together do
not come back together. Half the step always waited and half drawn at random ("equal jitter")
is the same formula with ``spread=1`` and a step twice as long.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_MAX_DOUBLINGS = 62  # 2**62 steps are "forever" long before a float overflows


@dataclass(frozen=True)
class Backoff:
    """``delay(attempt)`` for attempt 1, 2, 3…: ``base``, ``2·base``, ``4·base``… capped at ``cap``,
    each stretched by up to ``spread`` (0.1: up to 10 % longer)."""

    base: float
    cap: float
    spread: float = 0.1
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base or self.spread < 0:
            raise ValueError(f"a backoff needs 0 < base <= cap and spread >= 0, got {self}")

    def step(self, attempt: int) -> float:
        """The wait before stretching: ``base · 2^(attempt-1)``, at most ``cap``."""
        doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
        return min(self.cap, self.base * 2.0**doublings)

    def delay(self, attempt: int) -> float:
        """The wait after attempt number ``attempt`` (1 for the first) failed."""
        step = self.step(attempt)
        return step * (1.0 + self.spread * self.rng.random())


# Between a worker's attempts to reach the broker or the database again (its connection, and the
# relay's LISTEN connection): 0.5 s doubling to 5 s, so a worker is back within about 5 s of the
# service (with 30 s, the database-outage test's five 4 s outages took 45-68 s; with 5 s, 37-42 s).
RECONNECT = Backoff(base=0.5, cap=5.0)


@dataclass
class Streak:
    """Failures in a row and the wait they call for: ``failed()`` counts one and returns the wait
    before the next attempt, ``succeeded()`` starts again from the first step."""

    backoff: Backoff
    failures: int = 0

    def failed(self) -> float:
        self.failures += 1
        return self.backoff.delay(self.failures)

    def succeeded(self) -> None:
        self.failures = 0
