"""Fakes for the carrier clients' unit tests: a clock that only moves when told, a recorded sleep,
and a client on an ``httpx.MockTransport``."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import httpx

API_KEY = "sk-live-7Qm9TOPSECRET"
KUAIDI100_KEY = "kd100-KEY-TOPSECRET"
KUAIDI100_CUSTOMER = "CUST4242"


class FakeClock:
    """``time.monotonic`` and ``time.sleep`` for a client that must not really wait."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.start = self.now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    @property
    def elapsed(self) -> float:
        return self.now - self.start


class Carrier:
    """A scripted carrier: each request gets the next answer (a response, or an exception to raise)."""

    def __init__(self, *answers: Any, clock: FakeClock | None = None) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.clock = clock

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if callable(answer) and not isinstance(answer, httpx.Response):
            answer = answer(request)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def timeout_after_read(request: httpx.Request, clock: FakeClock) -> Exception:
    """A read timeout that took as long as the attempt was allowed to wait."""
    clock.now += request.extensions["timeout"]["read"]
    return httpx.ReadTimeout("timed out", request=request)


def make_client(
    handler: Callable[[httpx.Request], httpx.Response],
    *,
    clock: FakeClock | None = None,
    total_timeout: float | None = None,
    seed: int = 7,
    **settings: Any,
):
    from credex.config import Settings
    from credex.logistics import carrier_client

    values: dict[str, Any] = {"logistics_url": "http://carrier.test", "logistics_api_key": API_KEY}
    values.update(settings)
    clock = clock or FakeClock()
    return carrier_client(
        Settings(**values),
        total_timeout=total_timeout,
        transport=httpx.MockTransport(handler),
        sleep=clock.sleep,
        clock=clock,
        rng=random.Random(seed),
    )


def kuaidi100_client(handler, *, clock: FakeClock | None = None, **settings: Any):
    values: dict[str, Any] = {
        "logistics_provider": "kuaidi100",
        "logistics_url": None,
        "logistics_api_key": None,
        "kuaidi100_customer": KUAIDI100_CUSTOMER,
        "kuaidi100_key": KUAIDI100_KEY,
    }
    values.update(settings)
    return make_client(handler, clock=clock, **values)
