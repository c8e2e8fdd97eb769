"""The sandbox carrier's HTTP side: routes, faults, keep-alive, dropped connections, and `serve`.

The carrier's state and rules are in ``sandbox.py``; this module only turns requests into calls on
a ``SandboxCarrier`` and its answers into responses. Built on the standard library's
``ThreadingHTTPServer``: no dependency to install, a thread per connection so a slow answer does
not hold up the others, and the raw socket at hand to drop a connection without an answer, which
an ASGI framework would not let us do.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import signal
import socket
import socketserver
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from credex.errors import read_json
from credex.logistics.sandbox import (
    FAULT_HEADER,
    FAULTS,
    FINAL_FAULTS,
    MAX_BODY,
    SandboxCarrier,
    SandboxOptions,
    error_document,
    shipment_problem,
)


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
            self._send(400, error_document("bad_length", "Content-Length must be a whole number"))
            self.close_connection = True  # the body's end is unknown: the connection cannot be reused
            return
        if length > MAX_BODY:
            self._send(413, error_document("too_large", "the body is larger than 1 MiB"))
            self.close_connection = True  # its body is left unread
            return
        raw = self.rfile.read(length) if length else b""
        if path.startswith("/_sandbox/"):
            # The admin door makes parcels, refuses them and moves the clock: with a key set, it is
            # as closed as /v1.
            if not self._authorised():
                self._send(401, error_document("unauthorized", "a valid bearer API key is required"))
                return
            self._admin(method, path, raw)
            return
        carrier = self.server.carrier
        asked = self.headers.get(FAULT_HEADER)
        if asked is not None and asked not in FAULTS:
            self._send(400, error_document("bad_fault", f"{FAULT_HEADER} must be one of {', '.join(FAULTS)}"))
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
            self._send(503, error_document("unavailable", "sandbox: an injected 503"))
            return
        if fault == "429":
            retry_after = str(carrier.options.retry_after)
            self._send(
                429, error_document("rate_limited", "sandbox: slow down"), {"Retry-After": retry_after}
            )
            return
        if fault in FINAL_FAULTS:
            code, message = FINAL_FAULTS[fault]
            self._send(int(fault), error_document(code, message))
            return
        if fault == "slow" and self.server.stopping.wait(carrier.options.slow_seconds):
            self._drop()  # shutting down: do not hold the process up
            return
        if not self._authorised():
            self._send(401, error_document("unauthorized", "a valid bearer API key is required"))
            return
        if path == "/v1/shipments":
            if method != "POST":
                self._send(405, error_document("method_not_allowed", "use POST"))
                return
            self._create(raw)
            return
        if is_cancel:
            if method != "POST":
                self._send(405, error_document("method_not_allowed", "use POST"))
                return
            key = self._idempotency_key()
            if key is not None:
                self._send(*carrier.cancel(parts[3], key))
            return
        if len(parts) == 5 and parts[:3] == ["", "v1", "trackings"] and method == "GET":
            self._send(*carrier.tracking(parts[3], parts[4]))
            return
        self._send(404, error_document("not_found", f"no route {method} {path}"))

    def _idempotency_key(self) -> str | None:
        """The request's Idempotency-Key; without one, a 400 is sent and None returned."""
        key = (self.headers.get("Idempotency-Key") or "").strip()
        if not key:
            self._send(
                400, error_document("missing_idempotency_key", "the Idempotency-Key header is required")
            )
            return None
        return key

    def _create(self, raw: bytes) -> None:
        key = self._idempotency_key()
        if key is None:
            return
        try:
            body = read_json(raw or b"null")
        except ValueError:
            self._send(400, error_document("bad_json", "the body is not JSON"))
            return
        problem = shipment_problem(body)
        if problem:
            self._send(422, error_document("invalid_shipment", problem))
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
                self._send(400, error_document("bad_filter", str(error)))
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
            self._create(raw)  # as POST /v1/shipments, without faults: to set a scene
        elif method == "GET" and path == "/_sandbox/requests":
            self._send(200, carrier.requests())
        elif method == "GET" and path == "/_sandbox/clock":
            self._send(200, carrier.clock())
        elif method == "POST" and path == "/_sandbox/clock":
            try:
                seconds = read_json(raw or b"{}").get("advance_seconds")
            except (ValueError, AttributeError):
                seconds = None
            try:
                if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
                    raise ValueError("not a number of seconds")
                carrier.advance(float(seconds))  # float(10**400): OverflowError, a ValueError's kin
            except (ValueError, OverflowError) as error:
                why = f'send {{"advance_seconds": N}} with N >= 0 ({error})'
                self._send(422, error_document("invalid_clock", why))
                return
            self._send(200, carrier.clock())
        else:
            self._send(404, error_document("not_found", f"no route {method} {path}"))

    def _send(self, status: int, document: Any, headers: dict[str, str] | None = None) -> None:
        # ASCII with escapes: encoding cannot fail, whatever text a document holds (a lone
        # surrogate once dropped every later answer that repeated it), and any JSON reader reads it.
        body = json.dumps(document).encode("ascii")
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
