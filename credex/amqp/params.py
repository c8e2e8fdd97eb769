"""Where the broker is: connection parameters from its URL, the URLs of a cluster's nodes (several,
comma-separated), the URL as it may be shown (never with its password), and pika's own logging
kept quiet."""

from __future__ import annotations

import logging
from urllib.parse import quote

import pika

from credex.errors import Unavailable, redact

CONNECT_TIMEOUT_S = 10.0
HEARTBEAT_S = 30
BLOCKED_CONNECTION_TIMEOUT_S = 60


def split_urls(url: str) -> list[str]:
    """The nodes' URLs in the order given: ``CREDEX_AMQP_URL`` may name several nodes of one
    cluster, comma-separated (a comma never appears unescaped in an AMQP URL)."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise Unavailable("no broker URL: set CREDEX_AMQP_URL")
    return urls


def connection_parameters(url: str, *, name: str, timeout: float = CONNECT_TIMEOUT_S) -> pika.URLParameters:
    """pika's parameters for ``url``, the connection named ``name`` in the broker's management
    views. A URL pika cannot read is Unavailable (exit 69) with the password left out."""
    try:
        params = pika.URLParameters(url)
    except Exception as error:
        raise Unavailable(f"not a usable broker URL {display_amqp_url(url)}: {redact(str(error))}") from None
    params.client_properties = {"connection_name": name, "product": "credex"}
    params.heartbeat = HEARTBEAT_S
    params.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT_S
    params.connection_attempts = 1  # the workers retry with their own backoff
    params.socket_timeout = timeout
    return params


def display_amqp_url(url: str) -> str:
    """The broker URL (or the comma-separated URLs) as it may be shown: never with a password."""
    if "," in url:
        return ",".join(display_amqp_url(part) for part in split_urls(url))
    try:
        params = pika.URLParameters(url)
    except Exception:
        return redact(url)
    user = getattr(params.credentials, "username", "")
    vhost = quote(params.virtual_host, safe="")
    return f"amqp://{user + '@' if user else ''}{params.host}:{params.port}/{vhost}"


def describe(error: object) -> str:
    """An exception or close reason from pika as one line, with any password left out."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, BaseException) and type(error).__name__ not in text:
        text = f"{type(error).__name__}: {text}"
    return redact(text)


def quiet_pika() -> None:
    """pika logs every dropped connection with a traceback; the workers say it in one line."""
    logging.getLogger("pika").setLevel(logging.CRITICAL)
