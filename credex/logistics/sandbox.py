"""A local carrier that speaks the generic contract (logistics.md), for demos, staging and tests.

Parcels live in memory and move ``info_received → in_transit → out_for_delivery → delivered``,
one stage every ``stage_seconds`` from their creation; a seeded share of them (or one marked by
hand) is refused by the recipient and ends ``exception → returned`` instead. A parcel can be
cancelled until it is picked up. Tracking numbers are never handed out twice, across restarts
too, unless sequential numbering is asked for. Faults (503s, 429s with Retry-After, slow
answers, dropped connections, final 409s and 422s) come from a script of first faults, from
seeded random shares, or from an ``X-Sandbox-Fault`` header on one request, so that retries and
final refusals can be seen working.

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
import secrets
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
from urllib.parse import parse_qs, unquote, urlsplit

CARRIER = "sandbox"
FAULTS = ("503", "429", "slow", "drop", "409", "422")
FAULT_HEADER = "X-Sandbox-Fault"
NUMBERINGS = ("unique", "sequential")
MAX_BODY = 1 << 20
# (status, message, location) of each stage; a location of None is the recipient's address.
STAGES = (
    ("info_received", "Shipment information received", "Sandbox warehouse"),
    ("in_transit", "Departed the sorting centre", "Sandbox sorting centre"),
    ("out_for_delivery", "Out for delivery", "Sandbox delivery station"),
    ("delivered", "Delivered to the recipient", None),
)
# A parcel the recipient refuses: the same road to the door, then back to the sender.
REFUSED_STAGES = (
    *STAGES[:3],
    ("exception", "Refused by the recipient", None),
    ("returned", "Returned to the sender", "Sandbox warehouse"),
)
# A parcel cancelled before pick-up stops where it is, with this last checkpoint. `exception`, not
# `returned`: nothing travelled, and `returned` is final and refunds the redemption, which the
# cancel has already done (or, for a waybill cancelled behind credex's back, a person should see).
CANCELLED_CHECKPOINT = ("exception", "Shipment cancelled by the sender before pick-up", "Sandbox warehouse")
CANCELLED = "cancelled"  # the shipment's status in cancel answers and in /_sandbox/shipments
# Injected final refusals, in the contract's error body.
FINAL_FAULTS = {
    "409": ("conflict", "sandbox: an injected 409 (as for an idempotency key reused with another body)"),
    "422": ("invalid_shipment", "sandbox: an injected 422 (as for a shipment the carrier cannot take)"),
}
SHIPMENT_FILTERS = ("idempotency_key", "order_ref", "tracking_number", "status")


@dataclass(frozen=True)
class SandboxOptions:
    """How the sandbox behaves. Fault shares are fractions of the /v1 requests, drawn in this order:
    drop, 503, 429, slow, 409, 422. ``refuse_share`` is a fraction of the parcels created."""

    stage_seconds: float = 60.0
    faults: tuple[str, ...] = ()  # the first /v1 requests get these faults, in order
    unavailable_share: float = 0.0
    throttle_share: float = 0.0
    slow_share: float = 0.0
    drop_share: float = 0.0
    conflict_share: float = 0.0  # answered 409, as a reused idempotency key would be
    invalid_share: float = 0.0  # answered 422, as a shipment the carrier cannot take would be
    retry_after: int = 1
    slow_seconds: float = 5.0
    refuse_share: float = 0.0
    numbering: str = "unique"  # or "sequential": SIM0000000001, sbx-1… from 1 on every start
    seed: int | None = None
    api_key: str | None = field(default=None, repr=False)

    def fault_shares(self) -> tuple[tuple[str, float], ...]:
        return (
            ("drop", self.drop_share),
            ("503", self.unavailable_share),
            ("429", self.throttle_share),
            ("slow", self.slow_share),
            ("409", self.conflict_share),
            ("422", self.invalid_share),
        )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


_BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _base36(number: int, width: int) -> str:
    digits = []
    while number:
        number, digit = divmod(number, 36)
        digits.append(_BASE36[digit])
    return "".join(reversed(digits)).rjust(width, "0")[-width:]


class Numbering:
    """Shipment ids and tracking numbers that no other run of the sandbox hands out, without a state
    file: a prefix made at start from the clock (seconds, base 36) and 4 random characters, then a
    sequence. Two starts share a prefix only in the same second and with the same 1-in-1.7-million
    draw; the prefix has a fixed width, so numbers of different starts never run into each other.
    ``sequential`` is the old numbering from 1 on every start (``SIM0000000001``, ``sbx-1``): a
    restarted sandbox hands out numbers already used, which a test may want to show refused.
    """

    def __init__(self, scheme: str, *, wall: Callable[[], float] = time.time) -> None:
        if scheme not in NUMBERINGS:
            raise ValueError(f"unknown numbering {scheme!r}: use {' or '.join(NUMBERINGS)}")
        self.scheme = scheme
        random_part = "".join(secrets.choice(_BASE36) for _ in range(4))  # never the seeded RNG
        self.prefix = _base36(int(wall()), 7) + random_part if scheme == "unique" else ""

    def shipment(self, sequence: int) -> tuple[str, str]:
        """The shipment id and tracking number of the ``sequence``-th parcel (1 first)."""
        if not self.prefix:
            return f"sbx-{sequence}", f"SIM{sequence:010d}"
        return f"sbx-{self.prefix}-{sequence}", f"SIM{self.prefix}{sequence:06d}"


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
    refused: bool = False  # the recipient will refuse it: it ends exception, then returned
    cancelled_at: datetime | None = None
    cancel_answer: dict[str, Any] | None = None
    cancel_calls: int = 0

    @property
    def stages(self) -> tuple[tuple[str, str, str | None], ...]:
        return REFUSED_STAGES if self.refused else STAGES


class SandboxCarrier:
    """The sandbox's state: parcels, the clock and the faults to come. Safe across threads."""

    def __init__(self, options: SandboxOptions, *, wall: Callable[[], float] = time.time) -> None:
        if options.stage_seconds <= 0:
            raise ValueError("stage_seconds must be positive")
        unknown = [fault for fault in options.faults if fault not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault {unknown[0]!r}: use {', '.join(FAULTS)}")
        if not 0 <= options.refuse_share <= 1:
            raise ValueError("refuse_share must be between 0 and 1")
        self.options = options
        self._wall = wall
        self._numbering = Numbering(options.numbering, wall=wall)
        self._lock = threading.Lock()
        self._rng = random.Random(options.seed)
        # A parcel's fate has its own draws, so that faults asked for do not change which parcels
        # are refused.
        self._fates = random.Random(None if options.seed is None else f"refuse-{options.seed}")
        self._script = list(options.faults)
        self._offset = 0.0
        self._sequence = 0
        self._by_key: dict[str, Parcel] = {}
        self._by_number: dict[str, Parcel] = {}
        self._by_id: dict[str, Parcel] = {}
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
                for name, share in options.fault_shares():
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
            self._sequence += 1
            shipment_id, number = self._numbering.shipment(self._sequence)
            answer = {
                "shipment_id": shipment_id,
                "carrier": CARRIER,
                "tracking_number": number,
                "status": STAGES[0][0],
                "created_at": _iso(now),
            }
            parcel = Parcel(
                shipment_id=shipment_id,
                tracking_number=number,
                idempotency_key=key,
                fingerprint=fingerprint,
                order_ref=body["order_ref"],
                address=body["recipient"]["address"],
                created_at=now,
                answer=answer,
                refused=self._fates.random() < self.options.refuse_share,
            )
            self._by_key[key] = parcel
            self._by_number[number] = parcel
            self._by_id[shipment_id] = parcel
            return 201, answer

    def cancel(self, shipment_id: str, key: str) -> tuple[int, dict[str, Any]]:
        """Void a waybill while its parcel has not been picked up; the same answer when asked again."""
        now = self.now()
        with self._lock:
            parcel = self._by_id.get(shipment_id)
            if parcel is None:
                return 404, _error("not_found", f"no shipment {shipment_id}")
            parcel.cancel_calls += 1
            if parcel.cancel_answer is not None:
                return 200, parcel.cancel_answer
            reached = self._stage(parcel, now)
            if reached > 0:
                status = parcel.stages[reached][0]
                return 409, _error(
                    "already_picked_up",
                    f"shipment {shipment_id} was picked up at {_iso(self._stage_time(parcel, 1))} "
                    f"and is {status} now: it can no longer be cancelled",
                )
            parcel.cancelled_at = now
            parcel.cancel_answer = {**parcel.answer, "status": CANCELLED, "cancelled_at": _iso(now)}
            return 200, parcel.cancel_answer

    def refuse(self, shipment_id: str) -> tuple[int, dict[str, Any]]:
        """Mark one parcel as one the recipient will refuse (admin): it ends exception, then returned."""
        now = self.now()
        with self._lock:
            parcel = self._by_id.get(shipment_id)
            if parcel is None:
                return 404, _error("not_found", f"no shipment {shipment_id}")
            if parcel.cancelled_at is not None:
                return 409, _error(
                    "cancelled", f"shipment {shipment_id} was cancelled: nobody will refuse it"
                )
            if not parcel.refused and self._stage(parcel, now) >= len(STAGES) - 1:
                return 409, _error("already_delivered", f"shipment {shipment_id} was delivered already")
            parcel.refused = True
        return 200, self._row(parcel, now)

    def _stage(self, parcel: Parcel, now: datetime) -> int:
        """The index of the stage the parcel has reached; a cancelled parcel stays at the first."""
        if parcel.cancelled_at is not None:
            return 0
        elapsed = (now - parcel.created_at).total_seconds()
        return max(0, min(len(parcel.stages) - 1, int(elapsed // self.options.stage_seconds)))

    def _stage_time(self, parcel: Parcel, index: int) -> datetime:
        return parcel.created_at + index * timedelta(seconds=self.options.stage_seconds)

    def tracking(self, carrier: str, number: str) -> tuple[int, dict[str, Any]]:
        now = self.now()
        with self._lock:
            parcel = self._by_number.get(number) if carrier == CARRIER else None
            if parcel is None:
                return 404, _error("not_found", f"no parcel {number} at carrier {carrier}")
            reached = self._stage(parcel, now)
            stages, cancelled_at = parcel.stages, parcel.cancelled_at
        checkpoints = []
        if cancelled_at is not None:
            status, message, location = CANCELLED_CHECKPOINT
            checkpoints.append(
                {"time": _iso(cancelled_at), "status": status, "message": message, "location": location}
            )
        for index in range(reached, -1, -1):
            status, message, location = stages[index]
            checkpoints.append(
                {
                    "time": _iso(self._stage_time(parcel, index)),
                    "status": status,
                    "message": message,
                    "location": location or parcel.address,
                }
            )
        return 200, {
            "tracking_number": number,
            "carrier": CARRIER,
            "status": checkpoints[0]["status"],
            "updated_at": checkpoints[0]["time"],
            "checkpoints": checkpoints,
        }

    def _row(self, parcel: Parcel, now: datetime) -> dict[str, Any]:
        reached = parcel.stages[self._stage(parcel, now)][0]
        status = CANCELLED if parcel.cancelled_at is not None else reached
        return {
            "shipment_id": parcel.shipment_id,
            "idempotency_key": parcel.idempotency_key,
            "order_ref": parcel.order_ref,
            "carrier": CARRIER,
            "tracking_number": parcel.tracking_number,
            "status": status,
            # Whether this waybill has sent, or may still send, a parcel to the recipient.
            "live": status not in (CANCELLED, "returned"),
            "refused": parcel.refused,
            "created_at": _iso(parcel.created_at),
            "cancelled_at": None if parcel.cancelled_at is None else _iso(parcel.cancelled_at),
            "create_calls": parcel.create_calls,
            "cancel_calls": parcel.cancel_calls,
        }

    def shipments(self, **where: str) -> list[dict[str, Any]]:
        """Every parcel, in creation order; ``where`` keeps those whose fields equal the given values."""
        unknown = set(where) - set(SHIPMENT_FILTERS)
        if unknown:
            raise ValueError(f"cannot filter on {sorted(unknown)[0]!r}: use {', '.join(SHIPMENT_FILTERS)}")
        now = self.now()
        with self._lock:
            rows = [self._row(parcel, now) for parcel in self._by_key.values()]
        return [row for row in rows if all(row[name] == value for name, value in where.items())]


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
        # Split before unquoting: a quoted "/" belongs to the number or the id, not to the path.
        parts = [unquote(part) for part in urlsplit(self.path).path.split("/")]
        is_cancel = len(parts) == 5 and parts[:3] == ["", "v1", "shipments"] and parts[4] == "cancel"
        if path.startswith("/v1/trackings/"):
            route = f"{method} /v1/trackings"
        elif is_cancel:
            route = f"{method} /v1/shipments/{{shipment_id}}/cancel"
        else:
            route = f"{method} {path}"
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
        if fault in FINAL_FAULTS:
            code, message = FINAL_FAULTS[fault]
            self._send(int(fault), _error(code, message))
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
        if is_cancel:
            if method != "POST":
                self._send(405, _error("method_not_allowed", "use POST"))
                return
            key = self._idempotency_key()
            if key is not None:
                self._send(*carrier.cancel(parts[3], key))
            return
        if len(parts) == 5 and parts[:3] == ["", "v1", "trackings"] and method == "GET":
            self._send(*carrier.tracking(parts[3], parts[4]))
            return
        self._send(404, _error("not_found", f"no route {method} {path}"))

    def _idempotency_key(self) -> str | None:
        """The request's Idempotency-Key; without one, a 400 is sent and None returned."""
        key = (self.headers.get("Idempotency-Key") or "").strip()
        if not key:
            self._send(400, _error("missing_idempotency_key", "the Idempotency-Key header is required"))
            return None
        return key

    def _create(self, raw: bytes) -> None:
        key = self._idempotency_key()
        if key is None:
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
        parts = [unquote(part) for part in urlsplit(self.path).path.split("/")]
        if method == "GET" and path == "/_sandbox/shipments":
            query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
            try:
                rows = carrier.shipments(**{name: values[-1] for name, values in query.items()})
            except ValueError as error:
                self._send(400, _error("bad_filter", str(error)))
                return
            self._send(200, rows)
        elif (
            method == "POST"
            and len(parts) == 5
            and parts[:3] == ["", "_sandbox", "shipments"]
            and (parts[4] == "refuse")
        ):
            self._send(*carrier.refuse(parts[3]))
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
