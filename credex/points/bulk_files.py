"""Bulk grant files: CSV with a header or JSON lines, read as a stream of checked rows, and the
rejects file that keeps each refused row with its line number and the reason.

Reading never holds more than one row: a file of any size streams in bounded memory.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from credex.errors import InvalidInput, printable, read_json
from credex.points.rules import (
    REASON_MAX,
    REF_MAX,
    SPACES,
    USER_ID_MAX,
    integer_problem,
    text_problem,
)

FORMATS = ("csv", "jsonl")
REQUIRED = ("user_id", "points", "ref")
HEADER_HINT = "user_id,points,ref[,reason]"


class UnreadableFile(InvalidInput):
    """The input is not the format (no header, not CSV, not JSON lines): nothing to apply from
    here on. ``line`` is where reading stopped (0: before the first row)."""

    def __init__(self, message: str, *, line: int = 0) -> None:
        super().__init__(message)
        self.line = line


@dataclass(slots=True)
class Grant:
    """One checked row: what ``award grant`` would be given for it."""

    line: int
    user_id: str
    points: int
    ref: str
    reason: str | None
    original: Any  # the row as read (CSV fields or the JSON object), for the rejects file


@dataclass(slots=True)
class Rejected:
    line: int
    reason: str
    original: Any  # CSV fields, a JSON object, or the text of a line that is not JSON


def guess_format(name: str | None, given: str | None) -> str | None:
    """``given``, else what the file name says (None: look at the content)."""
    if given:
        return given
    lowered = (name or "").lower()
    if lowered.endswith((".jsonl", ".ndjson", ".jsonlines")):
        return "jsonl"
    if lowered.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    return None


# --- one field at a time: the rules of ``award grant``, as fast as a million rows needs ---------


def check_points(value: Any) -> int | str:
    """The points of a row (the input rules of ``award grant``), or the reason they are refused."""
    if not (isinstance(value, str | int | None)) or isinstance(value, bool):
        return f"points must be a whole number, got {json.dumps(value)}"
    number = integer_problem(value, "points")
    if number == 0:
        return "points must not be zero"
    return number


def _check_key(value: Any, what: str, longest: int) -> str | tuple[str]:
    """A user id or ref (text, or a whole number in JSON); a 1-tuple holds the refusal."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    elif value is None:
        return (f"{what} is missing",)
    elif not isinstance(value, str):
        return (f"{what} must be text, got {json.dumps(value)}",)
    problem = text_problem(value, what, longest)
    if problem is not None:
        return (problem,)
    return value.strip(SPACES)


def check_row(line: int, user_id: Any, points: Any, ref: Any, reason: Any, original: Any) -> Grant | Rejected:
    """A row as a Grant, or Rejected with the first rule it breaks."""
    # The common row (printable text fields, positive points of at most 18 digits) in a few
    # steps: a million rows spend more time here than anywhere else in Python.
    if user_id.__class__ is str and points.__class__ is str and ref.__class__ is str:
        user, digits, key = user_id.strip(SPACES), points.strip(SPACES), ref.strip(SPACES)
        if (
            user
            and key
            and len(user) <= USER_ID_MAX
            and len(key) <= REF_MAX
            and len(digits) <= 18
            and digits.isdigit()
            and digits.isascii()
            # isprintable() refuses every control, bidi, separator and surrogate character (and a
            # few harmless ones, such as a no-break space, which then take the slow path).
            and user.isprintable()
            and key.isprintable()
            and (
                reason is None
                or (reason.__class__ is str and len(reason) <= REASON_MAX and reason.isprintable())
            )
        ):
            number = int(digits)
            if number:
                return Grant(
                    line, user, number, key, (reason.strip(SPACES) or None) if reason else None, original
                )
    return _check_row(line, user_id, points, ref, reason, original)


def _check_row(
    line: int, user_id: Any, points: Any, ref: Any, reason: Any, original: Any
) -> Grant | Rejected:
    user = _check_key(user_id, "user_id", USER_ID_MAX)
    if type(user) is tuple:
        return Rejected(line, user[0], original)
    amount = check_points(points)
    if type(amount) is str:
        return Rejected(line, amount, original)
    key = _check_key(ref, "ref", REF_MAX)
    if type(key) is tuple:
        return Rejected(line, key[0], original)
    if reason is not None:
        if not isinstance(reason, str):
            return Rejected(line, f"reason must be text, got {json.dumps(reason)}", original)
        reason = reason.strip(SPACES) or None
        problem = reason and text_problem(reason, "reason", REASON_MAX)
        if problem:
            return Rejected(line, problem, original)
    return Grant(line, user, amount, key, reason, original)


# --- readers --------------------------------------------------------------------------------------


class GrantReader:
    """Rows of a bulk file in order, each a Grant or Rejected; ``bytes_read`` (None when the
    stream cannot tell, such as a pipe) and ``size`` (None when unknown) drive a progress bar."""

    format: str
    columns: list[str] | None = None  # the CSV header as written (None for JSON lines)

    def __init__(self, stream: IO[bytes], size: int | None) -> None:
        self._stream = stream
        self.size = size

    def __iter__(self) -> Iterator[Grant | Rejected]:
        raise NotImplementedError

    @property
    def bytes_read(self) -> int | None:
        try:
            return self._stream.tell()
        except (OSError, ValueError, AttributeError):
            return None


# The longest line read: a row at its longest (a 4,000-character reason written as \uXXXX
# escapes, the ids at their limits, a few other keys or columns) is a few dozen KiB. A longer
# line is skipped without being held whole: a rejected row in JSON lines, a malformed CSV file.
LINE_MAX = 1 << 20
LINE_MAX_TEXT = "1 MiB"


def _lines(stream: IO[bytes]) -> Iterator[bytes | None]:
    """The stream's lines, each at most LINE_MAX bytes; None for a longer one, its rest skipped
    a piece at a time."""
    readline = stream.readline
    while True:
        raw = readline(LINE_MAX + 1)
        if not raw:
            return
        if len(raw) > LINE_MAX and not raw.endswith(b"\n"):
            while (rest := readline(LINE_MAX)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        yield raw


def _first_line(stream: IO[bytes], name: str) -> tuple[int, bytes]:
    """The first line that is not blank, and how many lines it took to get there."""
    number = 0
    for raw in _lines(stream):
        number += 1
        if raw is None:
            raise UnreadableFile(f"{name}, line {number}: longer than {LINE_MAX_TEXT}", line=number)
        if raw.strip():
            return number, raw
    return number, b""


class CsvGrants(GrantReader):
    """CSV with a header naming ``user_id``, ``points``, ``ref`` and optionally ``reason`` in any
    order; other columns are ignored (and kept in the rejects file)."""

    format = "csv"

    def __init__(self, stream: IO[bytes], size: int | None, name: str) -> None:
        super().__init__(stream, size)
        self._name = name
        skipped, first = _first_line(stream, name)
        if not first:
            raise UnreadableFile(f"{name} is empty: expected a header {HEADER_HINT}")
        try:
            header_text = first.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise UnreadableFile(f"{name} is not CSV: its first line is not UTF-8 text") from None
        self._skipped = skipped - 1  # blank lines before the header
        self._lines = skipped
        self._reader = csv.reader(itertools.chain([header_text], self._decoded(stream)))
        try:
            header = next(self._reader)
        except csv.Error as error:
            raise UnreadableFile(f"{name} is not CSV: {error}") from None
        self.columns = header
        names = [column.strip().lower() for column in header]
        missing = [column for column in REQUIRED if column not in names]
        if missing:
            hint = " (JSON lines? use --format jsonl)" if header_text.lstrip().startswith("{") else ""
            raise UnreadableFile(
                f"{name} has no {HEADER_HINT} header: the first line names "
                f"{', '.join(printable(c) for c in header[:6]) or 'nothing'}{hint}"
            )
        repeated = sorted({column for column in names if names.count(column) > 1 and column})
        if repeated:
            raise UnreadableFile(f"{name}: the header names {', '.join(repeated)} more than once")
        self._at = {column: names.index(column) for column in (*REQUIRED, "reason") if column in names}

    def _decoded(self, stream: IO[bytes]) -> Iterator[str]:
        # Line by line, so that a line that is not UTF-8 is named and the rows before it count.
        for raw in _lines(stream):
            self._lines += 1
            if raw is None:
                raise UnreadableFile(
                    f"{self._name}, line {self._lines}: longer than {LINE_MAX_TEXT}", line=self._lines
                )
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UnreadableFile(
                    f"{self._name}, line {self._lines}: not UTF-8 text", line=self._lines
                ) from None

    def __iter__(self) -> Iterator[Grant | Rejected]:
        reader, skipped = self._reader, self._skipped
        width = len(self.columns)
        user_at, points_at, ref_at = self._at["user_id"], self._at["points"], self._at["ref"]
        reason_at = self._at.get("reason")
        line = reader.line_num + skipped
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise UnreadableFile(
                    f"{self._name}, line {line + 1}: not UTF-8 text", line=line + 1
                ) from None
            except csv.Error as error:
                raise UnreadableFile(
                    f"{self._name}, line {line + 1}: not CSV: {error}", line=line + 1
                ) from None
            start, line = line + 1, reader.line_num + skipped
            if len(fields) == width:
                yield check_row(
                    start,
                    fields[user_at],
                    fields[points_at],
                    fields[ref_at],
                    None if reason_at is None else fields[reason_at],
                    fields,
                )
            elif not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line
            elif len(fields) < width:
                named = [
                    column for column, at in self._at.items() if at >= len(fields) and column != "reason"
                ]
                padded = fields + [""] * (width - len(fields))
                if named:
                    yield Rejected(
                        start, f"{named[0]} is missing (the row has {len(fields)} of {width} fields)", fields
                    )
                else:
                    yield check_row(
                        start,
                        padded[user_at],
                        padded[points_at],
                        padded[ref_at],
                        None if reason_at is None else padded[reason_at],
                        fields,
                    )
            else:
                yield Rejected(
                    start,
                    f"the row has {len(fields)} fields, the header {width} (an unquoted comma?)",
                    fields,
                )


class JsonLinesGrants(GrantReader):
    """One JSON object per line with ``user_id``, ``points``, ``ref`` and optionally ``reason``;
    other keys are ignored. A line that is not a JSON object is a rejected row, except the first,
    which says the file is not JSON lines at all."""

    format = "jsonl"

    def __init__(self, stream: IO[bytes], size: int | None, name: str) -> None:
        super().__init__(stream, size)
        self._skipped, first = _first_line(stream, name)
        if not first:
            raise UnreadableFile(f"{name} is empty: expected JSON lines with {', '.join(REQUIRED)}")
        self._first = _parse_object(first.removeprefix(codecs.BOM_UTF8))
        if not isinstance(self._first, dict):
            raise UnreadableFile(
                f"{name} is not JSON lines: line {self._skipped} is not a JSON object", line=self._skipped
            )

    def __iter__(self) -> Iterator[Grant | Rejected]:
        yield _object_row(self._skipped, self._first)
        for line, raw in enumerate(_lines(self._stream), self._skipped + 1):
            if raw is None:
                yield Rejected(line, f"the line is longer than {LINE_MAX_TEXT}", "")
                continue
            if not raw.strip():
                continue
            row = _parse_object(raw)
            if isinstance(row, dict):
                yield _object_row(line, row)
            else:
                yield Rejected(line, row, raw.decode("utf-8", "replace").rstrip("\r\n"))


def _parse_object(raw: bytes) -> dict | str:
    """The line's JSON object, or why it is not one."""
    try:
        value = read_json(raw)
    except json.JSONDecodeError as error:
        return f"not a JSON object: {error.msg} at character {error.pos + 1}"
    except ValueError as error:  # not UTF-8, a number with thousands of digits, nested too deeply
        return f"not a JSON object: {str(error).splitlines()[0]}"
    if not isinstance(value, dict):
        return f"not a JSON object: {type(value).__name__}"
    return value


def _object_row(line: int, row: dict) -> Grant | Rejected:
    return check_row(line, row.get("user_id"), row.get("points"), row.get("ref"), row.get("reason"), row)


def open_grants(stream: IO[bytes], *, name: str, format: str | None, size: int | None = None) -> GrantReader:
    """A reader for ``stream`` (binary). ``format`` None: JSON lines when the first thing in
    the file is ``{``, else CSV. UnreadableFile when the start of the file is not the format."""
    if format is None:
        stream = stream if hasattr(stream, "peek") else io.BufferedReader(stream)  # type: ignore[arg-type]
        format = (
            "jsonl" if stream.peek(64)[:64].lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"{") else "csv"
        )
    if format == "jsonl":
        return JsonLinesGrants(stream, size, name)
    if format == "csv":
        return CsvGrants(stream, size, name)
    raise InvalidInput(f"unknown format {printable(format)}: use csv or jsonl")
