"""The async client library: ``OrderClient``.

    async with OrderClient("localhost:50051") as orders:
        order = await orders.create([Item("Laptop", 1, 1000.00)])
        async for update in orders.watch([order.id]):
            ...

Replicas: give several targets (``OrderClient(["db1:50051", "db2:50051"])`` or ``"db1:50051,db2:50051"``),
servers sharing one database. Calls go to the current target; a failure that is safe to retry moves on
to the next target (round-robin) at once, so a dead replica costs one failed attempt, not the deadline,
and ``watch()`` resumes on the next replica after the last sequence it saw (sequences are global). A hung
replica (a paused process, a network that drops packets) is noticed by HTTP/2 keepalive pings: a
connection from which nothing arrives for ``keepalive`` seconds (default 4) after a ping is dropped, and
its calls move on too.

Security: ``token="…"`` sends ``authorization: Bearer …`` with every call (streams included);
``ca_file="ca.pem"`` turns TLS on and trusts that CA, ``tls=True`` turns TLS on with the system
trust store, and ``tls=`` an :class:`ssl.SSLContext` uses that context as it is:

    async with OrderClient("orders.example.com:443", token=os.environ["ORDERS_TOKEN"], ca_file="ca.pem") as c:
        ...

Every call has a deadline (``timeout``, default 10 s, shared by its retries). Calls that are safe to
repeat are retried when the server is unreachable or UNAVAILABLE (on the next target, with exponential
backoff once every target has failed): reads, creates (each carries a ``request_id``, generated when not
given, so a retry never makes a second order), and status changes without ``expected_version`` (setting
a status twice is a no-op). Any other call is sent once, but its UNAVAILABLE still moves later calls on
to the next target. Every failure is raised as an :class:`orders.errors.OrderError` subclass carrying the
gRPC status name. Arguments are checked before anything is sent (see :mod:`orders.request_checks`): a
wrong type raises :class:`TypeError`, an integer the wire cannot carry :class:`InvalidArgument`.

A client belongs to the event loop it is first used on (it may be made outside one); once closed it
refuses new calls (:class:`RuntimeError`), and its open watches end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
import socket
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar

from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality
from grpclib.events import SendRequest, listen
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.metadata import Deadline
from grpclib.protocol import H2Protocol

from orders import _grpclib_fixes  # noqa: F401  (a connection whose keepalive ping goes unanswered is aborted)
from orders._proto.orders.v1 import (
    CancelOrderRequest,
    CancelOrderResponse,
    CreateOrderRequest,
    CreateOrderResponse,
    GetOrderRequest,
    GetOrderResponse,
    ListOrdersRequest,
    ListOrdersResponse,
    Order,
    OrderItem,
    OrderServiceStub,
    OrderStatus,
    OrderStatusStreamRequest,
    StatusUpdate,
    UpdateOrderStatusRequest,
    UpdateOrderStatusResponse,
)
from orders.auth import add_token, check_token, client_ssl_context, is_loopback, keep_headers_out_of_logs
from orders.domain import new_id
from orders.errors import DeadlineExceeded, Internal, OrderError, Unavailable, error_for
from orders.request_checks import check_request
from orders.wire import WATCH_METHOD

R = TypeVar("R")

log = logging.getLogger(__name__)

DEFAULT_TARGET = "localhost:50051"
_HOST = re.compile(r"\[[\w:.%]+\]|[\w.-]+")  # a name, an IPv4 address, or an IPv6 one (in brackets)


@dataclass(frozen=True, slots=True)
class Item:
    """An item to order: product name, quantity and unit price in currency units (a float, an int or a
    ``decimal.Decimal``)."""

    product_name: str
    quantity: int
    price: float | Decimal


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry calls that are safe to repeat."""

    attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"attempts must be an int, not {type(self.attempts).__name__}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be 1 or more (1: no retries), not {self.attempts}")
        _check_seconds(self.initial_backoff, "initial_backoff", zero=True)
        _check_seconds(self.max_backoff, "max_backoff", zero=True)

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff before retry number ``attempt`` (1-based)."""
        return random.uniform(0, min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1)))


def parse_target(target: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into host and port."""
    host, sep, port = target.rpartition(":")
    if not (sep and port.isascii() and port.isdigit() and 0 < int(port) < 65536 and _HOST.fullmatch(host)):
        raise ValueError(f"target must look like host:port (port 1-65535), got {target!r}")
    return host.strip("[]"), int(port)


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """The targets in ``"h1:1,h2:2"`` or ``["h1:1", "h2:2"]``, stripped, each checked by :func:`parse_target`."""
    listed = targets.split(",") if isinstance(targets, str) else list(targets)
    if not all(isinstance(t, str) for t in listed):
        raise TypeError(f"targets must be a str or a sequence of str, got {targets!r}")
    if not listed:
        raise ValueError(f"targets must be one or more host:port strings, got {targets!r}")
    cleaned = tuple(t.strip() for t in listed)
    for target in cleaned:
        try:
            parse_target(target)
        except ValueError as exc:
            raise ValueError(f"{exc} in {targets!r}" if len(cleaned) > 1 else str(exc)) from None
    if twice := sorted({t for t in cleaned if cleaned.count(t) > 1}):
        raise ValueError(f"target {', '.join(twice)} given more than once in {targets!r}")
    return cleaned


def _as_error(exc: BaseException) -> OrderError:
    if isinstance(exc, GRPCError):
        return error_for(exc.status.name, exc.message or exc.status.name)
    if isinstance(exc, asyncio.TimeoutError):  # grpclib's client-side deadline (an OSError on 3.11+)
        return DeadlineExceeded(f"the call did not finish before its deadline: {exc}")
    if isinstance(exc, ssl.SSLError):
        return Unavailable(
            f"TLS handshake with the server failed: {exc}"
            " (does the server serve TLS, and is the client's CA file the one that signed its certificate?)"
        )
    if isinstance(exc, _MALFORMED_REPLY):
        return Internal(f"the server's reply broke the gRPC protocol: {exc}")
    if isinstance(exc, StreamTerminatedError):  # the call's stream had been opened: its request may have arrived
        return Unavailable(f"the connection to the server was lost mid-call ({exc}); it may or may not have had effect")
    return Unavailable(f"cannot reach the server: {exc}")


async def _speaks_tls(host: str, port: int, seconds: float) -> bool:
    """Whether a TLS handshake with ``host:port`` completes within ``seconds``. The certificate is not checked:
    nothing is sent on the connection, which is dropped once the handshake is done."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        async with asyncio.timeout(seconds):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
    except OSError:  # refused, reset, closed, not TLS (ssl.SSLError), or too slow (TimeoutError)
        return False
    writer.transport.abort()
    return True


def _heard_from(channel: Channel, since: float = -math.inf) -> bool:
    """Whether anything arrived on the channel's latest connection (ever, or since the ``time.monotonic()``
    given), as noted by orders._grpclib_fixes."""
    connection = getattr(getattr(channel, "_protocol", None), "connection", None)
    last_received = getattr(connection, "_orders_last_received", None)
    return last_received is not None and last_received >= since


def _is_retryable(error: OrderError, exc: BaseException) -> bool:
    """UNAVAILABLE, unless it is a TLS set-up that no retry can mend: an untrusted certificate, or TLS
    spoken to a plaintext server."""
    if isinstance(exc, ssl.SSLCertVerificationError) or getattr(exc, "reason", None) == "WRONG_VERSION_NUMBER":
        return False
    return isinstance(error, Unavailable)


def _check_timeout(timeout: float | None) -> None:
    _check_seconds(timeout, "timeout", none_means="no deadline", zero=True)


def _check_seconds(seconds: float | None, name: str, *, zero: bool, none_means: str | None = None) -> None:
    """TypeError or ValueError unless ``seconds`` is a finite number of seconds (> 0, or ≥ 0 if ``zero``),
    or None where ``none_means`` says what None does."""
    if seconds is None and none_means is not None:
        return
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        allowed = "a number of seconds" if none_means is None else "a number of seconds or None"
        raise TypeError(f"{name} must be {allowed}, not {type(seconds).__name__}")
    if not (math.isfinite(seconds) and (seconds >= 0 if zero else seconds > 0)):
        least = "0 or more" if zero else "more than 0"
        none = "" if none_means is None else f" (None: {none_means})"
        raise ValueError(f"{name} must be {least} seconds{none}, not {seconds}")


class _Channel(Channel):
    """grpclib's channel, which can also be shut for good: a connection that a call was still opening then
    is closed as soon as it opens, and the call fails, instead of running on (grpclib's ``close()`` closes
    only the connection already open, and a later call opens a new one)."""

    _shut = False

    def shut(self) -> None:
        """Close the connection, and any that a call is opening now."""
        self._shut = True
        self.close()

    async def __connect__(self) -> H2Protocol:
        protocol = await super().__connect__()
        if self._shut:
            self.close()
            raise StreamTerminatedError("the client was closed")
        return protocol


def _keepalive_config(silence: float | None) -> Configuration | None:
    """grpclib's settings for a ping every quarter of ``silence`` seconds while calls are in flight, however
    long they last, and the connection aborted once nothing at all has arrived for ``silence`` seconds after
    one (see :mod:`orders._grpclib_fixes`); None: grpclib's default, no pings."""
    if silence is None:
        return None
    interval = silence / PINGS_PER_KEEPALIVE
    return Configuration(
        _keepalive_time=interval,
        _keepalive_timeout=silence,
        _http2_min_sent_ping_interval_without_data=interval,
        _http2_max_pings_without_data=0,  # no limit: grpclib's default (2) stops pinging a long call
    )


def _order_item(item: Item | tuple[str, int, float | Decimal]) -> OrderItem:
    if isinstance(item, Item):
        return OrderItem(product_name=item.product_name, quantity=item.quantity, price=item.price)
    if isinstance(item, tuple) and len(item) == 3:
        return OrderItem(product_name=item[0], quantity=item[1], price=item[2])
    raise TypeError(f"an item is an Item or a (product_name, quantity, price) tuple, not {item!r}")


_OrderResponse = CreateOrderResponse | GetOrderResponse | UpdateOrderStatusResponse | CancelOrderResponse


def _the_order(response: _OrderResponse) -> Order:
    if response.order is None:
        raise Internal("the server's reply carried no order")
    return response.order


# What grpclib raises for a reply it cannot read: a protocol violation, a compressed message (not
# supported), a message cut short (an assertion in grpclib).
_MALFORMED_REPLY = (ProtocolError, NotImplementedError, AssertionError)
# Failures to connect at all: the request never left, so even a call that is not safe to repeat is retried.
_NEVER_SENT = (ConnectionRefusedError, socket.gaierror)
_CONNECTION_LOST = "Connection lost"  # grpclib's StreamTerminatedError when the peer closes the connection
# The longest wait for a TLS handshake that checks whether a server which closed a plaintext connection before
# speaking HTTP/2 serves TLS (a connection and a handshake: two or three round trips).
TLS_CHECK_SECONDS = 2.0
_TRANSPORT_ERRORS = (GRPCError, StreamTerminatedError, ConnectionError, OSError, *_MALFORMED_REPLY)
# A retry is not started with less time left than this: it would end in DEADLINE_EXCEEDED, hiding the
# error that made the call retry (a server that is down answers a connection attempt in well under it).
MIN_ATTEMPT_SECONDS = 0.05
# A watch with heartbeats that hears nothing for this many heartbeat intervals takes its connection as lost
# (a peer gone without closing it, a network that drops packets) and resumes on a new one. Watches ask for
# heartbeats by default, so that such a connection is noticed even without keepalive pings.
SILENT_HEARTBEATS = 3
DEFAULT_HEARTBEAT_SECONDS = 15
# Seconds of silence after an HTTP/2 ping that drop a connection: a hung server is noticed within 1.25 times
# this, inside the default 10 s deadline with time to spare for the call to fail over. A live server answers
# a ping within milliseconds; a ping can wait longer only behind the data sent before it, on a slow link.
DEFAULT_KEEPALIVE_SECONDS = 4.0
PINGS_PER_KEEPALIVE = 4  # while calls are in flight, a ping every quarter of ``keepalive``


class OrderClient:
    """An async client of the orders service; use it as ``async with OrderClient(target) as c``.

    ``target``: ``host:port``, or several replicas (servers on one database) as a sequence of them or one
    comma-separated string; each is checked up front (:class:`ValueError`). ``targets`` is the tuple of
    them, ``target`` the one calls go to now. Each target has its own channel, connected when first used.
    A call that fails in a way safe to retry is retried on the next target (round-robin), immediately,
    with backoff only once every target has failed in a row; a retryable call makes at least one attempt
    per target. A call that is not safe to repeat (a status change with ``expected_version``) is retried
    only while connections are refused, which proves that it never left. UNAVAILABLE from any call,
    retried or not, moves the client on to the next target.

    ``token``: a bearer token, sent as ``authorization: Bearer <token>`` metadata on every call; a server
    started with ``--token`` refuses calls without it (:class:`orders.errors.Unauthenticated`). Without TLS
    the token crosses the network in clear text, so give a CA or ``tls=True`` for any remote server.

    ``ca_file``: path of a PEM file of CA certificates; turns TLS on and verifies the server against them.
    ``tls``: ``True`` turns TLS on with the system trust store; an :class:`ssl.SSLContext` is used as given
    (offer ALPN ``h2`` in it). Both off (the default): plaintext HTTP/2. ``token`` and TLS apply to every
    target; each server's certificate must name its target's host. TLS failures (untrusted certificate,
    plaintext server) raise :class:`orders.errors.Unavailable` promptly, and so does a plaintext client
    whose connection a TLS server closes: a connection closed before the server said anything is checked
    with a TLS handshake, and if that succeeds the error says to connect with TLS (else it is an outage,
    retried as usual).

    ``keepalive``: while calls or watches are in flight on a connection, the client sends an HTTP/2 ping
    every quarter of ``keepalive`` seconds, and drops the connection once nothing at all (neither the
    ping's answer nor anything else) has arrived for ``keepalive`` seconds after one. A call to a server
    that is hung rather than down (a paused process, a network that drops packets) thus fails with
    :class:`orders.errors.Unavailable` within 1.25 times that and is retried on the next target where that
    is safe, instead of waiting out its deadline, and a watch resumes elsewhere. A live server answers
    pings at once, however long its calls take. None: no pings. A call whose deadline passes before
    anything at all arrived from its target (a deadline shorter than ``keepalive``) also moves the client
    on to the next target.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        tls: bool | ssl.SSLContext = False,
        timeout: float | None = 10.0,
        retry: RetryPolicy = RetryPolicy(),
        keepalive: float | None = DEFAULT_KEEPALIVE_SECONDS,
    ) -> None:
        self.targets = parse_targets(target)
        _check_timeout(timeout)
        _check_seconds(keepalive, "keepalive", none_means="no pings", zero=False)
        if not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, not {type(retry).__name__}")
        if not isinstance(tls, (bool, ssl.SSLContext)):
            raise TypeError(f"tls must be True, False or an ssl.SSLContext, not {type(tls).__name__}")
        self.timeout = timeout
        self.retry = retry
        self.keepalive = keepalive
        addresses = [parse_target(t) for t in self.targets]
        if isinstance(tls, ssl.SSLContext):
            if ca_file is not None:
                raise ValueError("give ca_file or an SSLContext as tls, not both")
            context: ssl.SSLContext | None = tls
        else:
            context = client_ssl_context(ca_file) if tls or ca_file is not None else None
        self.tls = context is not None
        if token is not None:
            check_token(token)
            keep_headers_out_of_logs()
            exposed = [t for t, (host, _) in zip(self.targets, addresses, strict=True) if not is_loopback(host)]
            if context is None and exposed:
                log.warning(
                    "sending a bearer token to %s without TLS: it can be read on the network", ", ".join(exposed)
                )
        self._addresses = addresses
        self._ssl = context
        self._token = token
        self._channels: tuple[_Channel, ...] = ()  # made on first use, on that call's event loop
        self._stubs_of_loop: tuple[OrderServiceStub, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._closing = asyncio.Event()  # set by close(): wakes calls and watches pausing before a retry
        self._current = 0  # index of the target calls go to now

    @property
    def target(self) -> str:
        """The target calls go to now: the first, until a failure moves the client on to the next."""
        return self.targets[self._current]

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    @property
    def _stubs(self) -> tuple[OrderServiceStub, ...]:
        """A stub per target, on the running event loop (the channels are made on the first call)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            config = _keepalive_config(self.keepalive)
            self._channels = tuple(_Channel(host, port, ssl=self._ssl, config=config) for host, port in self._addresses)
            if self._token is not None:
                for channel in self._channels:
                    listen(channel, SendRequest, add_token(self._token))  # every call, unary and streaming
            self._stubs_of_loop = tuple(OrderServiceStub(channel) for channel in self._channels)
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("an OrderClient serves the event loop it was first used on; make one per event loop")
        return self._stubs_of_loop

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this OrderClient is closed; make a new one")

    async def __aenter__(self) -> OrderClient:
        self._check_open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every target's connection: calls in flight fail, open watches end, and new calls raise
        :class:`RuntimeError`. Closing again does nothing.

        Close the client before its event loop ends (``async with`` does): once the loop is closed, asyncio
        can no longer close the connections; they are then left to the garbage collector, which warns.
        """
        self._closed = True
        if self._loop is not None and self._loop.is_closed():
            return
        self._closing.set()
        for channel in self._channels:
            channel.shut()

    async def _pause_unless_closed(self, seconds: float) -> None:
        """Wait ``seconds`` before a retry, or until the client is closed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    # --- unary calls -----------------------------------------------------------------------------

    async def create(
        self,
        items: Iterable[Item | tuple[str, int, float | Decimal]],
        *,
        total_amount: float | Decimal = 0.0,
        currency_code: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Order:
        """Create an order; ``total_amount`` 0 lets the server compute it, ``currency_code`` "" is USD.

        ``request_id`` is the idempotency key: the same key and request return the original order. The
        default is a fresh version-7 UUID: time-ordered, so the server's index of keys grows at its end.
        The client's own retries reuse it; to retry yourself after an error (``DeadlineExceeded``, say),
        pass the error's ``request_id``.
        """
        key = request_id or new_id()
        request = CreateOrderRequest(
            items=[_order_item(item) for item in items],
            total_amount=total_amount,
            currency_code=currency_code,
            request_id=key,
        )
        try:
            response = await self._unary(lambda stub: stub.create_order, request, timeout, retry=True)
        except OrderError as error:
            error.request_id = key
            raise
        return _the_order(response)

    async def get(self, order_id: str, *, timeout: float | None = None) -> Order:
        """The order with this id."""
        request = GetOrderRequest(id=order_id)
        return _the_order(await self._unary(lambda stub: stub.get_order, request, timeout, retry=True))

    async def update_status(
        self, order_id: str, status: OrderStatus, *, expected_version: int = 0, timeout: float | None = None
    ) -> Order:
        """Move an order to ``status``; with ``expected_version`` the change applies only to that version."""
        request = UpdateOrderStatusRequest(id=order_id, status=status, expected_version=expected_version)
        response = await self._unary(
            lambda stub: stub.update_order_status, request, timeout, retry=not expected_version
        )
        return _the_order(response)

    async def cancel(self, order_id: str, *, expected_version: int = 0, timeout: float | None = None) -> Order:
        """Cancel an order (cancelling a cancelled order is a no-op)."""
        request = CancelOrderRequest(id=order_id, expected_version=expected_version)
        response = await self._unary(lambda stub: stub.cancel_order, request, timeout, retry=not expected_version)
        return _the_order(response)

    async def list_page(
        self,
        *,
        statuses: Iterable[OrderStatus] = (),
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> ListOrdersResponse:
        """One page of orders, oldest first; pass its ``next_page_token`` for the next."""
        request = ListOrdersRequest(page_size=page_size, page_token=page_token, statuses=list(statuses))
        return await self._unary(lambda stub: stub.list_orders, request, timeout, retry=True)

    def list(
        self, *, statuses: Iterable[OrderStatus] = (), page_size: int = 0, timeout: float | None = None
    ) -> AsyncGenerator[Order, None]:
        """Every order (optionally only in ``statuses``), oldest first, fetching pages as needed; orders
        created meanwhile come too, at the end. Arguments are checked at once, before any page is fetched."""
        wanted = list(statuses)
        check_request(ListOrdersRequest(page_size=page_size, statuses=wanted))
        _check_timeout(timeout)
        self._check_open()
        return self._list(wanted, page_size, timeout)

    async def _list(
        self, wanted: list[OrderStatus], page_size: int, timeout: float | None
    ) -> AsyncGenerator[Order, None]:
        token = ""
        while True:
            page = await self.list_page(statuses=wanted, page_size=page_size, page_token=token, timeout=timeout)
            for order in page.orders:
                yield order
            token = page.next_page_token
            if not token:
                return

    async def _unary(
        self,
        method: Callable[[OrderServiceStub], Callable[..., Awaitable[R]]],
        request: object,
        timeout: float | None,
        *,
        retry: bool,
    ) -> R:
        """Send ``request`` with ``method`` of the current target's stub and retry it as the class docstring
        says, within one deadline: if ``retry`` (it is safe to repeat), or else only while connections are
        refused, which proves that it was never sent."""
        _check_timeout(timeout)
        check_request(request)  # type: ignore[arg-type]  # every request is a generated message
        timeout = self.timeout if timeout is None else timeout
        deadline = Deadline.from_timeout(timeout) if timeout is not None else None
        attempts = max(self.retry.attempts, len(self.targets))
        for attempt in range(1, attempts + 1):
            index = self._current
            started = time.monotonic()
            try:
                return await method(self._stubs[index])(request, deadline=deadline)
            except _TRANSPORT_ERRORS as exc:
                needs_tls = await self._tls_refusal(index, exc, deadline)
                error = self._failed(index, exc, needs_tls)
                if isinstance(error, DeadlineExceeded) and not _heard_from(self._channels[index], since=started):
                    self._move_on(index, "heard nothing before the call's deadline")
                safe = retry or isinstance(exc, _NEVER_SENT)
                mendable = needs_tls is None and _is_retryable(error, exc)
                retryable = safe and mendable and attempt < attempts and not self._closed
                delay = self._pause(attempt)
                if not retryable or (deadline is not None and deadline.time_remaining() <= delay + MIN_ATTEMPT_SECONDS):
                    raise error from exc
                await self._pause_unless_closed(delay)
                if self._closed:
                    raise Unavailable("the client was closed while the call was waiting to retry") from exc
                if deadline is not None and deadline.time_remaining() <= 0:  # the pause overran (a loaded machine)
                    raise error from exc  # what kept the call from succeeding, not an attempt without time
        raise AssertionError("unreachable")

    def _failed(self, index: int, exc: BaseException, error: OrderError | None = None) -> OrderError:
        """The error for ``exc`` raised by a call to target ``index``; if it is UNAVAILABLE, later calls go to
        the next target (unless a concurrent call has already moved the client on)."""
        if self._closed and not isinstance(exc, GRPCError):
            return Unavailable("the client was closed while the call was in flight")
        error = error or _as_error(exc)
        if isinstance(error, Unavailable):
            self._move_on(index, f"is unavailable ({error})")
        return error

    async def _tls_refusal(
        self, index: int, exc: BaseException, deadline: Deadline | None = None
    ) -> Unavailable | None:
        """UNAVAILABLE saying to connect with TLS if ``exc`` is a plaintext connection to target ``index`` closed
        before the server said anything (what a TLS server does with plaintext HTTP/2) and the target completes
        a TLS handshake (within ``deadline``, if given); no retry mends that. None otherwise: an outage."""
        lost_unheard = isinstance(exc, StreamTerminatedError) and str(exc) == _CONNECTION_LOST
        if self.tls or self._closed or not lost_unheard or _heard_from(self._channels[index]):
            return None
        seconds = TLS_CHECK_SECONDS if deadline is None else min(TLS_CHECK_SECONDS, deadline.time_remaining())
        if not await _speaks_tls(*self._addresses[index], seconds):
            return None
        return Unavailable(
            f"the server at {self.targets[index]} closed the connection before speaking HTTP/2: it serves TLS,"
            " and this client connected without it; connect with TLS (ca_file or tls=True; --ca-file or --tls"
            " on the command line)"
        )

    def _move_on(self, index: int, why: str) -> None:
        """Have later calls go to the target after ``index`` (unless a concurrent call has already moved the
        client on, or there is no other)."""
        if self._current == index and len(self.targets) > 1:
            self._current = (index + 1) % len(self.targets)
            log.info("%s %s; moving on to %s", self.targets[index], why, self.target)

    def _pause(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed attempts in a row: none while some target is still
        untried in this round, else full-jitter backoff by the number of rounds."""
        rounds, untried = divmod(failures, len(self.targets))
        return 0.0 if untried else self.retry.delay(min(rounds, 32))

    # --- streaming -------------------------------------------------------------------------------

    def watch(
        self,
        order_ids: Iterable[str] = (),
        *,
        after_sequence: int | None = None,
        heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS,
        heartbeats: bool = False,
        reconnect: bool = True,
        give_up_after: float | None = 60.0,
    ) -> AsyncGenerator[StatusUpdate, None]:
        """Status updates for ``order_ids`` (empty = all orders), oldest first, forever.

        ``after_sequence`` None means live only; N replays every retained update after N first.
        When the connection drops or the server goes away, the watch reconnects (to the next target, if
        there are several; with backoff once each has failed) and resumes after the last sequence it saw
        (heartbeats count), so nothing is missed or repeated.
        The server sends a heartbeat after ``heartbeat_seconds`` N quiet seconds (default 15; 0: none), and
        a stream that hears nothing for 3 N seconds is taken as lost too.
        It raises :class:`Unavailable` once attempts have failed in a row for ``give_up_after`` seconds
        (None: keep trying), or at the first failure when ``reconnect`` is False (but a refused connection
        still moves on to each other target: the watch had not begun); a TLS set-up that no retry can mend
        (an untrusted certificate, a TLS server reached without TLS) fails at once. The watch ends when the
        client is closed.

        Heartbeats are used for resuming; with ``heartbeats`` True they are yielded too, as updates with an
        empty ``order_id`` whose ``sequence`` is how far the watch has read the log. A consumer that saves its
        cursor to resume later should save these as well: while its orders are quiet, the log's retention
        would otherwise overtake a cursor taken from their last update (OUT_OF_RANGE on resuming). The first
        heartbeat also tells that the server has registered the watch: every change from then on will come.

        Arguments are checked at once, before the watch is iterated.
        """
        if isinstance(order_ids, str):
            raise TypeError("order_ids must be an iterable of order ids, not a str: watch([order_id]) for one order")
        _check_seconds(give_up_after, "give_up_after", none_means="keep trying", zero=True)
        ids = list(order_ids)
        check_request(
            OrderStatusStreamRequest(order_ids=ids, after_sequence=after_sequence, heartbeat_seconds=heartbeat_seconds)
        )
        self._check_open()
        return self._watch(ids, after_sequence, heartbeat_seconds, heartbeats, reconnect, give_up_after)

    async def _watch(
        self,
        ids: list[str],
        cursor: int | None,
        heartbeat_seconds: int,
        heartbeats: bool,
        reconnect: bool,
        give_up_after: float | None,
    ) -> AsyncGenerator[StatusUpdate, None]:
        def request() -> OrderStatusStreamRequest:  # resuming after the cursor
            return OrderStatusStreamRequest(order_ids=ids, after_sequence=cursor, heartbeat_seconds=heartbeat_seconds)

        loop = asyncio.get_running_loop()
        silence_limit = SILENT_HEARTBEATS * heartbeat_seconds if heartbeat_seconds > 0 else None
        failing_since: float | None = None  # when the failures in a row began
        failures = 0
        while not self._closed:
            index = self._current
            channel = self._stubs[index].channel
            try:
                # grpclib's own call rather than the generated stub's generator, which leaves the call it wraps
                # to the garbage collector: leaving this block (the watch closed, or a break) resets the stream
                # at once, so the server's watch slot is free before the caller makes its next call.
                async with channel.request(
                    WATCH_METHOD, Cardinality.UNARY_STREAM, OrderStatusStreamRequest, StatusUpdate
                ) as call:
                    await call.send_message(request(), end=True)
                    async with contextlib.aclosing(_heard_within(call, silence_limit)) as updates:
                        async for update in updates:
                            failures, failing_since = 0, None
                            cursor = update.sequence
                            if update.order_id or heartbeats:
                                yield update
            except (_Silence, *_TRANSPORT_ERRORS) as exc:
                lost = None
                if isinstance(exc, _Silence):  # a dead connection: the next call on this target opens a new one
                    self._channels[index].close()
                    lost = Unavailable(f"nothing arrived for {silence_limit} s")
                needs_tls = await self._tls_refusal(index, exc)
                error = self._failed(index, exc, lost or needs_tls)
                if self._closed:
                    return
                now = loop.time()
                failing_since = now if failing_since is None else failing_since
                gave_up = give_up_after is not None and now - failing_since > give_up_after
                untried = isinstance(exc, _NEVER_SENT) and failures + 1 < len(self.targets)  # refused: it never began
                mendable = needs_tls is None and _is_retryable(error, exc)
                if not ((reconnect or untried) and mendable) or gave_up:
                    raise error from exc
                failures += 1
                log.info("watch on %s interrupted (%s); resuming after sequence %s", self.targets[index], error, cursor)
                pause = self._pause(failures)
                if give_up_after is not None:  # one more attempt at the end, not a pause past it
                    pause = min(pause, max(0.0, failing_since + give_up_after - now))
                await self._pause_unless_closed(pause)
            else:
                if not reconnect:
                    return


class _Silence(Exception):
    """A stream heard nothing, not even a heartbeat, for longer than its limit."""


async def _heard_within(stream: AsyncIterator[R], limit: float | None) -> AsyncGenerator[R, None]:
    """``stream``'s messages, raising _Silence once ``limit`` seconds pass without one (None: no limit).

    Each wait has its own timeout: the caller may take the messages from different tasks (``wait_for``
    runs each in a task of its own), and a timeout belongs to the task that entered it.
    """
    messages = aiter(stream)
    while True:
        try:
            async with asyncio.timeout(limit) as waiting:
                message = await anext(messages)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if waiting.expired():
                raise _Silence from None
            raise
        yield message
