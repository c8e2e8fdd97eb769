"""The carrier sandbox as a real process, for any test that needs a carrier on a real socket.

    with running_sandbox("--faults", "503,drop") as sandbox:
        run_process("track", "--express-no", no, env=sandbox.env())
        assert sandbox.requests()["total"] == 3

or the ``carrier_sandbox`` fixture (registered in conftest.py through ``pytest_plugins``).
"""

from __future__ import annotations

import queue
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from tests.support import credex_command, subprocess_env

START_TIMEOUT = 20.0


@dataclass
class RunningSandbox:
    url: str
    process: subprocess.Popen
    api_key: str | None = None  # the sandbox's CREDEX_LOGISTICS_API_KEY: sent on every call here

    @property
    def auth(self) -> dict[str, str]:
        return {} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"}

    def _call(self, method: str, path: str, **request: Any) -> Any:
        import httpx

        request["headers"] = self.auth | request.get("headers", {})
        response = httpx.request(method, self.url + path, timeout=10, **request)
        response.raise_for_status()
        return response.json()

    def shipments(self, **where: str) -> list[dict]:
        """Every parcel created: shipment_id, idempotency_key, order_ref, tracking_number, status
        (``cancelled`` too), live, refused, create_calls, cancel_calls…; ``where`` filters on
        idempotency_key, order_ref, tracking_number or status."""
        return self._call("GET", "/_sandbox/shipments", params=where)

    def live_waybills(self, **where: str) -> list[dict]:
        """The parcels that have gone or may still go to the recipient: neither cancelled nor returned."""
        return [parcel for parcel in self.shipments(**where) if parcel["live"]]

    def refuse(self, shipment_id: str) -> dict:
        """Mark one parcel as refused by the recipient: it ends exception, then returned."""
        return self._call("POST", f"/_sandbox/shipments/{quote(shipment_id, safe='')}/refuse")

    def cancel(self, shipment_id: str, key: str = "cancel-1"):
        """``POST /v1/shipments/{id}/cancel`` as a carrier client sends it; the raw response."""
        import httpx

        return httpx.post(
            f"{self.url}/v1/shipments/{quote(shipment_id, safe='')}/cancel",
            headers={"Idempotency-Key": key, **self.auth},
            timeout=10,
        )

    def requests(self) -> dict:
        """What the sandbox saw on /v1: {"total", "by_route", "faults"}."""
        return self._call("GET", "/_sandbox/requests")

    def advance(self, seconds: float) -> dict:
        """Make time pass for every parcel; returns the sandbox's clock."""
        return self._call("POST", "/_sandbox/clock", json={"advance_seconds": seconds})

    def create_shipment(self, key: str, *, address: str = "8 Long Road", sku: str = "SHAMPOO-500") -> dict:
        """A parcel made through the admin door (no faults); returns the carrier's answer."""
        return self._call(
            "POST",
            "/_sandbox/shipments",
            headers={"Idempotency-Key": key},
            json={
                "order_ref": key,
                "recipient": {"name": "u-1001", "phone": "", "address": address},
                "items": [{"sku": sku, "quantity": 1}],
            },
        )

    def env(self, **extra: str) -> dict[str, str]:
        """An environment for a credex process that uses this sandbox as its carrier."""
        return subprocess_env(CREDEX_LOGISTICS_URL=self.url, **extra)


@contextmanager
def running_sandbox(*extra_args: object, env: dict[str, str] | None = None) -> Iterator[RunningSandbox]:
    """``credex logistics sandbox --port 0 EXTRA_ARGS`` as a subprocess, stopped afterwards.

    ``env`` adds variables to the test environment (e.g. ``CREDEX_LOGISTICS_API_KEY``, which the
    admin calls of the ``RunningSandbox`` then carry).
    The URL is read from the first line of stdout, so no port is raced for.
    """
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(
            credex_command("logistics", "sandbox", "--port", "0", *extra_args),
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=subprocess_env(**(env or {})),
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
        try:
            try:
                first = lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                first = ""
            if not first.startswith("listening on "):
                process.kill()
                process.wait(10)
                log.seek(0)
                raise AssertionError(f"the sandbox did not start: {first!r}; stderr: {log.read()[-2000:]}")
            yield RunningSandbox(
                url=first.split("listening on ", 1)[1].strip(),
                process=process,
                api_key=(env or {}).get("CREDEX_LOGISTICS_API_KEY") or None,
            )
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            process.stdout.close()


def stop_and_wait(sandbox: RunningSandbox, timeout: float = 10) -> int:
    """SIGTERM, then the exit code (a clean stop is 0)."""
    sandbox.process.terminate()
    return sandbox.process.wait(timeout)


@pytest.fixture
def carrier_sandbox() -> Iterator[RunningSandbox]:
    """A sandbox carrier with default options (60 s stages, no faults) on a free port."""
    with running_sandbox() as sandbox:
        yield sandbox
