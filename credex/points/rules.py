"""The input rules (cli.md "Input rules"), shared by every command and by bulk files, checked
before any SQL runs and the same on SQLite and Postgres.

- Numbers are ASCII: ``[+-]?[0-9]+`` for points, stock and quantities, ``[0-9]+(.[0-9]{1,2})?``
  for amounts, within 64 bits and the range of the column that stores them.
- Identifiers and free text are non-empty printable text: no C0/C1 controls (tabs and line
  breaks among them), DEL, NUL, line separators, bidirectional overrides or lone surrogates.
  cli.md lets free text hold line breaks "only where the contract says so", and no field of the
  contract says so: a line break in a reason, a gift name or an address would split a log line,
  a CSV cell or a table row. Free text differs from an identifier by its length only.
- Lengths come from the columns themselves (``credex.db.tables``): one source of truth.

Each check exists twice: ``*_problem()`` returns why a value is refused (None: fine), for bulk
rows that are rejected one by one; the raising form gives InvalidInput (exit 2) naming the field.
"""

from __future__ import annotations

import re
from decimal import ROUND_FLOOR, Decimal

from sqlalchemy import Column

from credex.db import tables
from credex.errors import InvalidInput, printable
from credex.points.planner import INT64_MAX

INT32_MAX = 2**31 - 1
_INT64_DIGITS = len(str(INT64_MAX))
_INTEGER = re.compile(r"[+-]?[0-9]+")
_AMOUNT = re.compile(r"[0-9]+(?:\.[0-9]{1,2})?")
AMOUNT_MAX_DIGITS = 15  # before the point: what a purchase can cost, far below 64-bit points

# C0 and C1 controls, DEL, the line and paragraph separators, the bidirectional embeddings,
# overrides and isolates (U+202A-U+202E, U+2066-U+2069) and lone surrogates (not encodable).
_BIDI = "\u202a-\u202e\u2066-\u2069"
_NOT_PRINTABLE = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI}\ud800-\udfff]")
# Forgiven around a value (identifier or free text); anything else is kept as typed or refused.
SPACES = " "
FREE_TEXT_MAX = 4000  # for TEXT columns, which have no length of their own


def column_length(column: Column) -> int:
    """The most characters ``column`` holds: its declared length, or FREE_TEXT_MAX for TEXT."""
    return getattr(column.type, "length", None) or FREE_TEXT_MAX


# The fields a user types, each with the column that stores it.
USER_ID_MAX = column_length(tables.account.c.user_id)
SKU_MAX = column_length(tables.catalog_item.c.sku)
REF_MAX = column_length(tables.ledger_entry.c.ref)  # order, review, refund, grant ref
REQUEST_ID_MAX = column_length(tables.redemption.c.request_id)
OPERATOR_MAX = min(column_length(tables.ledger_entry.c.operator), column_length(tables.redemption.c.operator))
MESSAGE_ID_MAX = column_length(tables.outbox_message.c.id)
NAME_MAX = column_length(tables.catalog_item.c.name)
ADDRESS_MAX = column_length(tables.redemption.c.address)
REASON_MAX = column_length(tables.ledger_entry.c.reason)
CARRIER_MAX = column_length(tables.redemption.c.carrier)
EXPRESS_NO_MAX = column_length(tables.redemption.c.express_no)


# --- text ---------------------------------------------------------------------------------------


def _forbidden(text: str, pattern: re.Pattern[str]) -> str | None:
    found = pattern.search(text)
    if found is None:
        return None
    char = found.group()
    if "\u202a" <= char <= "\u2069":
        kind = "a bidirectional override"
    elif char in "\u2028\u2029":
        kind = "a line separator"
    elif "\ud800" <= char <= "\udfff":
        kind = "a lone surrogate (not Unicode text)"
    else:
        kind = "a control character"
    return f"{kind} ({printable(char)}) at character {found.start() + 1}"


def text_problem(value: object, what: str, longest: int) -> str | None:
    """Why ``value`` is not text of at most ``longest`` characters, an identifier's or free text
    (None: it is)."""
    if not isinstance(value, str):
        return f"{what} must be text"
    text = value.strip(SPACES)
    if not text:
        return f"{what} must not be empty"
    bad = _forbidden(text, _NOT_PRINTABLE)
    if bad is not None:
        return f"{what} must be printable text: it holds {bad}"
    if len(text) > longest:
        return f"{what} is longer than {longest} characters"
    return None


def cleaned(value: str, longest: int) -> str:
    """Free text from another program (a worker's reason) made storable rather than refused: the
    characters text may not hold (a line break among them) become one space each, surrounding
    spaces go, and it is cut at ``longest`` characters."""
    return _NOT_PRINTABLE.sub(" ", value).strip(SPACES)[:longest]


def checked_text(value: object, what: str, longest: int) -> str:
    """``value`` without surrounding spaces, or InvalidInput naming ``what``."""
    problem = text_problem(value, what, longest)
    if problem is not None:
        raise InvalidInput(problem)
    return value.strip(SPACES)  # type: ignore[union-attr]


def check_user_id(value: str, what: str = "user id") -> str:
    return checked_text(value, what, USER_ID_MAX)


def check_sku(value: str, what: str = "sku") -> str:
    return checked_text(value, what, SKU_MAX)


def check_ref(value: str, what: str = "ref") -> str:
    return checked_text(value, what, REF_MAX)


def check_request_id(value: str, what: str = "request id") -> str:
    return checked_text(value, what, REQUEST_ID_MAX)


def check_operator(value: str, what: str = "operator") -> str:
    return checked_text(value, what, OPERATOR_MAX)


def check_message_id(value: str, what: str = "message id") -> str:
    return checked_text(value, what, MESSAGE_ID_MAX)


def check_name(value: str, what: str = "name") -> str:
    return checked_text(value, what, NAME_MAX)


def check_address(value: str, what: str = "address") -> str:
    return checked_text(value, what, ADDRESS_MAX)


def check_reason(value: str, what: str = "reason") -> str:
    return checked_text(value, what, REASON_MAX)


# --- numbers ------------------------------------------------------------------------------------


def integer_problem(value: object, what: str, *, minimum: int | None = None, maximum: int = INT64_MAX):
    """The integer ``value`` stands for, or a str saying why it is refused."""
    if isinstance(value, bool):
        return f"{what} must be a whole number, got {printable(value)}"
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip(SPACES)
        if not text:
            return f"{what} must not be empty"
        if not _INTEGER.fullmatch(text):
            hint = " (ASCII digits only)" if any(c.isdigit() and not c.isascii() for c in text) else ""
            return f"{what} must be a whole number, got {printable(value)}{hint}"
        if len(text.lstrip("+-").lstrip("0")) > _INT64_DIGITS:
            return f"{what} is too large: {printable(value)} is beyond {maximum}"
        number = int(text)
    elif value is None:
        return f"{what} is missing"
    else:
        return f"{what} must be a whole number, got {printable(value)}"
    if abs(number) > maximum:
        if number < 0:  # -2**63 fits 64 bits, but its negation, which a refund or a report takes, does not
            return f"{what} is too large: {number} is below -{maximum}"
        return f"{what} is too large: {number} is beyond {maximum}"
    if minimum is not None and number < minimum:
        return f"{what} must be at least {minimum}, got {number}"
    return number


def parse_int(value: str | int, what: str, *, minimum: int | None = None, maximum: int = INT64_MAX) -> int:
    """An integer within 64 bits (or ``maximum``) and ``minimum``, or InvalidInput naming ``what``."""
    number = integer_problem(value, what, minimum=minimum, maximum=maximum)
    if isinstance(number, str):
        raise InvalidInput(number)
    return number


def parse_amount(value: str | Decimal, what: str = "amount") -> Decimal:
    """A positive amount of money: ASCII digits with at most two decimals (129.90)."""
    text = value.strip(SPACES) if isinstance(value, str) else None
    if isinstance(value, Decimal) and value.is_finite():
        text = f"{value:f}"
    if text is None or not _AMOUNT.fullmatch(text):
        raise InvalidInput(
            f"{what} must be a decimal number such as 129.90 (ASCII digits, at most two decimals), "
            f"got {printable(value)}"
        )
    if len(text.split(".")[0].lstrip("0")) > AMOUNT_MAX_DIGITS:
        raise InvalidInput(
            f"{what} is too large: {text} (at most {AMOUNT_MAX_DIGITS} digits before the point)"
        )
    amount = Decimal(text)
    if amount <= 0:
        raise InvalidInput(f"{what} must be greater than 0, got {text}")
    return amount


def points_for(amount: Decimal, rate: Decimal) -> int:
    """floor(amount × rate), the points a purchase earns."""
    points = int((amount * rate).to_integral_value(rounding=ROUND_FLOOR))
    if points > INT64_MAX:
        raise InvalidInput(f"amount {amount} earns more points than a balance can hold")
    return points


_DURATION = re.compile(r"([0-9]+)\s*(s|m|h|d|w)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: str, what: str = "duration"):
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or a combination such as ``1d12h``."""
    from datetime import timedelta

    text = str(value).strip().lower().replace(" ", "")
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text or len(text) > 40:
        raise InvalidInput(f"{what} must look like 30d, 12h, 90m, 45s or 2w, got {printable(value)}")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds > 100 * 365 * 86400:
        raise InvalidInput(f"{what} is too long: {value}")
    return timedelta(seconds=seconds)
