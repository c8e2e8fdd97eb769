"""Database URLs: which credex takes (SQLite files, Postgres through psycopg 3), read and checked
before anything connects, and how one is shown (never with its password). A URL that cannot
name a database credex can keep its data in is bad input (exit 2) here, not a server out of
reach (exit 69) later: a worker would retry that for ever."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from sqlalchemy.engine import make_url

from credex.errors import CredexError, InvalidInput, one_line, printable, redact_url

# The drivers credex is built and tested with: the standard library's sqlite3 and psycopg 3.
_DRIVERS = {
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}


def normalise_url(url: str):
    """Parse a database URL; ``postgresql://`` means psycopg 3. Anything else is bad input."""
    if not isinstance(url, str) or one_line(url) != url:  # NUL, controls, bidi, surrogates
        raise InvalidInput(f"the database URL must be printable text: {printable(redact_url(str(url)), 80)}")
    if url != url.strip():
        # A space at the end would name another file ("credex.db "), created empty; at the start,
        # no URL at all. Either is a slip in a setting: said as such, not taken or half-taken.
        raise InvalidInput(
            f"the database URL begins or ends with white space: {printable(redact_url(url), 80)}; remove it"
        )
    try:
        parsed = make_url(url)
    except Exception:
        raise InvalidInput(f"not a database URL: {printable(redact_url(url), 80)}") from None
    try:
        backend = parsed.get_backend_name()
    except Exception:
        backend = parsed.drivername
    if backend not in ("sqlite", "postgresql", "postgres"):
        raise InvalidInput(f"unsupported database {printable(backend)}: use sqlite or postgresql")
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        raise InvalidInput(
            f"unsupported database driver {printable(parsed.drivername)}: "
            "use sqlite:///PATH or postgresql://… (psycopg 3)"
        )
    problem = _address_problem(parsed)
    if problem is not None:
        raise InvalidInput(problem)
    return parsed.set(drivername=driver)


# What the sqlite3 driver takes from a URL's query itself; the rest is SQLite's, with uri=true.
_SQLITE_DRIVER_OPTIONS = {
    "timeout",
    "isolation_level",
    "detect_types",
    "check_same_thread",
    "cached_statements",
    "uri",
}


_SQLITE_URI_FORM = "sqlite:///file:PATH?mode=ro&uri=true"


def _address_problem(parsed) -> str | None:
    """Why a parsed URL cannot name a database credex can keep its data in (None: it can). Found
    before connecting: these are mistakes in the URL, not a server out of reach (exit 69)."""
    if parsed.get_backend_name() == "sqlite":
        uri_form = parsed.query.get("uri") == "true"
        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or (
            uri_form and (database in ("file:", "file::memory:") or parsed.query.get("mode") == "memory")
        )
        if in_memory:
            return "an in-memory SQLite database keeps nothing once the command ends: give a file, sqlite:///PATH"
        ignored = sorted(set(parsed.query) - _SQLITE_DRIVER_OPTIONS)
        if ignored and not uri_form:
            # The driver would drop them with a warning: ?mode=ro would write all the same.
            return (
                f"SQLite URL options ({', '.join(printable(name) for name in ignored[:3])}) take effect "
                f"only in SQLite's URI form, {_SQLITE_URI_FORM}; without it they are ignored"
            )
        if uri_form and not database.startswith("file:"):
            # SQLite reads options only from a name that begins with file:; any other name is a
            # file's, and the driver appends the options to it: ?mode=ro would create and write a
            # new file named "PATH?mode=ro".
            return (
                f"with uri=true the SQLite database must be written as file:PATH, as in {_SQLITE_URI_FORM} "
                "(SQLite reads options only there; otherwise they end up in the file's name)"
            )
        return None
    if parsed.host is not None and "@" in parsed.host:
        # The password (or user name) holds an "@" that was not percent-encoded: the rest of it
        # would be taken for the host, and shown in the driver's error.
        return "the database URL has an '@' in its user name or password: write it as %40"
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        return f"the database URL's port must be 1 to 65535, got {printable(parsed.port)}"
    return _libpq_option_problem(dict(parsed.query))


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _libpq_option_problem(options: dict) -> str | None:
    """An option of the URL's query libpq would refuse only when connecting (exit 69, and a worker
    retrying it for ever): an unknown name, or an sslmode that is none of libpq's."""
    if not options:
        return None
    import psycopg.conninfo

    for name in options:  # a name may come more than once (host=…&host=…: several servers)
        try:
            psycopg.conninfo.make_conninfo(**{name: ""})
        except psycopg.ProgrammingError:
            return f"the database URL has an option libpq does not know: {printable(name)}"
    mode = options.get("sslmode")
    if mode is not None and mode not in _SSLMODES:
        return f"the database URL's sslmode must be one of {', '.join(_SSLMODES)}, got {printable(mode)}"
    return None


def display_url(url: str) -> str:
    """The URL as it may be shown to a user: never with its password."""
    try:
        return normalise_url(url).render_as_string(hide_password=True)
    except CredexError:
        return redact_url(url)


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names, read as credex reads the URL (``normalise_url``: a URL that is
    none is InvalidInput, an in-memory one refused); None for Postgres. ``sqlite:///PATH``, or in
    SQLite's URI form ``sqlite:///file:PATH?mode=ro&uri=true``."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if parsed.query.get("uri") == "true":  # file:PATH: normalise_url refuses any other name here
        return Path(unquote(urlsplit(parsed.database).path))
    return Path(parsed.database)


def read_only_url(url: str) -> str:
    """``url`` opened so that nothing can write to it: a SQLite file in SQLite's URI form with
    ``mode=ro`` (connecting then cannot create the file or switch its journal to WAL either);
    a Postgres URL as it is (its reader sets READ ONLY on the transaction)."""
    path = sqlite_file(url)
    if path is None:
        return url
    # Quoted twice: SQLAlchemy unquotes the URL's database once, SQLite the URI's path once more.
    return f"sqlite:///file:{quote(quote(str(path)))}?mode=ro&uri=true"
