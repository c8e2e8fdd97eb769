"""A local carrier that speaks the generic contract (logistics.md), for demos, staging and tests.

Parcels live in memory and move ``info_received → in_transit → out_for_delivery → delivered``,
one stage every ``stage_seconds`` from their creation; a seeded share of them (or one marked by
hand) is refused by the recipient and ends ``exception → returned`` instead. A parcel can be
cancelled until it is picked up. Tracking numbers are never handed out twice, across restarts
too, unless sequential numbering is asked for. Faults (503s, 429s with Retry-After, slow
answers, dropped connections, final 409s and 422s) come from a script of first faults, from
seeded random shares, or from an ``X-Sandbox-Fault`` header on one request, so that retries and
final refusals can be seen working.

This module is the carrier itself (its state, numbering and rules, callable without a socket);
``sandbox_http.py`` serves it over HTTP.

(A little over 400 lines on purpose: the parcels' stages, numbering, cancels and faults are one
model of a carrier; its HTTP server is sandbox_http.py.)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

CARRIER = "sandbox"
FAULTS = ("503", "429", "slow", "drop", "409", "422")
FAULT_HEADER = "X-Sandbox-Fault"
NUMBERINGS = ("unique", "sequential")
MAX_BODY = 1 << 20
MAX_OFFSET = 100 * 365 * 24 * 3600  # how far the clock may be moved ahead: a century
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
# What no text of a shipment may hold: control characters (C0, DEL, C1), which would come back in
# every listing and tracking answer, and lone surrogates, which no UTF-8 answer can carry.
_UNSENDABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


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


def error_document(code: str, message: str) -> dict[str, Any]:
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
            raise ValueError(f"unknown numbering {scheme[:40]!r}: use {' or '.join(NUMBERINGS)}")
        self.scheme = scheme
        random_part = "".join(secrets.choice(_BASE36) for _ in range(4))  # never the seeded RNG
        self.prefix = _base36(int(wall()), 7) + random_part if scheme == "unique" else ""

    def shipment(self, sequence: int) -> tuple[str, str]:
        """The shipment id and tracking number of the ``sequence``-th parcel (1 first)."""
        if not self.prefix:
            return f"sbx-{sequence}", f"SIM{sequence:010d}"
        return f"sbx-{self.prefix}-{sequence}", f"SIM{self.prefix}{sequence:06d}"


def shipment_problem(body: object) -> str | None:
    """What is wrong with a create-shipment body, or None. Its texts are refused when they hold
    what the answers that repeat them (listings, trackings) could not show or send."""
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
    texts = [("order_ref", body["order_ref"])]
    texts += [(f"recipient.{name}", recipient.get(name, "")) for name in ("name", "phone", "address")]
    items = body.get("items")
    if not isinstance(items, list) or not items:
        return "items must be a non-empty list"
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("sku"), str) or not item["sku"].strip():
            return "every item needs a sku"
        texts.append(("a sku", item["sku"]))
        quantity = item.get("quantity")
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            return "every item needs a quantity of at least 1"
    for name, text in texts:
        if _UNSENDABLE.search(text):
            return f"{name} must not hold control characters or lone surrogates"
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
            raise ValueError(f"unknown fault {unknown[0][:40]!r}: use {', '.join(FAULTS)}")
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
        """Make time pass for every parcel (tests and demos do not wait for the schedule), at most
        ``MAX_OFFSET`` seconds in all: further, the clock leaves the calendar (ValueError)."""
        with self._lock:
            if not 0 <= seconds <= MAX_OFFSET - self._offset:
                raise ValueError(f"the clock moves at most {MAX_OFFSET} seconds ahead in all")
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
                    return 409, error_document(
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
                return 404, error_document("not_found", f"no shipment {shipment_id}")
            parcel.cancel_calls += 1
            if parcel.cancel_answer is not None:
                return 200, parcel.cancel_answer
            reached = self._stage(parcel, now)
            if reached > 0:
                status = parcel.stages[reached][0]
                return 409, error_document(
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
                return 404, error_document("not_found", f"no shipment {shipment_id}")
            if parcel.cancelled_at is not None:
                return 409, error_document(
                    "cancelled", f"shipment {shipment_id} was cancelled: nobody will refuse it"
                )
            if not parcel.refused and self._stage(parcel, now) >= len(STAGES) - 1:
                return 409, error_document(
                    "already_delivered", f"shipment {shipment_id} was delivered already"
                )
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
                return 404, error_document("not_found", f"no parcel {number} at carrier {carrier}")
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
            first = sorted(unknown)[0][:40]
            raise ValueError(f"cannot filter on {first!r}: use {', '.join(SHIPMENT_FILTERS)}")
        now = self.now()
        with self._lock:
            rows = [self._row(parcel, now) for parcel in self._by_key.values()]
        return [row for row in rows if all(row[name] == value for name, value in where.items())]
