"""Fakes for the carrier clients' unit tests: a clock that only moves when told, a recorded sleep,
a client on an ``httpx.MockTransport``, a scripted carrier (``Carrier``) and one that keeps the
contract's books (``ContractCarrier``)."""

from __future__ import annotations

import json
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


class Wall:
    """A wall clock (``time.time``) moved by hand, for the sandbox's books."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ContractCarrier:
    """The sandbox's own books behind an ``httpx.MockTransport``: a carrier that keeps the generic
    contract (shipments by idempotency key, cancels, tracking), so a test can check what the carrier
    received and what it holds afterwards, not only what the client made of a canned answer."""

    def __init__(self, wall: Wall | None = None, **options: Any) -> None:
        from credex.logistics.sandbox import SandboxCarrier, SandboxOptions

        self.wall = wall or Wall()
        self.books = SandboxCarrier(SandboxOptions(**options), wall=self.wall)
        self.requests: list[httpx.Request] = []
        self.statuses: list[int] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        from urllib.parse import unquote

        self.requests.append(request)
        parts = [unquote(part) for part in request.url.raw_path.decode().split("?")[0].split("/")]
        key = request.headers.get("Idempotency-Key", "")
        if request.method == "POST" and parts == ["", "v1", "shipments"]:
            status, document = self.books.create(key, json.loads(request.content))
        elif request.method == "POST" and len(parts) == 5 and parts[:3] == ["", "v1", "shipments"]:
            status, document = self.books.cancel(parts[3], key)
        elif request.method == "GET" and len(parts) == 5 and parts[:3] == ["", "v1", "trackings"]:
            status, document = self.books.tracking(parts[3], parts[4])
        else:
            status, document = 404, {"error": {"code": "not_found", "message": "no route"}}
        self.statuses.append(status)
        return httpx.Response(status, json=document)

    def advance(self, seconds: float) -> None:
        self.wall.now += seconds
