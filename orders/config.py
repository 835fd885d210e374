"""Server configuration: one dataclass field per option, each a ``--flag`` with an ``ORDERS_*`` twin.

The command-line flags are generated from the fields, so an option is declared exactly once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024
DEFAULT_DB_URL = "sqlite:///orders.db"  # a file in the working directory
DATABASE_SCHEMES = ("sqlite", "postgres", "postgresql")  # the playhouse.db_url schemes the storage runs on


def check_database_url(url: str) -> None:
    """Raise ValueError, saying what to give instead, unless ``url`` names a database the server runs on."""
    scheme = urllib.parse.urlsplit(url).scheme
    if not scheme:
        raise ValueError(f"the database is given as a URL: for the SQLite file {url} give sqlite:///{url}")
    if scheme not in DATABASE_SCHEMES:
        raise ValueError(
            f"{scheme}:// is not a database this server runs on: give sqlite:///path/to/orders.db"
            " or postgresql://user@host:5432/dbname"
        )


def _option(
    default: Any, help: str, *, parse: Callable[[str], Any] | None = None, secret: bool = False, **argparse_options: Any
) -> Any:
    metadata = {"help": help, "parse": parse, "secret": secret, "argparse": argparse_options}
    return field(default=default, metadata=metadata)


def _optional_str(text: str) -> str | None:
    return text or None


def _optional_port(text: str) -> int | None:
    return int(text) if text else None


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``orders serve`` can be told."""

    host: str = _option("127.0.0.1", "address to bind; 0.0.0.0 or :: to serve a network")
    port: int = _option(50051, "port; 0 picks a free one")
    db: str = _option(DEFAULT_DB_URL, "database URL: sqlite:///path/to/file.db or postgresql://user@host:port/dbname")
    log_level: str = _option("info", "log level", choices=["debug", "info", "warning", "error"])
    log_format: str = _option("text", "access and server log format", choices=["text", "json"])
    grace: float = _option(10.0, "seconds in-flight calls get to finish on shutdown")
    token: str | None = _option(
        None, "bearer token for every RPC but health (off when unset)", parse=_optional_str, secret=True
    )
    tls_cert: str | None = _option(None, "PEM certificate chain to serve TLS with", parse=_optional_str)
    tls_key: str | None = _option(None, "PEM private key of --tls-cert", parse=_optional_str)
    metrics_port: int | None = _option(
        None, "Prometheus metrics port (off when unset); worker i of --workers serves port + i", parse=_optional_port
    )
    max_message_bytes: int = _option(4 * MIB, "largest request message accepted (RESOURCE_EXHAUSTED above)")
    max_watchers: int = _option(10_000, "open OrderStatusStream calls allowed in all (RESOURCE_EXHAUSTED above)")
    max_streams_per_connection: int = _option(100, "open OrderStatusStream calls allowed per connection")
    retention_events: int = _option(0, "keep only the newest N status events in the log (0 keeps all)")
    workers: int = _option(1, "server processes sharing the port and the database (SO_REUSEPORT)")

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        try:
            check_database_url(self.db)
        except ValueError as exc:
            raise ValueError(f"--db: {exc}") from None
        if self.workers < 1:
            raise ValueError(f"--workers must be 1 or more, not {self.workers}")
        if self.retention_events < 0:
            raise ValueError(f"--retention-events must be 0 (keep every event) or more, not {self.retention_events}")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag per ServerConfig field, each defaulting to its ORDERS_* environment variable."""
    for option in dataclasses.fields(ServerConfig):
        env = f"ORDERS_{option.name.upper()}"
        parse = option.metadata["parse"] or type(option.default)
        default = os.environ.get(env)
        parser.add_argument(
            f"--{option.name.replace('_', '-')}",
            type=parse,
            default=option.default if default is None else parse(default),
            help=f"{option.metadata['help']} ({env}{'' if option.metadata['secret'] else '; default: %(default)s'})",
            **option.metadata["argparse"],
        )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig described by parsed server flags."""
    try:
        return ServerConfig(**{option.name: getattr(args, option.name) for option in dataclasses.fields(ServerConfig)})
    except ValueError as exc:
        raise SystemExit(f"orders serve: {exc}") from None
