"""The root of the command line: global options, the command groups (each imported and built
the first time argv names it), and the one place that turns errors into exit codes and a line
on stderr. ``credex.cli`` is the entry point: the read-only look-ups that
``credex.commands.quick`` answers never import this module."""

from __future__ import annotations

from gettext import gettext as _
from typing import Annotated

import typer
from typer import _click as click
from typer.core import TyperCommand, TyperGroup
from typer.exceptions import TyperException

from credex.commands._common import JSON_FLAG, AppState
from credex.errors import CredexError, redact

INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE

# The command groups in the order `credex --help` lists them: the module whose ``app`` is the
# group, and its one-line help, which `--help` shows without importing the module (a test
# checks it against the module's own).
GROUPS = {
    "db": ("credex.commands.db", "Create and migrate the database schema."),
    "catalog": ("credex.commands.catalog", "Keep the gift catalog."),
    "award": ("credex.commands.award", "Award points (each award is idempotent on its reference)."),
    "account": ("credex.commands.account", "Look at a shopper's points."),
    "redeem": ("credex.commands.redeem", "Redeem points for gifts and look redemptions up."),
    "relay": ("credex.commands.relay", "The relay: outbox to RabbitMQ, until the warehouse confirms."),
    "warehouse": ("credex.commands.warehouse", "The warehouse: shipment requests and waybills."),
    "track": (
        "credex.commands.track",
        "Where is a gift? `credex track REDEMPTION_ID`, `credex track --express-no NO`, "
        "or `credex track sync` to record the delivery status of every redemption on its way.",
    ),
    "logistics": ("credex.commands.logistics", "The carrier side: a local sandbox carrier."),
    "audit": ("credex.commands.audit", "Check every rule of the points program across both databases."),
}
_built: dict[str, click.Command] = {}  # the groups built in this process, by name


class _Unbuilt(TyperCommand):
    """A group's name and help, standing in for it until argv names it."""

    def __init__(self, name: str, module: str, help: str) -> None:
        super().__init__(name=name, help=help)
        self.module = module


def build_group(name: str) -> click.Command:
    """Import the group's module and build its click group, as ``add_typer`` would have."""
    group = _built.get(name)
    if group is None:
        import importlib

        from typer.main import get_group_from_info
        from typer.models import TyperInfo

        module = importlib.import_module(GROUPS[name][0])
        group = get_group_from_info(
            TyperInfo(module.app, name=name, options_metavar="[OPTIONS]"),
            pretty_exceptions_short=app.pretty_exceptions_short,
            suggest_commands=app.suggest_commands,
            rich_markup_mode=app.rich_markup_mode,
        )
        _built[name] = group
    return group


class CredexGroup(TyperGroup):
    """Maps every failure to an exit code and one line on stderr; never a traceback. Its command
    groups are built when argv names them (``GROUPS``)."""

    def __init__(self, **attrs) -> None:
        super().__init__(**attrs)
        for name, (module, help) in GROUPS.items():
            built = _built.get(name)
            self.commands.setdefault(name, built if built is not None else _Unbuilt(name, module, help))

    def get_command(self, ctx, cmd_name: str):
        command = self.commands.get(cmd_name)
        if isinstance(command, _Unbuilt):
            command = self.commands[cmd_name] = build_group(cmd_name)
        return command

    def format_commands(self, ctx, formatter) -> None:
        """As Typer's, from each group's name and help: listing the groups builds none of them."""
        commands = [(name, command) for name, command in self.commands.items() if not command.hidden]
        if commands:
            limit = formatter.width - 6 - max(len(name) for name, _command in commands)
            rows = [(name, command.get_short_help_str(limit)) for name, command in commands]
            with formatter.section(_("Commands")):
                formatter.write_dl(rows)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, quick=True, **extra):
        """As click's main, but usage errors (a missing argument, an unknown option, a bad value
        click refused) are answered in JSON when ``--json`` is on the command line: a script
        that asked for JSON gets JSON whatever went wrong. The read-only look-ups
        ``credex.commands.quick`` answers on its own are answered there (``quick=False``: the
        caller already tried)."""
        import sys

        from typer._click.exceptions import BadParameter, UsageError

        args = list(sys.argv[1:] if args is None else args)
        if quick and standalone_mode:
            from credex.commands.quick import answer

            code = answer(args)
            if code is not None:
                sys.exit(code)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as error:
            if not standalone_mode:
                raise
            if "--json" not in _options(args, error.ctx, self):
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
        except OSError as error:  # a file, a stream or a socket no layer above turned into a CredexError
            from credex.output import os_error_outcome

            code, message, exit_code = os_error_outcome(error)
            _report(ctx, code, redact(message))
            ctx.exit(exit_code)
        except KeyboardInterrupt:
            _report(ctx, "interrupted", "interrupted")
            ctx.exit(130)
        except Exception as error:  # a bug: say so in one line, keep secrets out
            from credex.db.failures import translate_db_error

            known = translate_db_error(error)
            if known is not None:
                _report(ctx, known.code, redact(known.message))
                ctx.exit(known.exit_code)
            _report(ctx, "internal", redact(f"internal error ({type(error).__name__}): {error}"))
            ctx.exit(INTERNAL_ERROR_EXIT)


def _options(args: list[str], ctx, root) -> list[str]:
    """The words of the command line that are options or arguments before the ``--`` that ends
    the options (after it, ``--json`` would be an argument). The value of an option that takes
    one is skipped, whatever it looks like: in ``--reason -- --json`` the ``--`` is the reason."""
    commands = [root]
    while ctx is not None:
        commands.append(ctx.command)
        ctx = ctx.parent
    takes_value = {
        name
        for command in commands
        for param in command.params
        if param.param_type_name == "option" and not param.is_flag and not param.count
        for name in param.opts
    }
    found, words = [], iter(args)
    for word in words:
        if word == "--":
            break
        found.append(word)
        if word in takes_value:
            next(words, None)
    return found


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
