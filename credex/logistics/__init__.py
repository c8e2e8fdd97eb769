"""The carrier side: one client interface, two providers chosen by ``CREDEX_LOGISTICS_PROVIDER``
(``generic``, the contract the sandbox speaks; ``kuaidi100``, tracking only), and the sandbox.

Importing this package is cheap: httpx is imported when a client is made.

    with carrier_client(settings) as client:
        waybill = client.create_shipment(idempotency_key=..., order_ref=..., recipient=..., items=...)
        tracking = client.track(waybill.express_no, carrier=waybill.carrier)
        result = client.cancel_shipment(waybill.shipment_id, idempotency_key=...)

A carrier's failure is a ``CarrierError``: ``CarrierUnreachable`` (try again later) or a
``CarrierRefusal`` (final, with ``http_status``, ``error_code`` and ``reason``). See docs/logistics.md.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from credex.errors import CarrierNotConfigured, printable
from credex.logistics.model import (
    FINAL_STATUSES,
    STATUSES,
    CancelOutcome,
    CancelResult,
    CarrierClient,
    CarrierError,
    CarrierKeyRefused,
    CarrierRefusal,
    CarrierUnreachable,
    Checkpoint,
    InvalidCarrierAnswer,
    ParcelNotFound,
    Tracking,
    UnknownShipment,
    Waybill,
    is_final,
)

if TYPE_CHECKING:
    from credex.config import Settings

__all__ = [
    "FINAL_STATUSES",
    "NO_CARRIER_HELP",
    "PROVIDERS",
    "STATUSES",
    "CancelOutcome",
    "CancelResult",
    "CarrierClient",
    "CarrierError",
    "CarrierKeyRefused",
    "CarrierRefusal",
    "CarrierUnreachable",
    "Checkpoint",
    "InvalidCarrierAnswer",
    "ParcelNotFound",
    "Tracking",
    "UnknownShipment",
    "Waybill",
    "carrier_client",
    "is_final",
]

PROVIDERS = ("generic", "kuaidi100")
SANDBOX_URL = "http://127.0.0.1:8700"
NO_CARRIER_HELP = (
    "no carrier API is configured: start the local one with `credex logistics sandbox` and set "
    f"CREDEX_LOGISTICS_URL={SANDBOX_URL} (or set CREDEX_LOGISTICS_PROVIDER=kuaidi100 with "
    "CREDEX_KUAIDI100_CUSTOMER and CREDEX_KUAIDI100_KEY)"
)


def carrier_client(
    settings: Settings,
    *,
    total_timeout: float | None = None,
    transport: Any = None,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
    rng: random.Random | None = None,
) -> CarrierClient:
    """The configured carrier's client; close it (``with``) when done.

    ``total_timeout`` overrides ``CREDEX_LOGISTICS_TOTAL_TIMEOUT``: the bound, in seconds, on one
    call including its retries. ``transport``, ``sleep``, ``clock`` and ``rng`` are for tests
    (an ``httpx.MockTransport``, a sleep that does not wait, a clock that it moves).
    Raises ``CarrierNotConfigured`` (exit 2) when the settings name no usable carrier.
    """
    provider = (settings.logistics_provider or "generic").strip().lower()
    if provider not in PROVIDERS:
        raise CarrierNotConfigured(
            f"unknown carrier provider {printable(provider)}: "
            "set CREDEX_LOGISTICS_PROVIDER to generic or kuaidi100"
        )
    if provider == "generic" and not settings.logistics_url:
        raise CarrierNotConfigured(NO_CARRIER_HELP)
    if provider == "kuaidi100":
        key = settings.kuaidi100_key
        if not settings.kuaidi100_customer or key is None or not key.get_secret_value():
            raise CarrierNotConfigured(
                "the kuaidi100 provider needs CREDEX_KUAIDI100_CUSTOMER and CREDEX_KUAIDI100_KEY "
                "(the customer id and key of a kuaidi100 enterprise account)"
            )

    from credex.logistics.retrying import RetryingHttp, RetryPolicy

    bound = settings.logistics_total_timeout if total_timeout is None else total_timeout
    policy = RetryPolicy(
        total_timeout=bound,
        connect_timeout=settings.logistics_connect_timeout,
        read_timeout=settings.logistics_read_timeout,
    )
    hooks: dict[str, Any] = {"transport": transport, "policy": policy, "rng": rng}
    if sleep is not None:
        hooks["sleep"] = sleep
    if clock is not None:
        hooks["clock"] = clock

    if provider == "kuaidi100":
        from credex.logistics.kuaidi100 import KUAIDI100_URL, Kuaidi100Carrier

        http = RetryingHttp(settings.logistics_url or KUAIDI100_URL, carrier_name="kuaidi100", **hooks)
        return Kuaidi100Carrier(
            http,
            customer=settings.kuaidi100_customer or "",
            key=settings.kuaidi100_key,
            default_carrier=settings.logistics_carrier,
        )

    from credex.logistics.generic import GenericCarrier

    headers = {}
    api_key = settings.logistics_api_key.get_secret_value() if settings.logistics_api_key else None
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    http = RetryingHttp(settings.logistics_url, carrier_name="the carrier", headers=headers, **hooks)
    return GenericCarrier(http, default_carrier=settings.logistics_carrier, api_key=api_key)
