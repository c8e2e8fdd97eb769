"""A carrier reached through an HTTP proxy named in the environment: the calls go through it, as
httpx's client routes them (credex's straight path to the transport is taken only without one)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from credex.config import Settings
from credex.logistics import carrier_client

WAYBILL = {
    "shipment_id": "shp-1",
    "carrier": "sandbox",
    "tracking_number": "SIM0000000001",
    "status": "info_received",
    "created_at": "2026-11-26T10:00:00Z",
}


class _Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str | None]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((self.requestline, self.headers.get("Authorization")))
        body = json.dumps(WAYBILL).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    _Proxy.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield _Proxy.seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_proxy_in_the_environment_carries_the_carrier_calls(proxy) -> None:
    settings = Settings(logistics_url="http://carrier.invalid:8700/", logistics_api_key="k-proxy-test")
    with carrier_client(settings) as carrier:
        waybill = carrier.create_shipment(
            idempotency_key="r-1",
            order_ref="1",
            recipient={"name": "A", "phone": "1", "address": "1 Road"},
            items=[{"sku": "GIFT", "quantity": 1}],
        )
    assert waybill.express_no == "SIM0000000001"
    # A proxy is asked for the whole URL: the call went through it, not to carrier.invalid.
    assert proxy == [("POST http://carrier.invalid:8700/v1/shipments HTTP/1.1", "Bearer k-proxy-test")]
