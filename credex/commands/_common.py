"""Options shared by every command group, and the per-invocation context."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # imported lazily: start-up time matters
    from credex.config import Settings

JSON_FLAG = "credex.json"


def _remember_json(ctx: typer.Context, value: bool) -> bool:
    # The error handler in cli.py reads this to answer errors in JSON too.
    if value:
        ctx.meta[JSON_FLAG] = True
    return value


JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON document on stdout.", callback=_remember_json),
]
OperatorOption = Annotated[
    str | None,
    typer.Option(
        "--operator",
        help="Who makes this change (default: CREDEX_OPERATOR, else the login name).",
        show_default=False,
    ),
]


def whole(minimum: int, maximum: int):
    """A parser for whole-number options by the input rules (ASCII digits: no ``1_000``, no
    full-width digits), within [minimum, maximum]; a bad value is a usage error (exit 2)."""

    def parse(value: str | int) -> int:
        from credex.points.rules import integer_problem

        number = integer_problem(value, "N", minimum=minimum, maximum=maximum)
        if isinstance(number, str):
            raise typer.BadParameter(number)
        return number

    return parse


LimitOption = Annotated[
    int, typer.Option("--limit", parser=whole(1, 1_000_000), help="Show at most N rows (1 to 1000000).")
]


def finite(value: float | None) -> float | None:
    """A callback for float options: click takes ``nan`` and ``inf`` for numbers, credex does not."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number of seconds")
    return value


@dataclass
class AppState:
    """What the root callback learned: global options, resolved lazily."""

    database_url: str | None = None
    operator: str | None = None
    _settings: Any = field(default=None, repr=False)

    def settings(self) -> Settings:
        if self._settings is None:
            from credex.config import get_settings

            self._settings = get_settings(database_url=self.database_url, operator=self.operator)
        return self._settings


def state(ctx: typer.Context) -> AppState:
    root = ctx.find_root()
    if not isinstance(root.obj, AppState):
        root.obj = AppState()
    return root.obj


def settings(ctx: typer.Context) -> Settings:
    return state(ctx).settings()


def operator(ctx: typer.Context, given: str | None) -> str:
    """Who makes the change, checked like any identifier (it is written on every ledger entry)."""
    from credex.points.rules import check_operator

    return check_operator(given if given is not None else settings(ctx).operator)


def points_session(ctx: typer.Context, *, write: bool = False):
    """A session on the points database (created/checked on first use)."""
    from credex.db.engine import session_for

    return session_for(settings(ctx).database_url, write=write)


def warehouse_session(ctx: typer.Context, *, write: bool = False):
    from credex.db.engine import session_for

    s = settings(ctx)
    return session_for(s.warehouse_database_url or s.database_url, write=write)


# --- the long-running workers (relay run, warehouse run): cli.md "Watching the workers" -------

MetricsPortOption = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        envvar="CREDEX_METRICS_PORT",
        min=0,
        max=65535,
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port, logged).",
        show_default=False,
    ),
]
MetricsHostOption = Annotated[
    str,
    typer.Option(
        "--metrics-host", envvar="CREDEX_METRICS_HOST", help="The address the metrics are served on."
    ),
]


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def _remember_json_logs(ctx: typer.Context, value: LogFormat) -> LogFormat:
    # JSON log lines: the final error line, if any, is a JSON object too, like every other line.
    if value is LogFormat.json:
        ctx.meta[JSON_FLAG] = True
    return value


LogFormatOption = Annotated[
    LogFormat,
    typer.Option(
        "--log-format",
        envvar="CREDEX_LOG_FORMAT",
        help="Log lines on stderr: readable text, or one JSON object per line (the final error too).",
        callback=_remember_json_logs,
    ),
]


def serve_metrics(registry, port: int | None, host: str):
    """Serve ``registry`` when a port is given, saying where in the log; the server, or None."""
    if port is None:
        return None
    import logging

    from credex.metrics import serve

    server = serve(registry, port=port, host=host)
    logging.getLogger("credex.metrics").info("serving metrics at %s", server.url, extra={"url": server.url})
    return server
