"""credex track: where is my gift? Asks the carrier about a redemption's parcel or an express
number; `track sync` (cron) records the delivery status of every redemption on its way."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperGroup

from credex.commands._common import (
    JsonOption,
    LimitOption,
    OperatorOption,
    operator,
    points_session,
    settings,
)
from credex.output import emit


class _TrackGroup(TyperGroup):
    """`track REDEMPTION_ID` and `track --express-no NO` stay as they were: anything that is not a
    subcommand (``sync``) goes to the parcel look-up."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["parcel", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_TrackGroup,
    help="Where is a gift? `credex track REDEMPTION_ID`, `credex track --express-no NO`, "
    "or `credex track sync` to record the delivery status of every redemption on its way.",
    no_args_is_help=False,
)

STATUS_STYLES = {
    "delivered": "bold green",
    "out_for_delivery": "bold yellow",
    "available_for_pickup": "bold yellow",
    "failed_attempt": "bold red",
    "exception": "bold red",
    "expired": "bold red",
}


def _render(console, result: dict) -> None:
    """A header (number, carrier, status), then a timeline of checkpoints, newest first."""
    from datetime import datetime

    from rich.text import Text

    header = Text()
    header.append(result["express_no"], style="bold")
    header.append(f"  carrier {result['carrier']}  ")
    header.append(result["status"], style=STATUS_STYLES.get(result["status"], "bold"))
    if result.get("redemption_id") is not None:
        header.append(f"  (redemption {result['redemption_id']})")
    console.print(header)
    if result.get("stored"):
        when = result["checked_at"].isoformat(timespec="seconds")
        console.print(f"  (as the carrier said at {when}; --fresh asks again)")
        return
    points = result["checkpoints"]
    if not points:
        console.print("  (no checkpoints yet)")
        return
    times = [datetime.fromisoformat(point["time"]).isoformat(timespec="seconds") for point in points]
    status_width = max(len(point["status"]) for point in points)
    message_width = max(len(point["message"]) for point in points)
    for index, (when, point) in enumerate(zip(times, points, strict=True)):
        if index:
            console.print("  │")
        line = Text("  ● " if index == 0 else "  ○ ")
        line.append(when + "  ")
        line.append(point["status"].ljust(status_width), style=STATUS_STYLES.get(point["status"], ""))
        line.append("  " + point["message"].ljust(message_width))
        line.append("  " + (point["location"] or ""))
        line.rstrip()
        console.print(line)


@app.command("parcel", hidden=True)
def track(
    ctx: typer.Context,
    redemption_id: Annotated[
        str | None,
        typer.Argument(help="The redemption whose gift to follow.", show_default=False),
    ] = None,
    express_no: Annotated[
        str | None,
        typer.Option(
            "--express-no",
            help="Follow a parcel by its express (tracking) number instead.",
            show_default=False,
        ),
    ] = None,
    carrier: Annotated[
        str | None,
        typer.Option(
            "--carrier",
            help="The carrier's code with --express-no (default: CREDEX_LOGISTICS_CARRIER, else sandbox).",
            show_default=False,
        ),
    ] = None,
    phone: Annotated[
        str | None,
        typer.Option(
            "--phone",
            help="A phone number of the parcel, which some carriers require (kuaidi100).",
            show_default=False,
        ),
    ] = None,
    fresh: Annotated[
        bool,
        typer.Option("--fresh", help="Ask the carrier even when the stored answer is fresh."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Where is a gift? The carrier's status and checkpoints, newest first.

    Give a REDEMPTION_ID, or --express-no NO [--carrier CODE]. A redemption checked within
    CREDEX_TRACK_MIN_INTERVAL is answered from the stored status (the carrier may lock a number
    asked about too often), unless --fresh; so is an express number of a known redemption.
    """
    from credex.errors import InvalidInput
    from credex.logistics import carrier_client
    from credex.logistics.tracking import (
        Parcel,
        check_carrier_code,
        check_express_no,
        parcel_of_redemption,
        track_parcel,
    )
    from credex.points.deliveries import stored_tracking

    if redemption_id is None and express_no is None:
        raise InvalidInput("say which parcel: give a REDEMPTION_ID or --express-no NO")
    if redemption_id is not None and express_no is not None:
        raise InvalidInput("give a REDEMPTION_ID or --express-no NO, not both")
    interval = _min_interval(ctx)
    if redemption_id is not None:
        if carrier is not None:
            raise InvalidInput("--carrier goes with --express-no: a redemption knows its carrier")
        with points_session(ctx) as session:
            parcel = parcel_of_redemption(session, redemption_id)
            stored = None if fresh else stored_tracking(session, parcel.redemption_id, interval=interval)
        if stored is not None:
            emit(stored, as_json=as_json, render=_render)
            return
    else:
        parcel = Parcel(
            express_no=check_express_no(express_no),
            carrier=None if carrier is None else check_carrier_code(carrier),
        )
    with carrier_client(settings(ctx)) as client:
        if parcel.redemption_id is None:
            # A known redemption's number is as locked by the carrier whichever way it is asked
            # about: answered from its stored answer as by REDEMPTION_ID, and the answer kept.
            parcel, stored = _known_parcel(ctx, parcel, client.default_carrier, None if fresh else interval)
            if stored is not None:
                emit(stored, as_json=as_json, render=_render)
                return
        result = track_parcel(client, parcel, phone=phone)
    if parcel.redemption_id is not None:
        from credex.output import warn
        from credex.points.deliveries import store_tracking

        kept_final = store_tracking(
            settings(ctx).database_url, parcel.redemption_id, result["status"], result["checkpoints"]
        )
        if kept_final is not None:
            warn(kept_final)  # the carrier's answer is shown as it came; the record keeps the final one
    emit(result, as_json=as_json, render=_render)


def _known_parcel(ctx: typer.Context, parcel, default_carrier: str | None, interval):
    """``parcel`` (an express number, and the carrier the client will ask: ``default_carrier``
    without --carrier) with the redemption it belongs to, when the points database knows one, and
    that redemption's stored answer while younger than ``interval`` (None: ask the carrier). A
    SQLite file that does not exist knows none, and is not created for the look-up."""
    from credex.db.urls import sqlite_file
    from credex.logistics.tracking import Parcel
    from credex.points.deliveries import redemption_of_parcel, stored_tracking

    carrier = parcel.carrier or default_carrier
    path = sqlite_file(settings(ctx).database_url)
    if carrier is None or (path is not None and not path.exists()):
        return parcel, None
    with points_session(ctx) as session:
        known = redemption_of_parcel(session, carrier=carrier, express_no=parcel.express_no)
        if known is None:
            return parcel, None
        stored = None if interval is None else stored_tracking(session, known, interval=interval)
    return Parcel(express_no=parcel.express_no, carrier=carrier, redemption_id=known), stored


def _min_interval(ctx: typer.Context):
    from credex.points.rules import parse_duration

    return parse_duration(settings(ctx).track_min_interval, "CREDEX_TRACK_MIN_INTERVAL")


@app.command("sync")
def sync(
    ctx: typer.Context,
    limit: LimitOption = 500,
    operator_: OperatorOption = None,
    as_json: JsonOption = False,
) -> None:
    """(cron) Ask the carrier about redemptions on their way, each at most once per
    CREDEX_TRACK_MIN_INTERVAL (default 30m): delivered ones become `delivered`, returned ones
    `returned` and refunded. Safe to run beside itself and the workers.

    A parcel the carrier refuses to answer about (an unknown number) counts as failed, with a
    warning on stderr. A refused API key stops the run (exit 1): the parcels not answered are
    asked about by the next run, once the key is fixed."""
    from credex.db.engine import ensure_schema
    from credex.logistics import carrier_client
    from credex.output import warn
    from credex.points.deliveries import sync_deliveries

    interval = _min_interval(ctx)
    who = operator(ctx, operator_)
    # Unreachable or not migrated: said before the carrier is set up.
    ensure_schema(settings(ctx).database_url)
    with carrier_client(settings(ctx)) as client:
        report = sync_deliveries(
            settings(ctx).database_url, client, limit=limit, interval=interval, operator=who, warn=warn
        )
    emit(report.to_json(), as_json=as_json)
