"""The root of the command line: global options, the command groups, and the one place
that turns errors into exit codes and a line on stderr."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from credex.commands import (
    account,
    audit,
    award,
    catalog,
    db,
    logistics,
    redeem,
    relay,
    track,
    warehouse,
)
from credex.commands._common import JSON_FLAG, AppState
from credex.errors import CredexError, redact

INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE


class CredexGroup(TyperGroup):
    """Maps every failure to an exit code and one line on stderr; never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """As click's main, but usage errors (a missing argument, an unknown option, a bad value
        click refused) are answered in JSON when ``--json`` is on the command line: a script
        that asked for JSON gets JSON whatever went wrong."""
        import sys

        from typer._click.exceptions import BadParameter, UsageError

        args = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as error:
            if not standalone_mode:
                raise
            if "--json" not in _options(args):
                error.show()
                sys.exit(error.exit_code)
            code = "invalid_input" if isinstance(error, BadParameter) else "usage"
            where = error.ctx.command_path if error.ctx is not None else "credex"
            message = f"{error.format_message().rstrip('.')} (see `{where} --help`)"
            from credex.output import report_error

            report_error(error, as_json=True, code=code, message=redact(message))
            sys.exit(error.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            sys.stderr.write("error: aborted\n")
            sys.exit(1)
        if not standalone_mode:
            return result
        # Without standalone mode click returns an Exit's code instead of leaving with it.
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):
            raise
        except CredexError as error:
            _report(ctx, error.code, redact(error.message))
            ctx.exit(error.exit_code)
        except BrokenPipeError:
            # The reader went away (`credex relay list | head`): stop quietly, like other tools.
            import os
            import sys

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except KeyboardInterrupt:
            _report(ctx, "interrupted", "interrupted")
            ctx.exit(130)
        except Exception as error:  # a bug: say so in one line, keep secrets out
            from credex.db.engine import translate_db_error

            known = translate_db_error(error)
            if known is not None:
                _report(ctx, known.code, redact(known.message))
                ctx.exit(known.exit_code)
            _report(ctx, "internal", redact(f"internal error ({type(error).__name__}): {error}"))
            ctx.exit(INTERNAL_ERROR_EXIT)


def _options(args: list[str]) -> list[str]:
    """The command line up to ``--`` (after it, ``--json`` would be an argument)."""
    return args[: args.index("--")] if "--" in args else args


def _report(ctx: typer.Context, code: str, message: str) -> None:
    from credex.output import report_error

    report_error(None, as_json=bool(ctx.meta.get(JSON_FLAG)), code=code, message=message)


app = typer.Typer(
    cls=CredexGroup,
    name="credex",
    help="Administer the points program: awards, redemptions, the relay and tracking.",
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: importing rich.markdown costs more than the rest of start-up
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        from credex import __version__

        typer.echo(f"credex {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="Points database (default: CREDEX_DATABASE_URL, else sqlite:///credex.db).",
            show_default=False,
        ),
    ] = None,
    operator: Annotated[
        str | None,
        typer.Option(
            "--operator",
            help="Who makes changes (default: CREDEX_OPERATOR, else the login name).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_show_version, is_eager=True),
    ] = False,
) -> None:
    ctx.obj = AppState(database_url=database_url, operator=operator)


app.add_typer(db.app, name="db")
app.add_typer(catalog.app, name="catalog")
app.add_typer(award.app, name="award")
app.add_typer(account.app, name="account")
app.add_typer(redeem.app, name="redeem")
app.add_typer(relay.app, name="relay")
app.add_typer(warehouse.app, name="warehouse")
app.add_typer(track.app, name="track")
app.add_typer(logistics.app, name="logistics")
app.add_typer(audit.app, name="audit")


def main() -> None:
    app(prog_name="credex")  # also under `python -m credex`: messages name the command people type
