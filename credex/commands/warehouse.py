"""credex warehouse: placeholder until the group is built."""

import typer

app = typer.Typer(help="warehouse commands.", no_args_is_help=True)
