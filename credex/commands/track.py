"""credex track: where is my gift? Asks the carrier about a redemption's parcel or an express number."""

from __future__ import annotations

from typing import Annotated

import typer

from credex.commands._common import JsonOption, points_session, settings
from credex.output import emit

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
    as_json: JsonOption = False,
) -> None:
    """Where is a gift? The carrier's status and checkpoints, newest first.

    Give a REDEMPTION_ID, or --express-no NO [--carrier CODE].
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

    if redemption_id is None and express_no is None:
        raise InvalidInput("say which parcel: give a REDEMPTION_ID or --express-no NO")
    if redemption_id is not None and express_no is not None:
        raise InvalidInput("give a REDEMPTION_ID or --express-no NO, not both")
    if redemption_id is not None:
        if carrier is not None:
            raise InvalidInput("--carrier goes with --express-no: a redemption knows its carrier")
        with points_session(ctx) as session:
            parcel = parcel_of_redemption(session, redemption_id)
    else:
        parcel = Parcel(
            express_no=check_express_no(express_no),
            carrier=None if carrier is None else check_carrier_code(carrier),
        )
    with carrier_client(settings(ctx)) as client:
        result = track_parcel(client, parcel, phone=phone)
    emit(result, as_json=as_json, render=_render)
