"""credex award bulk: many grants from a CSV or JSON lines file (registered in award.py)."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from credex import collect_for_a_long_run
from credex.commands._common import (
    JsonOption,
    OperatorOption,
    operator,
    points_session,
    settings,
    whole,
)
from credex.errors import InvalidInput
from credex.output import emit

REJECTS_SHOWN = 20  # on stderr; the rejects file keeps them all


class FileFormat(StrEnum):
    csv = "csv"
    jsonl = "jsonl"


def _open_input(file: str):
    """The binary stream to read, its name for messages, its size (None: unknown)."""
    import os

    if file == "-":
        return sys.stdin.buffer, "stdin", None
    try:
        stream = open(file, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as error:
        raise InvalidInput(f"cannot read {file}: {error.strerror or error}") from None
    status = os.fstat(stream.fileno())
    return stream, file, status.st_size if status.st_size > 0 else None


def _rows_after(file: str, format_: str):
    """A way to read the file's rows after a line again, or None when it cannot be read twice."""
    from credex.points.bulk_files import open_grants

    if file == "-" or not os.path.isfile(file):
        return None

    def rows_after(line: int):
        with open(file, "rb") as stream:
            for row in open_grants(stream, name=file, format=format_):
                if row.line > line:
                    yield row

    return rows_after


class _Reporter:
    """Rejected rows to the rejects file and (the first few) to stderr; a progress bar on
    stderr when it is a terminal."""

    def __init__(self, reader, rejects, rejects_path: Path | None) -> None:
        self.reader, self.rejects, self.rejects_path = reader, rejects, rejects_path
        self.shown = 0
        self.progress = None
        self.task = None
        if sys.stderr.isatty():
            self._start_progress()

    def _start_progress(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[rows]:>12,} rows  {task.fields[rate]:>9,.0f} rows/s"),
            TimeRemainingColumn() if self.reader.size else TimeElapsedColumn(),
        ]
        self.progress = Progress(*columns, console=Console(stderr=True), transient=False)
        self.progress.start()
        self.task = self.progress.add_task("granting", total=self.reader.size, rows=0, rate=0.0)

    def say(self, text: str) -> None:
        from credex.errors import one_line

        text = one_line(text)  # a row's text cannot break the line or forge another one
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            sys.stderr.write(text + "\n")

    def rejected(self, row) -> None:
        if self.rejects is not None:
            self.rejects.write(row)
        if self.shown < REJECTS_SHOWN:
            self.shown += 1
            self.say(f"line {row.line}: {row.reason}")

    def batch(self, report) -> None:
        if self.progress is None:
            return
        task = self.progress.tasks[0]
        elapsed = task.elapsed or 0.0
        done = self.reader.bytes_read if self.reader.size else report.rows
        self.progress.update(
            self.task,
            completed=done or 0,
            rows=report.rows,
            rate=report.rows / elapsed if elapsed > 0 else 0.0,
        )

    def finish(self, report) -> None:
        if self.progress is not None:
            if self.reader.size:
                self.progress.update(self.task, completed=self.reader.size)
            self.progress.stop()
        hidden = report.rejected - self.shown
        if hidden > 0:
            where = f"see {self.rejects_path}" if self.rejects_path else "use --rejects FILE to keep them all"
            self.say(f"… and {hidden} more rejected ({where})")


def _check_rejects_target(rejects: Path, file: str, database_url: str) -> None:
    """Refuse a rejects file that would overwrite the file being read or the SQLite database
    (or its journal): opening it for writing empties it before the first row is read."""
    guarded = {} if file == "-" else {"the file being read": [Path(file)]}
    from credex.db.urls import sqlite_file

    database = sqlite_file(database_url)  # a URL that is none: exit 2, as later
    if database is not None:
        guarded["the database"] = [Path(f"{database}{suffix}") for suffix in ("", "-wal", "-shm", "-journal")]
    for what, paths in guarded.items():
        for path in paths:
            if _same_file(rejects, path):
                raise InvalidInput(f"--rejects must not be {what} ({path})")


def _same_file(one: Path, other: Path) -> bool:
    try:
        return os.path.samefile(one, other)  # links and other spellings of one file included
    except OSError:  # one of them does not exist (yet)
        return one.resolve() == other.resolve()


def bulk(
    ctx: typer.Context,
    file: Annotated[
        str,
        typer.Argument(
            metavar="FILE|-",
            help="CSV with a header user_id,points,ref[,reason], or JSON lines; - reads stdin.",
        ),
    ],
    format_: Annotated[
        FileFormat | None,
        typer.Option(
            "--format",
            help="csv or jsonl (default: from the file name, else jsonl when the file starts with '{').",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check every row and report; write nothing.")
    ] = False,
    rejects: Annotated[
        Path | None,
        typer.Option(
            "--rejects",
            help="Write each rejected row here as it was, with its line number and the reason.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            parser=whole(1, 100_000),
            help="Rows per transaction (a killed run keeps whole batches).",
        ),
    ] = 5000,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            parser=whole(1, 16),
            help="Postgres: processes writing batches at once, committed in file order (SQLite: one).",
        ),
    ] = 2,
    operator_: OperatorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Grant points from a file, each row like `award grant --ref`: idempotent on its ref, so a
    file can be run again after a failure. Exit 3 when some rows were rejected."""
    from credex.points.bulk import grant_bulk, summary
    from credex.points.bulk_files import UnreadableFile, guess_format, open_grants
    from credex.points.bulk_rejects import RejectsFile

    expiry_days = settings(ctx).expiry_days
    stream, name, size = _open_input(file)
    rejects_out = None
    try:
        reader = open_grants(
            stream, name=name, format=guess_format(file, format_ and format_.value), size=size
        )
        if rejects is not None:
            _check_rejects_target(rejects, file, settings(ctx).database_url)
            try:
                rejects_out = open(rejects, "w", encoding="utf-8", newline="")  # noqa: SIM115
            except OSError as error:
                raise InvalidInput(f"cannot write {rejects}: {error.strerror or error}") from None
        reporter = _Reporter(reader, RejectsFile(rejects_out, reader) if rejects_out else None, rejects)
        try:
            with points_session(ctx, write=not dry_run) as session:
                collect_for_a_long_run()
                report = grant_bulk(
                    session,
                    reader,
                    operator=operator(ctx, operator_),
                    expiry_days=expiry_days,
                    dry_run=dry_run,
                    batch_size=batch_size,
                    jobs=jobs,
                    on_rejected=reporter.rejected,
                    on_batch=reporter.batch,
                    rows_after=_rows_after(file, reader.format),
                )
        except UnreadableFile as error:
            done = getattr(error, "report", None)
            if done is not None:
                reporter.finish(done)
                if done.rows:
                    wrote = "would be applied" if dry_run else "applied"
                    raise InvalidInput(
                        f"{error.message}; {_rows_before(done.rows)} ({done.applied} {wrote}, "
                        f"{done.duplicates} duplicates, {done.rejected} rejected): fix the line and run the "
                        "file again, applied rows then count as duplicates"
                    ) from None
            raise
        reporter.finish(report)
    finally:
        if rejects_out is not None:
            rejects_out.close()
        if stream is not sys.stdin.buffer:
            stream.close()

    result = summary(report, rejects_file=str(rejects) if rejects else None)
    emit(result, as_json=as_json, render=_render_summary(name))
    if report.rejected:
        raise typer.Exit(3)


def _render_summary(name: str):
    def render(console, result: dict) -> None:
        from credex.output import print_record

        title = f"bulk grant from {name}" + (" (dry run: nothing written)" if result["dry_run"] else "")
        console.print(title, markup=False, highlight=False, soft_wrap=True)
        print_record(console, {k: v for k, v in result.items() if v is not None})

    return render


def _rows_before(rows: int) -> str:
    return "the row before it was read" if rows == 1 else f"the {rows} rows before it were read"
