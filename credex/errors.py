"""The errors a user can see. Each class carries its own exit code and JSON code."""

from __future__ import annotations

import re


class CredexError(Exception):
    """A failure the CLI reports as one line on stderr, with an exit code."""

    exit_code: int = 1
    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidInput(CredexError):
    exit_code = 2
    code = "invalid_input"


class RuleViolation(CredexError):
    """Refused by a rule of the points program (exit 1)."""


class InsufficientPoints(RuleViolation):
    code = "insufficient_points"


class OutOfStock(RuleViolation):
    code = "out_of_stock"


class UnknownUser(RuleViolation):
    code = "unknown_user"


class UnknownSku(RuleViolation):
    code = "unknown_sku"


class UnknownRedemption(RuleViolation):
    code = "unknown_redemption"


class UnknownMessage(RuleViolation):
    code = "unknown_message"


class UnknownOrder(RuleViolation):
    code = "unknown_order"


class NotFound(RuleViolation):
    code = "not_found"


class Conflict(RuleViolation):
    code = "conflict"


class NotCancellable(RuleViolation):
    """A redemption already delivered or returned: there is nothing left to cancel."""

    code = "not_cancellable"


class NotMigrated(RuleViolation):
    code = "not_migrated"


class Unavailable(CredexError):
    """A service (database, broker, carrier API) could not be reached."""

    exit_code = 69
    code = "unavailable"


class CarrierNotConfigured(CredexError):
    """No carrier API is configured, or its settings are incomplete (bad usage: exit 2)."""

    exit_code = 2
    code = "not_configured"


class CarrierRejected(RuleViolation):
    """The carrier refused the request for good: retrying it would not help."""

    code = "carrier_rejected"


class UnknownParcel(RuleViolation):
    """The carrier knows no parcel with this express number (yet)."""

    code = "unknown_parcel"


class NotShipped(RuleViolation):
    """A redemption that has no express number yet."""

    code = "not_shipped"


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")
_KEY_VALUE_PASSWORD = re.compile(r"(?i)\b(password|passwd|pwd)=\S+")
_KEY_VALUE_SECRET = re.compile(r"(?i)\b([a-z_]*key|sign|token)=[^\s&]+")  # an API key or signature in a form
_BEARER = re.compile(r"(?i)\b(bearer)\s+\S+")


def redact(text: str) -> str:
    """Hide passwords in URLs, ``password=...`` and ``key=...`` pairs and bearer tokens in free text."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    text = _BEARER.sub(r"\1 ***", text)
    text = _KEY_VALUE_SECRET.sub(r"\1=***", text)
    return _KEY_VALUE_PASSWORD.sub(r"\1=***", text)
