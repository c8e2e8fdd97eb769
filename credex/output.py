"""One way to print a result: exactly one JSON document on stdout, or a Rich table/panel."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def to_json(value: Any) -> str:
    return json.dumps(value, default=_default, ensure_ascii=False)


def _console(stderr: bool = False):
    import os

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (a log, a ticket) should not be squeezed into 80 columns.
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(file=stream, width=160 if wide else None, soft_wrap=False, highlight=False)


def _text(value: str | None):
    """``value`` as Rich text taken literally: stored data (an address, a reason, a user id) may
    hold ``[/b]`` or ``[link=…]``, which Rich would otherwise read as markup, failing on a closing
    tag it never opened or hiding part of the value from the operator. What a terminal would act
    on (an escape sequence, a bidirectional override, any other control) is shown escaped, as
    ``\x1b``: rows written before the input rules, or by hand, may hold it, and Rich passes it
    through. A line break stays one: free text from before the rules may span lines."""
    from rich.text import Text

    from credex.errors import one_line

    if value is None:
        return None
    return Text("\n".join(one_line(line) for line in value.split("\n")))


def _cell(value: Any):
    if value is None:
        return _text("-")
    if isinstance(value, datetime):
        return _text(value.isoformat(timespec="seconds"))
    if isinstance(value, bool):
        return _text("yes" if value else "no")
    return _text(str(value))


def emit(
    result: Any,
    *,
    as_json: bool,
    render: Callable[[Any, Any], None] | None = None,
    title: str | None = None,
    columns: Sequence[str] | None = None,
) -> None:
    """Print ``result``.

    With ``as_json`` the result goes to stdout as one JSON document. Otherwise ``render``
    (called with a Rich console and the result) draws it; without ``render`` a mapping
    becomes a two-column panel and a list of mappings a table of ``columns``.
    """
    if as_json:
        sys.stdout.write(to_json(result) + "\n")
        sys.stdout.flush()
        return
    console = _console()
    if render is not None:
        render(console, result)
    elif isinstance(result, Mapping):
        print_record(console, result, title=title)
    else:
        print_rows(console, list(result), columns=columns, title=title)


def print_record(console, record: Mapping[str, Any], *, title: str | None = None) -> None:
    from rich.table import Table

    table = Table(show_header=False, title=_text(title), title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in record.items():
        table.add_row(_cell(key), _cell(value))
    console.print(table)


def print_rows(
    console,
    rows: Iterable[Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    from rich.table import Table

    rows = list(rows)
    if not rows:
        console.print("(none)")
        return
    columns = list(columns or rows[0].keys())
    table = Table(title=_text(title), title_justify="left")
    for column in columns:
        table.add_column(_text(column))
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def os_error_outcome(error: OSError) -> tuple[str, str, int]:
    """(code, message, exit code) for an OSError that reached the top: a socket cut or timed out
    is a service out of reach (69); any other is a file or stream that cannot be written or read
    (2): a full disk, stdout on /dev/full, a rejects file on a failing device. What the command
    committed before it stays committed, and the message says so."""
    reason = error.strerror or str(error) or type(error).__name__
    if isinstance(error, ConnectionError | TimeoutError):
        return "unavailable", f"a service could not be reached: {reason}", 69
    target = "the output" if error.filename is None else repr(str(error.filename))
    return (
        "io_error",
        f"cannot write or read {target}: {reason}; what was committed before it stays committed",
        2,
    )


def report_error(error: Exception, *, as_json: bool, code: str, message: str) -> None:
    """Write an error to stderr: one line, or a JSON document with --json. Whatever the message
    quotes (a user's input, a driver's text) cannot break the line or forge another one."""
    from credex.errors import one_line

    message = one_line(message)
    text = to_json({"error": {"code": code, "message": message}}) if as_json else f"error: {message}"
    with contextlib.suppress(OSError):  # stderr itself cannot be written: the exit code is what is left
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def warn(message: str) -> None:
    """A warning on stderr: one line ``warning: <message>``, whatever the message quotes (a
    carrier's words), with secrets hidden; stdout stays for the result."""
    from credex.errors import one_line, redact

    with contextlib.suppress(OSError):  # stderr cannot be written: the result is what is left
        sys.stderr.write(f"warning: {redact(one_line(message))}\n")
        sys.stderr.flush()


LOG_FORMATS = ("text", "json")


class JsonLogFormatter:
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``event`` and the ids the call passed
    in ``extra`` (``redemption_id``, ``message_id``, ``express_no``…), for log shippers."""

    def __init__(self) -> None:
        import logging

        # A record's own machinery (its attributes on a bare record), not ids the line is about.
        self._machinery = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record) -> str:
        import time

        from credex.errors import redact

        moment = time.gmtime(record.created)
        document = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", moment) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in self._machinery and not key.startswith("_"):
                document[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            document["error"] = redact(f"{type(error).__name__}: {error}")
        return json.dumps(document, default=str, ensure_ascii=False)


def log_to_stderr(verbose: bool = False, format: str = "text") -> None:
    """Workers' logs: one line per event on stderr (stdout stays for the result); ``format``
    "text" reads well in a terminal, "json" is one object per line."""
    import logging
    import time

    handler = logging.StreamHandler(sys.stderr)
    if format == "json":
        handler.setFormatter(JsonLogFormatter())  # type: ignore[arg-type]
    else:
        formatter = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger("credex")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
