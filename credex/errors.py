"""The errors a user can see. Each class carries its own exit code and JSON code."""

from __future__ import annotations

import json
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


class SchemaMismatch(RuleViolation):
    """The database says it is at credex's revision, but a table or column it needs is missing
    (renamed or dropped by hand): nothing credex can repair by retrying."""

    code = "schema_mismatch"


class UnreadableValue(RuleViolation):
    """A value stored in the database is not of its column's type (SQLite keeps whatever an UPDATE
    run by hand gives it: a time that is no time, text in a number): credex cannot read the row
    until someone repairs it."""

    code = "unreadable_value"


class ConstraintViolated(RuleViolation):
    """A CHECK constraint of the database refused a change that credex's own checks let through:
    a stored value changed by hand (on SQLite, text in a balance passes ``balance >= cost``).
    Nothing was written."""

    code = "constraint_violated"


class AppendOnly(RuleViolation):
    """A ledger entry (or stock movement) cannot be changed or removed: a correction is a new entry."""

    code = "append_only"


class PermissionDenied(RuleViolation):
    """The database role this process connects as may not do this (``credex db roles``)."""

    code = "permission_denied"


class QueueTypeMismatch(RuleViolation):
    """A queue exists on the broker with another type than credex declares (a classic queue left
    by an older version where credex wants a quorum queue): reconnecting cannot fix it."""

    code = "queue_type_mismatch"


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


# What a terminal would act on rather than show: controls (a line break could forge a second
# `error:` line), bidirectional overrides and isolates, line separators, lone surrogates.
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: str) -> str:
    """``text`` safe to show on one line: every control, bidi or surrogate character escaped."""
    return _UNSHOWABLE.sub(_escape, text)


def printable(value: object, limit: int = 40) -> str:
    """A value quoted for an error message: its repr with what a terminal would act on escaped,
    cut short after ``limit`` characters."""
    if isinstance(value, str) and len(value) > limit:
        return one_line(repr(value[:limit])) + f"… ({len(value)} characters)"
    text = one_line(repr(value))
    return text if len(text) <= limit + 2 else text[:limit] + "…"


_WHITESPACE = re.compile(r"\s")
_NOT_IN_USER = re.compile(r"[/@]")
_KEY_VALUE_PASSWORD = re.compile(r"(?i)\b(password|passwd|pwd)=\S+")
_KEY_VALUE_SECRET = re.compile(r"(?i)\b([a-z_]*key|sign|token)=[^\s&]+")  # an API key or signature in a form
_BEARER = re.compile(r"(?i)\b(bearer)\s+\S+")


def _hide_url_passwords(text: str) -> str:
    """``scheme://user:***@host…`` for every URL in ``text``. The password runs to the last ``@``
    before the URL ends (whitespace or the next URL), so one holding an ``@`` that was not
    percent-encoded is hidden whole, not up to its first ``@``. In one pass over the text: a
    message quoting a long value (a pattern tried at every position took seconds on 40,000
    characters and grew with their square) costs its length."""
    pieces, kept = [], 0
    start = text.find("://")
    while start != -1:
        following = text.find("://", start + 3)
        end = len(text) if following == -1 else following
        space = _WHITESPACE.search(text, start + 3, end)
        end = end if space is None else space.start()
        scheme_before = start > 0 and text[start - 1].isascii() and text[start - 1].isalnum()
        colon = text.find(":", start + 3, end) if scheme_before else -1
        if colon != -1 and _NOT_IN_USER.search(text, start + 3, colon) is None:
            at = text.rfind("@", colon + 1, end)
            if at != -1:
                pieces += [text[kept : colon + 1], "***"]
                kept = at
        start = following
    pieces.append(text[kept:])
    return "".join(pieces)


# A secret shorter than this is not hidden by its value: a key of a few characters ("test", "123")
# matches ordinary words and numbers in a carrier's text (an express number, a time) and would
# mangle them, while hiding it protects little (it is guessed as easily). Real carrier keys and
# kuaidi100 customer ids are 16 to 32 characters.
SECRET_MIN_LENGTH = 8


def secret_pattern(*secrets: str | None) -> re.Pattern[str] | None:
    """One pattern for the values of ``secrets`` (an API key, a customer id) in any case, longest
    first; None when none is at least SECRET_MIN_LENGTH long. For ``redact(text, secrets=...)``."""
    kept = sorted({secret for secret in secrets if secret and len(secret) >= SECRET_MIN_LENGTH}, key=len)
    if not kept:
        return None
    return re.compile("|".join(re.escape(secret) for secret in reversed(kept)), re.IGNORECASE)


def hide_secrets(text: str, secrets: re.Pattern[str] | None) -> str:
    """``text`` with every occurrence of the ``secret_pattern`` values replaced by ``***``."""
    return text if secrets is None else secrets.sub("***", text)


def redact(text: str, secrets: re.Pattern[str] | None = None) -> str:
    """Hide passwords in URLs, ``password=...`` and ``key=...`` pairs and bearer tokens in free text,
    and, by value, the ``secrets`` (a ``secret_pattern``): a carrier that echoes its key back in its
    own words ("api_key ABC… is not allowed") follows no pattern. Hide them before the text is cut
    short, or a cut through a secret leaves its beginning."""
    text = _hide_url_passwords(hide_secrets(text, secrets))
    text = _BEARER.sub(r"\1 ***", text)
    text = _KEY_VALUE_SECRET.sub(r"\1=***", text)
    return _KEY_VALUE_PASSWORD.sub(r"\1=***", text)


_SCHEME_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/+")
_URL_LIST_EDGES = re.compile(r"([\s,]+)")


def redact_url(text: str) -> str:
    """``redact`` for a value given as a URL (or a list of them) that may not be well formed:
    ``guest:pw@host``, ``amqp:/guest:pw@host``, ``postgres:pw@host/db``. In each piece holding an
    ``@``, whatever runs from the first ``:`` after the scheme to the last ``@`` is a password."""
    pieces = _URL_LIST_EDGES.split(redact(text))
    for index in range(0, len(pieces), 2):
        piece = pieces[index]
        at = piece.rfind("@")
        if at <= 0:
            continue
        scheme = _SCHEME_PREFIX.match(piece, 0, at)
        colon = piece.find(":", scheme.end() if scheme else 0, at)
        if colon != -1 and piece[colon + 1 : at] != "***":
            pieces[index] = f"{piece[: colon + 1]}***{piece[at:]}"
    return "".join(pieces)


def read_json(raw: bytes | str) -> object:
    """``json.loads`` for input from outside (a carrier's answer, a message, a request): a document
    nested too deeply for the parser is a ValueError like any other unreadable JSON (the standard
    library raises RecursionError), so one ``except ValueError`` covers them all."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def json_object(raw: bytes | str) -> dict | None:
    """The JSON object ``raw`` holds, or None when it holds none (not JSON, not UTF-8, cut short,
    nested too deeply, or JSON but not an object)."""
    try:
        document = read_json(raw)
    except ValueError:  # UnicodeDecodeError included
        return None
    return document if isinstance(document, dict) else None
