"""What operators see: JSON logs and Prometheus metrics.

* ``--log-format json``: :func:`use_json_logging` makes every log record one JSON object per line on
  stderr. Access-log records (logger ``orders.access``, written by :func:`log_access_json`) carry
  ``time``, ``level``, ``logger``, ``method``, ``peer``, ``code``, ``duration_ms`` and ``request_id``;
  every other record carries ``time``, ``level``, ``logger``, ``message`` and, for an exception, ``exc_info``.
* ``--metrics-port N``: :class:`Metrics` keeps one :class:`~prometheus_client.CollectorRegistry` per server
  (several servers can share a process) and serves it over HTTP at ``/metrics``:

  - ``orders_calls_total{method,code}``: finished calls by full method path and gRPC status name;
  - ``orders_call_duration_seconds{method}``: call latency (for a stream, how long it was open);
  - ``orders_active_watchers``: open OrderStatusStream calls, read at scrape time;
  - ``orders_event_log_head``: the newest event-log sequence this server has published (or, while no
    stream is open, written).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from orders.calls import CallRecord, access_log, format_peer

log = logging.getLogger(__name__)

# The attribute of an access-log LogRecord that holds its structured fields.
ACCESS_FIELDS = "orders_access"

UNKNOWN_METHOD = "unknown"

# 0.5 ms to 5 s, roughly ×2.5 per step: SQLite reads sit at the bottom, durable group-committed writes in the
# middle, overload and slow disks at the top; slower calls (and long-lived streams) land in +Inf.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# --- structured logging ----------------------------------------------------------------------------------


def access_fields(record: CallRecord) -> dict[str, Any]:
    """The structured fields of one access-log line."""
    return {
        "method": record.method,
        "peer": format_peer(record.peer),
        "code": record.code,
        "duration_ms": round(record.duration * 1000, 3),
        "request_id": record.request_id,
    }


def log_access_json(record: CallRecord) -> None:
    """The access-log observer for ``--log-format json``: the fields ride on the record for :class:`JsonFormatter`."""
    access_log.info(
        "%s %s request_id=%s",
        record.method,
        record.code,
        record.request_id,
        extra={ACCESS_FIELDS: access_fields(record)},
    )


class JsonFormatter(logging.Formatter):
    """Formats a log record as one line of JSON (newlines inside values are escaped, so one record per line)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, ACCESS_FIELDS, None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def use_json_logging() -> None:
    """Switch the root logger's handlers to :class:`JsonFormatter`, and route what would bypass logging
    (warnings, uncaught exceptions in the main thread or any other) through it, so stderr stays pure JSON."""
    formatter = JsonFormatter()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, traceback: TracebackType | None
) -> None:  # pragma: no cover - only runs as the process dies
    log.critical("uncaught exception", exc_info=(exc_type, exc, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:  # pragma: no cover
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    log.critical("uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


# --- metrics -------------------------------------------------------------------------------------------------


class FeedStats(Protocol):
    """What the metrics read from the event feed at scrape time."""

    @property
    def watcher_count(self) -> int: ...

    head: int


class Metrics:
    """One server's Prometheus metrics, in a registry of its own, served by :meth:`start` until :meth:`stop`.

    ``methods`` are the full paths the server serves (``/orders.v1.OrderService/CreateOrder``); any other
    method is counted as ``unknown``, so a label never takes an unbounded set of values.
    """

    def __init__(self, feed: FeedStats, methods: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self._methods = frozenset(methods)
        self.calls = Counter(
            "orders_calls",
            "Finished gRPC calls by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.durations = Histogram(
            "orders_call_duration_seconds",
            "gRPC call duration in seconds (for a stream: how long it was open).",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        watchers = Gauge("orders_active_watchers", "Open OrderStatusStream calls.", registry=self.registry)
        watchers.set_function(lambda: feed.watcher_count)
        head = Gauge(
            "orders_event_log_head",
            "Newest status-event sequence this server has published (or, with no stream open, written).",
            registry=self.registry,
        )
        head.set_function(lambda: feed.head)
        for method in self._methods:  # every series exists from the start, so rate() sees the first call
            self.calls.labels(method, "OK")
            self.durations.labels(method)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def observe(self, record: CallRecord) -> None:
        """The call observer: count the call and time it."""
        method = record.method if record.method in self._methods else UNKNOWN_METHOD
        self.calls.labels(method, record.code).inc()
        self.durations.labels(method).observe(record.duration)

    def start(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 picks a free port); return the port bound."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self._thread.name = "orders-metrics-http"
        self.port = self._http.server_port
        log.info("metrics on port %d", self.port)
        return self.port

    async def stop(self) -> None:
        """Stop serving and release the port."""
        http, thread, self._http, self._thread = self._http, self._thread, None, None
        if http is None:
            return
        await asyncio.to_thread(http.shutdown)  # waits for serve_forever's next poll (≤ 0.5 s)
        http.server_close()
        if thread is not None:
            await asyncio.to_thread(thread.join, 5)
