"""credex logistics: placeholder until the group is built."""

import typer

app = typer.Typer(help="logistics commands.", no_args_is_help=True)
