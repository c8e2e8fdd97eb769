"""The warehouse's carrier client with its calls timed and its failures counted for the metrics,
and a refused API key taken for what it is to a warehouse: the carrier out of reach for now."""

from __future__ import annotations

import time
from collections.abc import Callable

from credex.errors import CredexError, Unavailable
from credex.logistics.model import CarrierKeyRefused, CarrierUnreachable
from credex.metrics import WarehouseMetrics


def carrier_error_kind(error: CredexError) -> str:
    """A carrier's failure as a metric label: worth retrying (unavailable) or final (rejected)."""
    return "unavailable" if isinstance(error, Unavailable) else "rejected"


class MeteredCarrier:
    """The carrier client with each waybill and cancel call timed
    (``credex_warehouse_carrier_seconds{call}``) and each failure counted
    (``credex_carrier_errors_total{kind}``); everything else is the client's own.

    A refused API key (401/403) is final for the call but says nothing of the shipment: every
    other call fails the same way until the key is fixed. Taken as final, it would fail every
    waybill asked for meanwhile (``shipment.failed``: redemptions in ``exception``), answer every
    cancel "refused" and leave a stray waybill live. So the warehouse takes it as the carrier out
    of reach (not final): nothing is failed, refused or given up, the messages are acked
    unanswered and the relay sends them again, as ``track sync`` checks its parcels again once
    the key is fixed."""

    def __init__(self, carrier, metrics: WarehouseMetrics) -> None:
        self._carrier = carrier
        self._metrics = metrics

    def __getattr__(self, name: str):
        return getattr(self._carrier, name)

    def create_shipment(self, *args, **kwargs):
        return self._call("create_shipment", self._carrier.create_shipment, args, kwargs)

    def cancel_shipment(self, *args, **kwargs):
        return self._call("cancel_shipment", self._carrier.cancel_shipment, args, kwargs)

    def _call(self, name: str, call: Callable, args: tuple, kwargs: dict):
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        except CredexError as error:
            self._metrics.carrier_errors.labels(carrier_error_kind(error)).inc()
            if isinstance(error, CarrierKeyRefused):
                raise CarrierUnreachable(
                    f"{error.message}; nothing is failed for it, the message comes again",
                    http_status=error.http_status,
                    error_code=error.error_code,
                    reason="the carrier refused the API key",
                ) from None
            raise
        finally:
            self._metrics.carrier_seconds.labels(name).observe(time.perf_counter() - started)
