"""credex db: the schema."""

from __future__ import annotations

from typing import Annotated

import typer

from credex.commands._common import JsonOption, settings
from credex.output import emit

app = typer.Typer(help="Create and migrate the database schema.", no_args_is_help=True)


@app.command("upgrade")
def upgrade(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Migrate the schema to the newest revision (idempotent)."""
    from credex.db.engine import upgrade as upgrade_database
    from credex.db.urls import display_url

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


@app.command("roles")
def roles(
    ctx: typer.Context,
    print_sql: Annotated[
        bool, typer.Option("--print-sql", help="Print the statements instead of running them.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Postgres: create or refresh the roles credex_support, credex_relay, credex_warehouse and
    credex_auditor, each with only the privileges its commands need (idempotent)."""
    from sqlalchemy.exc import DBAPIError

    from credex.db.engine import ensure_schema, get_engine
    from credex.db.failures import is_connection_error, unavailable
    from credex.db.roles import ROLES, refresh_roles, roles_sql
    from credex.db.urls import display_url
    from credex.errors import InvalidInput

    s = settings(ctx)
    urls = [s.database_url]
    if s.warehouse_database_url and s.warehouse_database_url != s.database_url:
        urls.append(s.warehouse_database_url)
    if any(get_engine(url).dialect.name != "postgresql" for url in urls):
        raise InvalidInput(
            "`credex db roles` needs PostgreSQL: SQLite has no roles (protect the database file "
            "with its file permissions instead)",
            code="unsupported",
        )
    results = []
    for url in urls:
        engine = ensure_schema(url)
        try:
            with engine.connect() as connection:  # left without a commit, --print-sql changes nothing
                statements = roles_sql(connection) if print_sql else refresh_roles(connection)
                if not print_sql:
                    connection.commit()
        except DBAPIError as error:
            if is_connection_error(error):
                raise unavailable(url, error) from None
            raise
        results.append({"database": display_url(url), "roles": list(ROLES), "sql": statements})
    if as_json:
        emit(results if len(results) > 1 else results[0], as_json=True)
        return
    for result in results:
        if print_sql:
            typer.echo(f"-- {result['database']}")
            typer.echo("".join(f"{statement};\n" for statement in result["sql"]), nl=False)
        else:
            roles_made = ", ".join(result["roles"])
            typer.echo(f"{result['database']}: {roles_made} ({len(result['sql'])} statements)")
