"""credex db: the schema."""

from __future__ import annotations

import typer

from credex.commands._common import JsonOption, settings
from credex.output import emit

app = typer.Typer(help="Create and migrate the database schema.", no_args_is_help=True)


@app.command("upgrade")
def upgrade(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Migrate the schema to the newest revision (idempotent)."""
    from credex.db.engine import display_url
    from credex.db.engine import upgrade as upgrade_database

    s = settings(ctx)
    urls = [s.database_url]
    if s.warehouse_database_url and s.warehouse_database_url != s.database_url:
        urls.append(s.warehouse_database_url)
    results = []
    for url in urls:
        before, after = upgrade_database(url)
        results.append({"database": display_url(url), "from": before, "to": after})
    if as_json:
        emit(results if len(results) > 1 else results[0], as_json=True)
        return
    for result in results:
        change = "already at" if result["from"] == result["to"] else f"{result['from'] or 'empty'} ->"
        typer.echo(f"{result['database']}: {change} {result['to']}")
