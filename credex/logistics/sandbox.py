"""A local carrier that speaks the generic contract (logistics.md), for demos, staging and tests.

Parcels live in memory and move ``info_received → in_transit → out_for_delivery → delivered``,
one stage every ``stage_seconds`` from their creation. Faults (503s, 429s with Retry-After, slow
answers, dropped connections) come from a script of first faults, from seeded random shares, or
from an ``X-Sandbox-Fault`` header on one request, so that retries can be seen working.

Built on the standard library's ``ThreadingHTTPServer``: no dependency to install, a thread per
connection so a slow answer does not hold up the others, and the raw socket at hand to drop a
connection without an answer, which an ASGI framework would not let us do.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import random
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

CARRIER = "sandbox"
FAULTS = ("503", "429", "slow", "drop")
FAULT_HEADER = "X-Sandbox-Fault"
MAX_BODY = 1 << 20
# (status, message, location) of each stage; the last is delivered to the recipient's address.
STAGES = (
    ("info_received", "Shipment information received", "Sandbox warehouse"),
    ("in_transit", "Departed the sorting centre", "Sandbox sorting centre"),
    ("out_for_delivery", "Out for delivery", "Sandbox delivery station"),
    ("delivered", "Delivered to the recipient", None),
)


@dataclass(frozen=True)
class SandboxOptions:
    """How the sandbox behaves. Shares are fractions of the /v1 requests, drawn in this order:
    drop, 503, 429, slow."""

    stage_seconds: float = 60.0
    faults: tuple[str, ...] = ()  # the first /v1 requests get these faults, in order
    unavailable_share: float = 0.0
    throttle_share: float = 0.0
    slow_share: float = 0.0
    drop_share: float = 0.0
    retry_after: int = 1
    slow_seconds: float = 5.0
    seed: int | None = None
    api_key: str | None = field(default=None, repr=False)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def shipment_problem(body: object) -> str | None:
    """What is wrong with a create-shipment body, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if not isinstance(body.get("order_ref"), str) or not body["order_ref"].strip():
        return "order_ref must be a non-empty string"
    recipient = body.get("recipient")
    if not isinstance(recipient, dict):
        return "recipient must be an object with name, phone and address"
    for name in ("name", "phone", "address"):
        if not isinstance(recipient.get(name, ""), str):
            return f"recipient.{name} must be a string"
    if not str(recipient.get("address", "")).strip():
        return "recipient.address must not be empty"
    items = body.get("items")
    if not isinstance(items, list) or not items:
        return "items must be a non-empty list"
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("sku"), str) or not item["sku"].strip():
            return "every item needs a sku"
        quantity = item.get("quantity")
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            return "every item needs a quantity of at least 1"
    return None


@dataclass
class Parcel:
    shipment_id: str
    tracking_number: str
    idempotency_key: str
    fingerprint: str  # of the canonical body: the same key with other content is a conflict
    order_ref: str
    address: str
    created_at: datetime
    answer: dict[str, Any]
    create_calls: int = 1


class SandboxCarrier:
    """The sandbox's state: parcels, the clock and the faults to come. Safe across threads."""

    def __init__(self, options: SandboxOptions, *, wall: Callable[[], float] = time.time) -> None:
        if options.stage_seconds <= 0:
            raise ValueError("stage_seconds must be positive")
        unknown = [fault for fault in options.faults if fault not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault {unknown[0]!r}: use {', '.join(FAULTS)}")
        self.options = options
        self._wall = wall
        self._lock = threading.Lock()
        self._rng = random.Random(options.seed)
        self._script = list(options.faults)
        self._offset = 0.0
        self._by_key: dict[str, Parcel] = {}
        self._by_number: dict[str, Parcel] = {}
        self._routes: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()

    # --- time -------------------------------------------------------------------------------

    def now(self) -> datetime:
        with self._lock:
            offset = self._offset
        return datetime.fromtimestamp(self._wall() + offset, UTC)

    def advance(self, seconds: float) -> datetime:
        """Make time pass for every parcel (tests and demos do not wait for the schedule)."""
        with self._lock:
            self._offset += seconds
        return self.now()

    def clock(self) -> dict[str, Any]:
        with self._lock:
            offset = self._offset
        return {
            "now": _iso(self.now()),
            "offset_seconds": offset,
            "stage_seconds": self.options.stage_seconds,
        }

    # --- faults -----------------------------------------------------------------------------

    def choose_fault(self, route: str, asked: str | None = None) -> str | None:
        """The fault for this /v1 request: the one asked for, else the script's next, else a draw."""
        options = self.options
        with self._lock:
            self._routes[route] += 1
            if asked:
                fault = asked
            elif self._script:
                fault = self._script.pop(0)
            else:
                draw = self._rng.random()
                fault = None
                for name, share in (
                    ("drop", options.drop_share),
                    ("503", options.unavailable_share),
                    ("429", options.throttle_share),
                    ("slow", options.slow_share),
                ):
                    if draw < share:
                        fault = name
                        break
                    draw -= share
            if fault:
                self._faults[fault] += 1
            return fault

    def requests(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": sum(self._routes.values()),
                "by_route": dict(self._routes),
                "faults": dict(self._faults),
            }

    # --- the contract -----------------------------------------------------------------------

    def create(self, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        now = self.now()
        with self._lock:
            parcel = self._by_key.get(key)
            if parcel is not None:
                parcel.create_calls += 1
                if parcel.fingerprint != fingerprint:
                    return 409, _error(
                        "conflict",
                        f"idempotency key {key} was used for shipment {parcel.shipment_id} with another body",
                    )
                return 200, parcel.answer
            sequence = len(self._by_key) + 1
            number = f"SIM{sequence:010d}"
            answer = {
                "shipment_id": f"sbx-{sequence}",
                "carrier": CARRIER,
                "tracking_number": number,
                "status": STAGES[0][0],
                "created_at": _iso(now),
            }
            parcel = Parcel(
                shipment_id=answer["shipment_id"],
                tracking_number=number,
                idempotency_key=key,
                fingerprint=fingerprint,
                order_ref=body["order_ref"],
                address=body["recipient"]["address"],
                created_at=now,
                answer=answer,
            )
            self._by_key[key] = parcel
            self._by_number[number] = parcel
            return 201, answer

    def _stage(self, parcel: Parcel, now: datetime) -> int:
        elapsed = (now - parcel.created_at).total_seconds()
        return max(0, min(len(STAGES) - 1, int(elapsed // self.options.stage_seconds)))

    def tracking(self, carrier: str, number: str) -> tuple[int, dict[str, Any]]:
        now = self.now()
        with self._lock:
            parcel = self._by_number.get(number) if carrier == CARRIER else None
        if parcel is None:
            return 404, _error("not_found", f"no parcel {number} at carrier {carrier}")
        reached = self._stage(parcel, now)
        step = timedelta(seconds=self.options.stage_seconds)
        checkpoints = []
        for index in range(reached, -1, -1):
            status, message, location = STAGES[index]
            checkpoints.append(
                {
                    "time": _iso(parcel.created_at + index * step),
                    "status": status,
                    "message": message,
                    "location": location or parcel.address,
                }
            )
        return 200, {
            "tracking_number": number,
            "carrier": CARRIER,
            "status": STAGES[reached][0],
            "updated_at": checkpoints[0]["time"],
            "checkpoints": checkpoints,
        }

    def shipments(self) -> list[dict[str, Any]]:
        now = self.now()
        with self._lock:
            parcels = list(self._by_key.values())
        return [
            {
                "shipment_id": parcel.shipment_id,
                "idempotency_key": parcel.idempotency_key,
                "order_ref": parcel.order_ref,
                "carrier": CARRIER,
                "tracking_number": parcel.tracking_number,
                "status": STAGES[self._stage(parcel, now)][0],
                "created_at": _iso(parcel.created_at),
                "create_calls": parcel.create_calls,
            }
            for parcel in parcels
        ]


class SandboxHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real carriers do
    # Headers and body go out as two writes: without TCP_NODELAY the second waits for the
    # client's delayed ACK, 40 ms a request.
    disable_nagle_algorithm = True
    server_version = "credex-sandbox"
    timeout = 60  # an idle keep-alive connection is closed after this
    server: SandboxServer

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.log_date_time_string()} {self.address_string()} {format % args}\n")

    def _dispatch(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._send(400, _error("bad_length", "Content-Length must be a whole number"))
            self.close_connection = True  # the body's end is unknown: the connection cannot be reused
            return
        if length > MAX_BODY:
            self._send(413, _error("too_large", "the body is larger than 1 MiB"))
            self.close_connection = True  # its body is left unread
            return
        raw = self.rfile.read(length) if length else b""
        if path.startswith("/_sandbox/"):
            self._admin(method, path, raw)
            return
        carrier = self.server.carrier
        asked = self.headers.get(FAULT_HEADER)
        if asked is not None and asked not in FAULTS:
            self._send(400, _error("bad_fault", f"{FAULT_HEADER} must be one of {', '.join(FAULTS)}"))
            return
        route = f"{method} /v1/trackings" if path.startswith("/v1/trackings/") else f"{method} {path}"
        fault = carrier.choose_fault(route, asked)
        if fault == "drop":
            self._drop()
            return
        if fault == "503":
            self._send(503, _error("unavailable", "sandbox: an injected 503"))
            return
        if fault == "429":
            retry_after = str(carrier.options.retry_after)
            self._send(429, _error("rate_limited", "sandbox: slow down"), {"Retry-After": retry_after})
            return
        if fault == "slow" and self.server.stopping.wait(carrier.options.slow_seconds):
            self._drop()  # shutting down: do not hold the process up
            return
        if not self._authorised():
            self._send(401, _error("unauthorized", "a valid bearer API key is required"))
            return
        if path == "/v1/shipments":
            if method != "POST":
                self._send(405, _error("method_not_allowed", "use POST"))
                return
            self._create(raw)
            return
        # Split before unquoting: a quoted "/" belongs to the number, not to the path.
        parts = [unquote(part) for part in urlsplit(self.path).path.split("/")]
        if len(parts) == 5 and parts[:3] == ["", "v1", "trackings"] and method == "GET":
            self._send(*carrier.tracking(parts[3], parts[4]))
            return
        self._send(404, _error("not_found", f"no route {method} {path}"))

    def _create(self, raw: bytes) -> None:
        key = (self.headers.get("Idempotency-Key") or "").strip()
        if not key:
            self._send(400, _error("missing_idempotency_key", "the Idempotency-Key header is required"))
            return
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            self._send(400, _error("bad_json", "the body is not JSON"))
            return
        problem = shipment_problem(body)
        if problem:
            self._send(422, _error("invalid_shipment", problem))
            return
        self._send(*self.server.carrier.create(key, body))

    def _authorised(self) -> bool:
        expected = self.server.carrier.options.api_key
        if not expected:
            return True
        given = self.headers.get("Authorization") or ""
        return hmac.compare_digest(given.encode(), f"Bearer {expected}".encode())

    def _admin(self, method: str, path: str, raw: bytes) -> None:
        carrier = self.server.carrier
        if method == "GET" and path == "/_sandbox/shipments":
            self._send(200, carrier.shipments())
        elif method == "POST" and path == "/_sandbox/shipments":
            self._create(raw)  # as POST /v1/shipments, without faults or a key: to set a scene
        elif method == "GET" and path == "/_sandbox/requests":
            self._send(200, carrier.requests())
        elif method == "GET" and path == "/_sandbox/clock":
            self._send(200, carrier.clock())
        elif method == "POST" and path == "/_sandbox/clock":
            try:
                seconds = json.loads(raw or b"{}").get("advance_seconds")
            except (ValueError, AttributeError):
                seconds = None
            if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
                self._send(422, _error("invalid_clock", 'send {"advance_seconds": N} with N >= 0'))
                return
            carrier.advance(float(seconds))
            self._send(200, carrier.clock())
        else:
            self._send(404, _error("not_found", f"no route {method} {path}"))

    def _send(self, status: int, document: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(document, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up waiting (a slow answer)

    def _drop(self) -> None:
        self.log_message('"%s" dropped', self.requestline)
        self.close_connection = True
        with contextlib.suppress(OSError):  # the client may have gone already
            self.connection.shutdown(socket.SHUT_RDWR)


class SandboxServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], carrier: SandboxCarrier) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.carrier = carrier
        self.stopping = threading.Event()
        super().__init__(address, SandboxHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's full name: slow, and of no use here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


def serve(
    host: str, port: int, options: SandboxOptions, *, announce: Callable[[str], None] | None = None
) -> None:
    """Serve until SIGINT or SIGTERM. The first line on stdout is ``listening on URL``."""
    server = SandboxServer((host, port), SandboxCarrier(options))
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    line = f"listening on {server.url}"
    if announce is None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    else:
        announce(line)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        thread.join(5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.stderr.write("sandbox stopped\n")
        sys.stderr.flush()
