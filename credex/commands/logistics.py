"""credex logistics: the carrier side's tools."""

from __future__ import annotations

from typing import Annotated

import typer

from credex.commands._common import settings

app = typer.Typer(help="The carrier side: a local sandbox carrier.", no_args_is_help=True)

_DAY, _YEAR = 24 * 3600, 365 * 24 * 3600  # bounds that keep the parcels' clock arithmetic finite


@app.command("sandbox")
def sandbox(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port; 0 picks a free one.")] = 8700,
    stage_seconds: Annotated[
        float,
        typer.Option(
            "--stage-seconds",
            min=0.001,
            max=_YEAR,
            help="Seconds between stages: info_received, in_transit, out_for_delivery, delivered "
            "(a refused parcel: exception, then returned).",
        ),
    ] = 60.0,
    faults: Annotated[
        str,
        typer.Option(
            "--faults",
            help="Faults for the first requests, in order, comma-separated: 503, 429, slow, drop "
            "(retried by clients), 409, 422 (final refusals).",
            show_default=False,
        ),
    ] = "",
    unavailable_share: Annotated[
        float, typer.Option("--unavailable-share", min=0.0, max=1.0, help="Share of requests answered 503.")
    ] = 0.0,
    throttle_share: Annotated[
        float,
        typer.Option("--throttle-share", min=0.0, max=1.0, help="Share answered 429 with Retry-After."),
    ] = 0.0,
    slow_share: Annotated[
        float, typer.Option("--slow-share", min=0.0, max=1.0, help="Share answered after --slow-seconds.")
    ] = 0.0,
    drop_share: Annotated[
        float,
        typer.Option("--drop-share", min=0.0, max=1.0, help="Share whose connection is dropped unanswered."),
    ] = 0.0,
    conflict_share: Annotated[
        float,
        typer.Option("--conflict-share", min=0.0, max=1.0, help="Share answered 409 (final: conflict)."),
    ] = 0.0,
    invalid_share: Annotated[
        float,
        typer.Option(
            "--invalid-share", min=0.0, max=1.0, help="Share answered 422 (final: invalid_shipment)."
        ),
    ] = 0.0,
    refuse_share: Annotated[
        float,
        typer.Option(
            "--refuse-share",
            min=0.0,
            max=1.0,
            help="Share of parcels the recipient refuses: they end exception, then returned.",
        ),
    ] = 0.0,
    numbering: Annotated[
        str,
        typer.Option(
            "--numbering",
            help="unique: tracking numbers never seen before, across restarts too; "
            "sequential: SIM0000000001, SIM0000000002… from 1 on every start.",
        ),
    ] = "unique",
    retry_after: Annotated[
        int, typer.Option("--retry-after", min=0, max=_DAY, help="Seconds a 429 asks the client to wait.")
    ] = 1,
    slow_seconds: Annotated[
        float, typer.Option("--slow-seconds", min=0.0, max=_DAY, help="How long a slow answer takes.")
    ] = 5.0,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Seed of the random faults and refusals, for repeatable runs (not of the numbers).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """A local carrier that speaks the generic contract (parcels in memory), for demos and tests.

    Prints `listening on URL` first; point credex at it with CREDEX_LOGISTICS_URL=URL. When
    CREDEX_LOGISTICS_API_KEY is set, requests must carry it as a bearer key. Admin endpoints under
    /_sandbox (shipments, refuse, requests, clock) are described in docs/logistics.md. Stop it
    with Ctrl-C.
    """
    from credex.errors import InvalidInput, printable
    from credex.logistics.sandbox import FAULTS, NUMBERINGS, SandboxOptions
    from credex.logistics.sandbox_http import serve

    script = tuple(fault.strip() for fault in faults.split(",") if fault.strip())
    unknown = [fault for fault in script if fault not in FAULTS]
    if unknown:
        raise InvalidInput(f"unknown fault {printable(unknown[0])} in --faults: use {', '.join(FAULTS)}")
    if unavailable_share + throttle_share + slow_share + drop_share + conflict_share + invalid_share > 1:
        raise InvalidInput("the fault shares add up to more than 1")
    if numbering not in NUMBERINGS:
        raise InvalidInput(f"unknown --numbering {printable(numbering)}: use {' or '.join(NUMBERINGS)}")
    key = settings(ctx).logistics_api_key
    options = SandboxOptions(
        stage_seconds=stage_seconds,
        faults=script,
        unavailable_share=unavailable_share,
        throttle_share=throttle_share,
        slow_share=slow_share,
        drop_share=drop_share,
        conflict_share=conflict_share,
        invalid_share=invalid_share,
        retry_after=retry_after,
        slow_seconds=slow_seconds,
        refuse_share=refuse_share,
        numbering=numbering,
        seed=seed,
        api_key=key.get_secret_value() if key is not None and key.get_secret_value() else None,
    )
    try:
        serve(host, port, options)
    except OSError as error:
        raise InvalidInput(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
