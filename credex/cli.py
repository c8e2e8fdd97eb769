"""The entry point (``credex``, ``python -m credex``). The read-only look-ups that
``credex.commands.quick`` can answer on their own (`account show`, `redeem show`,
`relay status`) are answered before Typer, SQLAlchemy or the settings are imported; everything
else, and anything unusual about those, goes to the Typer app (``credex.commands.root``),
which builds only the command group argv names."""

from __future__ import annotations


def main() -> None:
    import sys

    from credex.commands.quick import answer

    code = answer(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from credex.commands.root import app

    # prog_name: also under `python -m credex`, messages name the command people type.
    app(prog_name="credex", quick=False)


def __getattr__(name: str):
    """``credex.cli.app`` and the rest of the root, imported when asked for (tests, scripts)."""
    if name in ("app", "CredexGroup", "INTERNAL_ERROR_EXIT"):
        from credex.commands import root

        return getattr(root, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
