"""Where the broker is: connection parameters from its URL, the URLs of a cluster's nodes (several,
comma-separated), the URL as it may be shown (never with its password), and pika's own logging
kept quiet."""

from __future__ import annotations

import logging
from urllib.parse import quote

import pika

from credex.errors import InvalidInput, Unavailable, one_line, printable, redact, redact_url

CONNECT_TIMEOUT_S = 10.0
HEARTBEAT_S = 30
BLOCKED_CONNECTION_TIMEOUT_S = 60


SCHEMES = ("amqp", "amqps")
URL_FORM = "amqp://user:password@host:5672/vhost (amqps:// for TLS)"


def split_urls(url: str) -> list[str]:
    """The nodes' URLs in the order given: ``CREDEX_AMQP_URL`` may name several nodes of one
    cluster, comma-separated (a comma never appears unescaped in an AMQP URL). A URL that is not
    one (another scheme, a value pika cannot read) is bad configuration, exit 2, found before
    anything connects: a worker would otherwise retry it for ever as a broker out of reach."""
    urls = _parts(url)
    if not urls:
        raise Unavailable("no broker URL: set CREDEX_AMQP_URL")
    for one in urls:
        _parameters(one)
    return urls


def _parts(url: str) -> list[str]:
    return [part.strip() for part in url.split(",") if part.strip()]


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _parameters(url: str) -> pika.URLParameters:
    """pika's reading of ``url``, or InvalidInput (exit 2) saying why, with no password shown."""
    if one_line(url) != url:
        # pika would take them as they are: a tab or line break in the host is dropped (another
        # host), a NUL or DEL kept in the user name or virtual host.
        raise InvalidInput(f"the broker URL must be printable text: {printable(redact_url(url), 80)}")
    if _scheme(url) not in SCHEMES:
        shown = printable(redact_url(url), 80)
        raise InvalidInput(f"the broker URL {shown} is not an AMQP URL: the form is {URL_FORM}")
    try:
        return pika.URLParameters(url)
    except Exception as error:
        readable = isinstance(error, ValueError) and str(error)  # pika's words on a bad option
        why = redact(str(error)) if readable else f"the form is {URL_FORM}"
        raise InvalidInput(f"not a usable broker URL {printable(redact_url(url), 80)}: {why}") from None


def connection_parameters(url: str, *, name: str, timeout: float = CONNECT_TIMEOUT_S) -> pika.URLParameters:
    """pika's parameters for ``url``, the connection named ``name`` in the broker's management
    views (a URL that is not one: InvalidInput, exit 2, as ``split_urls`` says)."""
    params = _parameters(url)
    params.client_properties = {"connection_name": name, "product": "credex"}
    params.heartbeat = HEARTBEAT_S
    params.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT_S
    params.connection_attempts = 1  # the workers retry with their own backoff
    params.socket_timeout = timeout
    return params


def display_amqp_url(url: str) -> str:
    """The broker URL (or the comma-separated URLs) as it may be shown: never with a password."""
    if "," in url:  # shown as they are, even those split_urls refuses: showing never fails
        return ",".join(display_amqp_url(part) for part in _parts(url))
    if _scheme(url) not in SCHEMES:
        return redact(url)
    try:
        params = pika.URLParameters(url)
    except Exception:
        return redact(url)
    user = getattr(params.credentials, "username", "")
    vhost = quote(params.virtual_host, safe="")
    scheme = "amqps" if _scheme(url) == "amqps" else "amqp"
    return f"{scheme}://{user + '@' if user else ''}{params.host}:{params.port}/{vhost}"


def describe(error: object) -> str:
    """An exception or close reason from pika as one line, with any password left out."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, BaseException) and type(error).__name__ not in text:
        text = f"{type(error).__name__}: {text}"
    return redact(text)


def quiet_pika() -> None:
    """pika logs every dropped connection with a traceback; the workers say it in one line."""
    logging.getLogger("pika").setLevel(logging.CRITICAL)
