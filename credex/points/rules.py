"""Checks on what a user types, shared by every command and by bulk files."""

from __future__ import annotations

import re
from decimal import ROUND_FLOOR, Decimal, InvalidOperation

from credex.errors import InvalidInput

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
_INTEGER = re.compile(r"[+-]?\d+")


def parse_int(value: str | int, what: str, *, minimum: int | None = None, maximum: int = INT64_MAX) -> int:
    """An integer within 64 bits (and ``minimum``), or InvalidInput naming ``what``."""
    if isinstance(value, bool):
        raise InvalidInput(f"{what} must be an integer, got {value!r}")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip()
        if not _INTEGER.fullmatch(text):
            raise InvalidInput(f"{what} must be a whole number, got {value!r}")
        number = int(text)
    if abs(number) > maximum:
        raise InvalidInput(f"{what} is too large: {value} is beyond {maximum}")
    if minimum is not None and number < minimum:
        if minimum == 1:
            raise InvalidInput(f"{what} must be at least 1, got {number}")
        raise InvalidInput(f"{what} must be at least {minimum}, got {number}")
    return number


def parse_amount(value: str | Decimal, what: str = "amount") -> Decimal:
    """A positive, finite decimal amount of money."""
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidInput(f"{what} must be a decimal number such as 129.90, got {value!r}") from None
    if not amount.is_finite():
        raise InvalidInput(f"{what} must be a finite number, got {value!r}")
    if amount <= 0:
        raise InvalidInput(f"{what} must be greater than 0, got {value}")
    if amount.adjusted() > 15:
        raise InvalidInput(f"{what} is too large: {value}")
    return amount


def points_for(amount: Decimal, rate: Decimal) -> int:
    """floor(amount × rate), the points a purchase earns."""
    points = int((amount * rate).to_integral_value(rounding=ROUND_FLOOR))
    if points > INT64_MAX:
        raise InvalidInput(f"amount {amount} earns more points than a balance can hold")
    return points


def require_text(value: str | None, what: str) -> str:
    text = (value or "").strip()
    if not text:
        raise InvalidInput(f"{what} must not be empty")
    return text


_DURATION = re.compile(r"(\d+)\s*(s|m|h|d|w)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: str, what: str = "duration"):
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or a combination such as ``1d12h``."""
    from datetime import timedelta

    text = str(value).strip().lower().replace(" ", "")
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise InvalidInput(f"{what} must look like 30d, 12h, 90m, 45s or 2w, got {value!r}")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds > 100 * 365 * 86400:
        raise InvalidInput(f"{what} is too long: {value}")
    return timedelta(seconds=seconds)
