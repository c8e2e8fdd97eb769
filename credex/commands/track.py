"""credex track: placeholder until the carriers are built."""

import typer


def track(ctx: typer.Context) -> None:
    """Where is a gift? (not built yet)"""
    raise typer.Exit(1)
