"""HTTP to a carrier: explicit timeouts, retries with capped and jittered backoff, and a bound on
the total time of one call, so that a carrier that is down gives exit 69 instead of a hang.

Worth retrying: timeouts, refused or dropped connections, 500/502/503/504, 429 (after its
Retry-After), a body that does not decode as its Content-Encoding says (damaged on the way), and
one larger than MAX_ANSWER or still arriving when the call's time runs out (read as it arrives).
Final: every other answer, handed back to the provider to read.
"""

from __future__ import annotations

import dataclasses
import random
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from credex import __version__
from credex.errors import CarrierNotConfigured, Unavailable, redact, redact_url
from credex.retry import Backoff

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# The most of a carrier's answer read, decoded: the contract's answers are a few KiB; more is not an
# answer (nor is a body that never ends), and it must not fill the worker's memory.
MAX_ANSWER = 1024 * 1024
_BODY_FRAMING = frozenset({"content-encoding", "content-length", "transfer-encoding"})  # of the body as sent


@dataclass(frozen=True)
class RetryPolicy:
    """Seconds, except ``max_attempts``. ``total_timeout`` bounds one call, retries and waits included."""

    total_timeout: float = 30.0
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    # Steps of 0.5, 1, 2… 8 s with "equal jitter": half of each always waited (a struggling
    # carrier gets some air), the other half at random (clients that failed together do not come
    # back together). That is credex's one backoff on a step half as long, stretched by up to 100 %.
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.25, cap=4.0, spread=1.0))
    max_attempts: int = 8


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: delay-seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _where(url: httpx.URL) -> str:
    # scheme, host and port only: a path, a query or user info could carry a secret.
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}"


def _transport_reason(error: httpx.TransportError) -> str:
    if isinstance(error, httpx.ConnectTimeout):
        return "connecting timed out"
    if isinstance(error, httpx.ReadTimeout):
        return "no answer in time"
    if isinstance(error, httpx.TimeoutException):
        return "timed out"
    if isinstance(error, httpx.RemoteProtocolError):
        return "connection dropped"
    if isinstance(error, httpx.ConnectError):
        detail = str(error).strip()
        if "refused" in detail.lower():
            return "connection refused"
        return "could not connect" + (f" ({redact(detail)[:120]})" if detail else "")
    detail = str(error).strip()
    return "connection dropped" + (f" ({redact(detail)[:120]})" if detail else "")


# A provider's look at an answer that HTTP calls a success but that says "try again" (kuaidi100).
AnswerCheck = Callable[[httpx.Response], "str | None"]


class RetryingHttp:
    """An ``httpx.Client`` on one carrier's base URL, with the retry rules above."""

    def __init__(
        self,
        base_url: str,
        *,
        carrier_name: str,
        headers: dict[str, str] | None = None,
        policy: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self.carrier_name = carrier_name
        try:
            url = httpx.URL(base_url)
        except (httpx.InvalidURL, TypeError):
            raise CarrierNotConfigured(f"the carrier URL is not a URL: {_safe_url_text(base_url)}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise CarrierNotConfigured(
                f"the carrier URL must start with http:// or https://, not {_safe_url_text(base_url)}"
            )
        if url.port is not None and not 1 <= url.port <= 65535:  # else retried as a carrier away
            raise CarrierNotConfigured(f"the carrier URL's port must be 1 to 65535, got {url.port}")
        self.where = _where(url)
        self._sleep = sleep
        self._clock = clock
        self._backoff = dataclasses.replace(self.policy.backoff, rng=rng) if rng else self.policy.backoff
        # Unless a proxy is configured for the carrier's scheme (then httpx's client routes each
        # request), calls go straight to the transport the client would use: the client's own
        # steps for auth, redirects (not followed), cookies and event hooks, none of which a
        # carrier call uses, were about a fifth of a waybill's CPU in the warehouse.
        proxied = _proxied(url)
        if transport is None and not proxied:
            transport = httpx.HTTPTransport()
        self._client = httpx.Client(
            base_url=url,
            headers={"User-Agent": f"credex/{__version__}", **(headers or {})},
            transport=transport,
            follow_redirects=False,
        )
        self._direct = None if proxied else transport
        self._base = str(self._client.base_url).rstrip("/")
        self._urls: dict[str, httpx.URL] = {}

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"<RetryingHttp {self.where}>"

    def _timeout(self, remaining: float) -> httpx.Timeout:
        # No single attempt may outlive what is left of the bound.
        connect = min(self.policy.connect_timeout, remaining)
        read = min(self.policy.read_timeout, remaining)
        return httpx.Timeout(connect=connect, read=read, write=read, pool=connect)

    def send(
        self,
        method: str,
        path: str,
        *,
        what: str,
        retryable_answer: AnswerCheck | None = None,
        **request: object,
    ) -> httpx.Response:
        """Send until an answer is final and return it; raise ``Unavailable`` when the bound runs out.

        ``what`` names the call in messages ("the tracking of SIM0000000001").
        """
        policy = self.policy
        deadline = self._clock() + policy.total_timeout
        attempts = 0
        reason = "no attempt made"
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise self._gave_up(what, attempts, reason)
            attempts += 1
            asked_wait: float | None = None
            try:
                response = self._fetch(method, path, self._timeout(remaining), deadline, request)
            except httpx.UnsupportedProtocol:
                raise CarrierNotConfigured(
                    f"the carrier URL must start with http:// or https:// ({self.where})"
                ) from None
            except httpx.TransportError as error:  # timeouts, refused, reset, dropped: worth retrying
                reason = _transport_reason(error)
            except httpx.DecodingError:  # a body that is not what its Content-Encoding says: damaged
                reason = "an answer credex cannot read (its body is not what its Content-Encoding says)"
            else:
                if isinstance(response, str):  # an answer too large, or one still arriving at the bound
                    reason = response
                elif response.status_code in RETRY_STATUSES:
                    reason = f"HTTP {response.status_code}"
                    if response.status_code == 429:
                        asked_wait = retry_after_seconds(response.headers.get("Retry-After"))
                elif retryable_answer is not None and (busy := retryable_answer(response)):
                    reason = busy
                else:
                    return response
            if attempts >= policy.max_attempts:
                raise self._gave_up(what, attempts, reason)
            delay = asked_wait if asked_wait is not None else self._backoff.delay(attempts)
            remaining = deadline - self._clock()
            if delay >= remaining:
                # Waiting would end past the bound: say so now rather than sleep and fail anyway.
                if asked_wait is not None:
                    reason += f", asking to wait {asked_wait:g} s"
                raise self._gave_up(what, attempts, reason)
            self._sleep(delay)

    def _fetch(
        self, method: str, path: str, timeout: httpx.Timeout, deadline: float, request: dict
    ) -> httpx.Response | str:
        """One attempt: the answer with its body read whole (decoded), or why it was given up (an
        answer larger than MAX_ANSWER, or one still arriving when the call's time ran out: a read
        timeout bounds each wait for bytes, not a body that keeps coming)."""
        if self._direct is None:
            with self._client.stream(method, path, timeout=timeout, **request) as response:
                return self._read(response, deadline)
        sent = self._request(method, path, timeout, request)
        response = self._direct.handle_request(sent)
        response.request = sent
        try:
            return self._read(response, deadline)
        finally:
            response.close()

    def _request(self, method: str, path: str, timeout: httpx.Timeout, request: dict) -> httpx.Request:
        """The request the client would build: its base URL and headers, the call's timeout."""
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) >= 64:  # tracking paths differ by parcel: keep the cache small
                self._urls.clear()
            url = self._urls[path] = httpx.URL(self._base + path)
        headers = self._client.headers
        extra = request.get("headers")
        if extra:
            headers = httpx.Headers(headers)
            headers.update(extra)
        fields = {name: value for name, value in request.items() if name != "headers"}
        return httpx.Request(
            method, url, headers=headers, extensions={"timeout": timeout.as_dict()}, **fields
        )

    def _read(self, response: httpx.Response, deadline: float) -> httpx.Response | str:
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_ANSWER:
                return f"an answer larger than {MAX_ANSWER // 1024} KiB"
            if self._clock() >= deadline:
                return "an answer still arriving when the time ran out"
        headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _BODY_FRAMING]
        return httpx.Response(
            response.status_code, headers=headers, content=bytes(body), request=response.request
        )

    def _gave_up(self, what: str, attempts: int, reason: str) -> Unavailable:
        plural = "attempt" if attempts == 1 else "attempts"
        return Unavailable(
            f"{self.carrier_name} at {self.where} could not be reached for {what} within "
            f"{self.policy.total_timeout:g} s ({attempts} {plural}; last: {reason})"
        )


def _proxied(url: httpx.URL) -> bool:
    """Whether the environment names a proxy that httpx's client could use for ``url`` (its
    NO_PROXY exceptions are left to the client)."""
    proxies = urllib.request.getproxies()
    return url.scheme in proxies or "all" in proxies


def _safe_url_text(text: str) -> str:
    text = redact_url(str(text)).split("?", 1)[0]
    return repr(text[:80])
