"""Server configuration: one dataclass field per option, each a ``--flag`` with an ``ORDERS_*`` twin.

The command-line flags are generated from the fields, so an option is declared exactly once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orders.auth import SecurityConfigError, check_token

MIB = 1024 * 1024
DEFAULT_DB_URL = "sqlite:///orders.db"  # a file in the working directory
DATABASE_SCHEMES = ("sqlite", "postgres", "postgresql")  # the playhouse.db_url schemes the storage runs on
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
_ANY_DATABASE = "give sqlite:///path/to/orders.db or postgresql://user@host:5432/dbname"


def check_database_url(url: str) -> None:
    """Raise ValueError, saying what to give instead, unless ``url`` names a database the server runs on."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed "["
        raise ValueError(f"not a URL ({exc}): {_ANY_DATABASE}") from None
    if not url:
        raise ValueError(f"no database given: {_ANY_DATABASE}")
    if not parts.scheme:
        shown = redacted(url)
        if "//" in url:  # postgresql//host/db: a URL with its colon missing, not a file name
            raise ValueError(f"{shown} is not a URL (no scheme: is a ':' missing?): {_ANY_DATABASE}")
        raise ValueError(f"the database is given as a URL: for the SQLite file {shown} give sqlite:///{shown}")
    if parts.scheme not in DATABASE_SCHEMES:
        raise ValueError(f"{parts.scheme}:// is not a database this server runs on: {_ANY_DATABASE}")
    if parts.scheme == "sqlite":
        if parts.path in ("", "/", "/:memory:") or parts.path.startswith("/file::memory:"):
            raise ValueError(
                "an in-memory SQLite database cannot serve: the server's threads each open their own"
                " connection, and each would see a database of its own; give a file: sqlite:///orders.db"
            )
        return
    try:
        parts.port  # noqa: B018  (parsing it checks it)
    except ValueError:  # its text would quote what stands where the port should: maybe part of a password
        raise ValueError(f"{redacted(url)} has a port that is not a number from 0 to 65535{_ENCODE}") from None
    if "@" in parts.path:  # postgresql:/user:password@host/db, a slash short; or a password's / not encoded
        raise ValueError(f"{redacted(url)} has a user in its path: give postgresql://user@host:5432/dbname{_ENCODE}")
    if parts.path.strip("/") == "":
        raise ValueError(f"{redacted(url)} names no database: add it, as in postgresql://user@host:5432/dbname")


def redacted(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (in the user part or a ``password=``
    parameter): fit for logs, error messages and help texts. A text that is no URL at all is not shown.
    So is any ``user:secret@`` in a URL mistyped (``postgresql//user:secret@host``, a colon short)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unclosed "[": where a password would be cannot be told
        return "(not a URL; not shown)"
    network_location = f"{parts.scheme}://{parts.netloc}"
    if parts.scheme != "sqlite" and url.startswith(network_location):
        # A user part urlsplit cut short at a /, ? or # of the password, not percent-encoded, leaves an @ in
        # what follows (in the path alone, if the cut part held an @ too): all up to the last @ may be the
        # password's.
        after = parts.path if "@" in parts.netloc else url[len(network_location) :]
        if "@" in after:
            return f"{parts.scheme}://***@{url.rsplit('@', 1)[1]}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if parts.password is None and all(name != "password" for name, _ in query):
        return _USER_AND_SECRET.sub(r"\1:***@", url)  # as given: urlsplit's round trip drops sqlite:////'s host
    netloc = parts.netloc if parts.password is None else parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    hidden = [(name, "***" if name == "password" else value) for name, value in query]
    return parts._replace(netloc=netloc, query=urllib.parse.urlencode(hidden, safe="*")).geturl()


_ENCODE = " (percent-encode any / ? # @ % in the user or password: %2F %3F %23 %40 %25)"
_USER_AND_SECRET = re.compile(r"([^\s:/@]+):[^\s/@]+@")


def _option(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] | None = None,
    secret: bool = False,
    shown: Callable[[Any], str] = str,
) -> Any:
    metadata = {"help": help, "parse": parse, "secret": secret, "shown": shown}
    return field(default=default, metadata=metadata)


def _optional_str(text: str) -> str | None:
    return text or None


def _optional_port(text: str) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port value: {text!r}") from None


def _token(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError(
            "is empty: give the token, or leave out --token and ORDERS_TOKEN to serve without one"
        )
    try:
        return check_token(text)
    except SecurityConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text.lower()

    return parse


def _port_range(name: str, first: int, count: int = 1) -> None:
    if not 0 <= first <= 65535 - (count - 1):
        last = f" (and the {count - 1} after it, one per worker)" if count > 1 else ""
        raise ValueError(f"{name} must be a port from 0 to 65535{last}, not {first}")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``orders serve`` can be told."""

    host: str = _option("127.0.0.1", "address to bind; 0.0.0.0 (IPv4) or :: (IPv6 and IPv4) to serve a network")
    port: int = _option(50051, "port; 0 picks a free one")
    db: str = _option(
        DEFAULT_DB_URL, "database URL: sqlite:///path/to/file.db or postgresql://user@host:port/dbname", shown=redacted
    )
    log_level: str = _option("info", f"log level: {', '.join(LOG_LEVELS)}", parse=_one_of(*LOG_LEVELS))
    log_format: str = _option("text", "access and server log format: text or json", parse=_one_of(*LOG_FORMATS))
    grace: float = _option(10.0, "seconds in-flight calls get to finish on shutdown")
    token: str | None = _option(
        None, "bearer token for every RPC but health (off when unset)", parse=_token, secret=True
    )
    tls_cert: str | None = _option(
        None, "PEM certificate chain to serve TLS with (plaintext when unset)", parse=_optional_str
    )
    tls_key: str | None = _option(None, "PEM private key of --tls-cert", parse=_optional_str)
    metrics_port: int | None = _option(
        None,
        "Prometheus metrics port (off when unset; 0 picks a free one); worker i of --workers serves port + i",
        parse=_optional_port,
    )
    max_message_bytes: int = _option(4 * MIB, "largest request message accepted (RESOURCE_EXHAUSTED above)")
    max_watchers: int = _option(
        10_000,
        "open OrderStatusStream calls allowed in all, in each --workers process (RESOURCE_EXHAUSTED above; 0: none)",
    )
    max_streams_per_connection: int = _option(100, "open OrderStatusStream calls allowed per connection (0: none)")
    retention_events: int = _option(0, "keep only the newest N status events in the log (0 keeps all)")
    workers: int = _option(1, "server processes sharing the port and the database (SO_REUSEPORT)")

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        try:
            check_database_url(self.db)
        except ValueError as exc:
            raise ValueError(f"--db: {exc}") from None
        if not self.host:
            raise ValueError("--host is empty: give the address to bind (127.0.0.1; 0.0.0.0 or :: for a network)")
        if self.workers < 1:
            raise ValueError(f"--workers must be 1 or more, not {self.workers}")
        _port_range("--port", self.port)
        if self.metrics_port is not None:
            _port_range("--metrics-port", self.metrics_port, self.workers)
            if self.metrics_port and self.metrics_port <= self.port < self.metrics_port + self.workers:
                raise ValueError(f"--metrics-port {self.metrics_port} takes port {self.port}, which --port serves")
        if not (math.isfinite(self.grace) and self.grace >= 0):
            raise ValueError(f"--grace must be 0 or more seconds, not {self.grace}")
        if self.max_message_bytes < 1:  # 0 would refuse every request that says anything
            raise ValueError(f"--max-message-bytes must be 1 or more, not {self.max_message_bytes}")
        for name in ("max_watchers", "max_streams_per_connection", "retention_events"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, not {getattr(self, name)}")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag per ServerConfig field, each defaulting to its ORDERS_* environment variable.

    An environment value is given to argparse as text, which converts and checks it only when ``serve``
    runs: a bad ``ORDERS_PORT`` is a usage error of ``orders serve``, not a crash of every command.
    """
    for option in dataclasses.fields(ServerConfig):
        env = f"ORDERS_{option.name.upper()}"
        default = os.environ.get(env, option.default)
        hidden = option.metadata["secret"] or default is None  # a secret, or unset: the help says what that means
        shown = "" if hidden else f"; default: {option.metadata['shown'](default)}"
        parser.add_argument(
            f"--{option.name.replace('_', '-')}",
            type=_naming_the_variable(option.metadata["parse"] or type(option.default), env),
            default=default,
            help=f"{option.metadata['help']} ({env}{shown})".replace("%", "%%"),
        )


def _naming_the_variable(parse: Callable[[str], Any], env: str) -> Callable[[str], Any]:
    """``parse``, whose refusal of the value ``env`` holds says so: argparse names only the flag."""

    def parse_naming_it(text: str) -> Any:
        try:
            return parse(text)
        except argparse.ArgumentTypeError as exc:
            message = str(exc)
        except (TypeError, ValueError):  # int("abc"): said as argparse would
            message = f"invalid {parse.__name__} value: {text!r}"
        source = f" (from {env})" if os.environ.get(env) == text else ""
        raise argparse.ArgumentTypeError(message + source)

    return parse_naming_it


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServerConfig:
    """The ServerConfig described by parsed server flags; a usage error (exit 2) if they do not make one."""
    try:
        return ServerConfig(**{option.name: getattr(args, option.name) for option in dataclasses.fields(ServerConfig)})
    except ValueError as exc:
        parser.error(str(exc))
