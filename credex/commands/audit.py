"""credex audit: check that points, outbox and warehouse agree (read-only)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from credex.commands._common import JsonOption, settings

app = typer.Typer(help="Check every rule of the points program across both databases.", no_args_is_help=True)

SHOWN = 200  # violations listed in the table; --json lists every one
SPOOLED_BYTES = 8 << 20  # a --json report larger than this waits on disk, not in memory


@app.command("verify")
def verify(
    ctx: typer.Context,
    warehouse_database_url: Annotated[
        str | None,
        typer.Option(
            "--warehouse-database-url",
            help="Warehouse database (default: CREDEX_WAREHOUSE_DATABASE_URL, else the points database).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Read both databases in one snapshot each and report every broken rule: exit 0 when
    everything holds, 1 otherwise. Changes nothing."""
    from credex.audit import Audit

    s = settings(ctx)
    audit = Audit(s.database_url, warehouse_database_url or s.warehouse_database_url)
    found = _print_json(audit) if as_json else _print_table(audit)
    if found:
        raise typer.Exit(1)


def _print_json(audit) -> int:
    """The report as one JSON document. The violations stream into a spooled file (memory stays
    flat however many there are) and reach stdout only once the audit has finished: a database
    that fails halfway leaves stdout empty and the error on stderr, never half a document."""
    import shutil
    import tempfile

    from credex.output import to_json

    found = 0
    with tempfile.SpooledTemporaryFile(max_size=SPOOLED_BYTES, mode="w+", encoding="utf-8") as spool:
        spool.write('{"violations": [')
        for violation in audit.violations():
            spool.write((", " if found else "") + to_json(violation.to_json()))
            found += 1
        # "skipped" stays for the scripts that read it: the audit reads only the newest schema,
        # where a missing table is a violation, so no check is ever skipped now.
        spool.write(f'], "checked": {to_json(audit.checked)}, "skipped": []}}\n')
        spool.seek(0)
        shutil.copyfileobj(spool, sys.stdout)
    sys.stdout.flush()
    return found


def _print_table(audit) -> int:
    """The first violations as a table, a count per check, and what was checked."""
    from collections import Counter

    from credex.output import emit

    shown, per_check = [], Counter()
    for violation in audit.violations():
        per_check[violation.check] += 1
        if len(shown) < SHOWN:
            shown.append({k: _text(v) for k, v in violation.to_json().items()})
    emit(
        (shown, per_check), as_json=False, render=lambda console, _: _render(console, audit, shown, per_check)
    )
    return sum(per_check.values())


def _render(console, audit, shown: list[dict], per_check) -> None:
    from credex.output import print_record, print_rows

    found = sum(per_check.values())
    if found:
        print_rows(console, shown, title=f"{found} violation(s)")
        if found > SHOWN:
            console.print(f"… and {found - SHOWN} more: --json lists every one")
        print_record(console, dict(per_check.most_common()), title="by check")
    else:
        console.print("every rule holds")
    print_record(console, audit.checked, title="checked")


def _text(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return "-" if value is None else str(value)
