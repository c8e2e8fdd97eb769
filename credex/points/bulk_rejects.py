"""The rejects file of ``award bulk --rejects``: each refused row as it was read, with its line
number and the reason, in the input's own format so that it can be fixed and fed back."""

from __future__ import annotations

import csv
import json
from typing import IO

from credex.points.bulk_files import GrantReader, Rejected


def _free_name(wanted: tuple[str, ...], taken: set[str]) -> str:
    for name in wanted:
        if name not in taken:
            return name
    return wanted[-1] + "_"


class RejectsFile:
    """Each rejected row as it was read, with its line number and the reason; written as the
    rows are refused, so a killed run keeps what it found. Feeding the file back to
    ``award bulk`` after fixing it works: the added columns are ignored.

    A CSV row of the wrong width keeps the line and reason in their columns: a short one is
    padded with empty fields (it lacked a required one, so fed back unfixed it is refused
    again), a long one has its extra fields after the reason (fed back, still too long)."""

    def __init__(self, out: IO[str], reader: GrantReader) -> None:
        self._out = out
        self.format = reader.format
        if reader.format == "csv":
            columns = list(reader.columns or [])
            taken = {column.strip().lower() for column in columns}
            self._why = _free_name(("reason", "error"), taken)
            self._line = _free_name(("line",), taken | {self._why})
            self._csv = csv.writer(out, lineterminator="\n")
            self._csv.writerow([*columns, self._line, self._why])
            self._width = len(columns)
        else:
            self._why, self._line = "error", "line"

    def write(self, rejected: Rejected) -> None:
        if self.format == "csv":
            fields, width = rejected.original, self._width
            if len(fields) < width:
                fields = [*fields, *[""] * (width - len(fields))]
            self._csv.writerow([*fields[:width], rejected.line, rejected.reason, *fields[width:]])
            return
        original = rejected.original
        if isinstance(original, dict):
            why = _free_name(("error", "_error"), set(original))
            line = _free_name(("line", "_line"), set(original) | {why})
            record = {**original, line: rejected.line, why: rejected.reason}
        else:
            record = {"line": rejected.line, "error": rejected.reason, "text": original}
        # A lone surrogate (a JSON escape like "\\ud800" in the row) is not UTF-8: it goes back out
        # as that escape, which backslashreplace spells the same way, so the line reads back as it came.
        text = json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace").decode()
        self._out.write(text + "\n")
