"""The async client library: ``OrderClient``.

    async with OrderClient("localhost:50051") as orders:
        order = await orders.create([Item("Laptop", 1, 1000.00)])
        async for update in orders.watch([order.id]):
            ...

Replicas: give several targets (``OrderClient(["db1:50051", "db2:50051"])`` or ``"db1:50051,db2:50051"``),
servers sharing one database. Calls go to the current target; a failure that is safe to retry moves on
to the next target (round-robin) at once, so a dead replica costs one failed attempt, not the deadline,
and ``watch()`` resumes on the next replica after the last sequence it saw (sequences are global).

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
gRPC status name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from grpclib.client import Channel
from grpclib.events import SendRequest, listen
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import Deadline

from orders._proto.orders.v1 import (
    CancelOrderRequest,
    CreateOrderRequest,
    GetOrderRequest,
    ListOrdersRequest,
    ListOrdersResponse,
    Order,
    OrderItem,
    OrderServiceStub,
    OrderStatus,
    OrderStatusStreamRequest,
    StatusUpdate,
    UpdateOrderStatusRequest,
)
from orders.auth import add_token, check_token, client_ssl_context, is_loopback, keep_headers_out_of_logs
from orders.domain import new_id
from orders.errors import DeadlineExceeded, OrderError, Unavailable, error_for

R = TypeVar("R")

log = logging.getLogger(__name__)

DEFAULT_TARGET = "localhost:50051"
_HOST = re.compile(r"\[[\w:.%]+\]|[\w.:-]+")  # a name, an IPv4 address, or an IPv6 one (in brackets)


@dataclass(frozen=True, slots=True)
class Item:
    """An item to order: product name, quantity and unit price in currency units."""

    product_name: str
    quantity: int
    price: float


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry calls that are safe to repeat."""

    attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff before retry number ``attempt`` (1-based)."""
        return random.uniform(0, min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1)))


def parse_target(target: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into host and port."""
    host, sep, port = target.rpartition(":")
    if not (sep and port.isdigit() and 0 < int(port) < 65536 and _HOST.fullmatch(host)):
        raise ValueError(f"target must look like host:port (port 1-65535), got {target!r}")
    return host.strip("[]"), int(port)


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """The targets in ``"h1:1,h2:2"`` or ``["h1:1", "h2:2"]``, stripped, each checked by :func:`parse_target`."""
    listed = targets.split(",") if isinstance(targets, str) else list(targets)
    if not listed or not all(isinstance(t, str) for t in listed):
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
    return Unavailable(f"cannot reach the server: {exc}")


_TRANSPORT_ERRORS = (GRPCError, StreamTerminatedError, ConnectionError, OSError)
# A retry is not started with less time left than this: it would end in DEADLINE_EXCEEDED, hiding the
# error that made the call retry (a server that is down answers a connection attempt in well under it).
MIN_ATTEMPT_SECONDS = 0.05


class OrderClient:
    """An async client of the orders service; use it as ``async with OrderClient(target) as c``.

    ``target``: ``host:port``, or several replicas (servers on one database) as a sequence of them or one
    comma-separated string; each is checked up front (:class:`ValueError`). ``targets`` is the tuple of
    them, ``target`` the one calls go to now. Each target has its own channel, connected when first used.
    A call that fails in a way safe to retry is retried on the next target (round-robin), immediately,
    with backoff only once every target has failed in a row; a retryable call makes at least one attempt
    per target. UNAVAILABLE from any call, retried or not, moves the client on to the next target.

    ``token``: a bearer token, sent as ``authorization: Bearer <token>`` metadata on every call; a server
    started with ``--token`` refuses calls without it (:class:`orders.errors.Unauthenticated`). Without TLS
    the token crosses the network in clear text, so give a CA or ``tls=True`` for any remote server.

    ``ca_file``: path of a PEM file of CA certificates; turns TLS on and verifies the server against them.
    ``tls``: ``True`` turns TLS on with the system trust store; an :class:`ssl.SSLContext` is used as given
    (offer ALPN ``h2`` in it). Both off (the default): plaintext HTTP/2. ``token`` and TLS apply to every
    target; each server's certificate must name its target's host. TLS failures (untrusted certificate,
    plaintext server) raise :class:`orders.errors.Unavailable` promptly.
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
    ) -> None:
        self.targets = parse_targets(target)
        self.timeout = timeout
        self.retry = retry
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
        self._channels = tuple(Channel(host, port, ssl=context) for host, port in addresses)
        if token is not None:
            for channel in self._channels:
                listen(channel, SendRequest, add_token(token))  # every call, unary and streaming
        self._stubs = tuple(OrderServiceStub(channel) for channel in self._channels)
        self._current = 0  # index of the target calls go to now

    @property
    def target(self) -> str:
        """The target calls go to now: the first, until a failure moves the client on to the next."""
        return self.targets[self._current]

    @property
    def _stub(self) -> OrderServiceStub:
        """The current target's stub."""
        return self._stubs[self._current]

    async def __aenter__(self) -> OrderClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every target's connection; open streams end."""
        for channel in self._channels:
            channel.close()

    # --- unary calls -----------------------------------------------------------------------------

    async def create(
        self,
        items: Iterable[Item | tuple[str, int, float]],
        *,
        total_amount: float = 0.0,
        currency_code: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Order:
        """Create an order; ``total_amount`` 0 lets the server compute it, ``currency_code`` "" is USD.

        ``request_id`` is the idempotency key: the same key and request return the original order. The
        default is a fresh version-7 UUID: time-ordered, so the server's index of keys grows at its end.
        """
        request = CreateOrderRequest(
            items=[
                OrderItem(product_name=i[0], quantity=i[1], price=i[2])
                if isinstance(i, tuple)
                else OrderItem(product_name=i.product_name, quantity=i.quantity, price=i.price)
                for i in items
            ],
            total_amount=total_amount,
            currency_code=currency_code,
            request_id=request_id or new_id(),
        )
        response = await self._unary(lambda stub: stub.create_order, request, timeout, retry=True)
        return response.order

    async def get(self, order_id: str, *, timeout: float | None = None) -> Order:
        """The order with this id."""
        response = await self._unary(lambda stub: stub.get_order, GetOrderRequest(id=order_id), timeout, retry=True)
        return response.order

    async def update_status(
        self, order_id: str, status: OrderStatus, *, expected_version: int = 0, timeout: float | None = None
    ) -> Order:
        """Move an order to ``status``; with ``expected_version`` the change applies only to that version."""
        request = UpdateOrderStatusRequest(id=order_id, status=status, expected_version=expected_version)
        response = await self._unary(
            lambda stub: stub.update_order_status, request, timeout, retry=not expected_version
        )
        return response.order

    async def cancel(self, order_id: str, *, expected_version: int = 0, timeout: float | None = None) -> Order:
        """Cancel an order (cancelling a cancelled order is a no-op)."""
        request = CancelOrderRequest(id=order_id, expected_version=expected_version)
        response = await self._unary(lambda stub: stub.cancel_order, request, timeout, retry=not expected_version)
        return response.order

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

    async def list(
        self, *, statuses: Iterable[OrderStatus] = (), page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[Order]:
        """Every order (optionally only in ``statuses``), oldest first, fetching pages as needed."""
        wanted = list(statuses)
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
        """Send ``request`` with ``method`` of the current target's stub; if ``retry``, retry it as the
        class docstring says, within one deadline."""
        timeout = self.timeout if timeout is None else timeout
        deadline = Deadline.from_timeout(timeout) if timeout else None
        attempts = max(self.retry.attempts, len(self.targets)) if retry else 1
        for attempt in range(1, attempts + 1):
            index = self._current
            try:
                return await method(self._stubs[index])(request, deadline=deadline)
            except _TRANSPORT_ERRORS as exc:
                error = self._failed(index, exc)
                retryable = isinstance(error, Unavailable) and attempt < attempts
                delay = self._pause(attempt)
                if not retryable or (deadline is not None and deadline.time_remaining() <= delay + MIN_ATTEMPT_SECONDS):
                    raise error from exc
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _failed(self, index: int, exc: BaseException) -> OrderError:
        """The error for ``exc`` raised by a call to target ``index``; if it is UNAVAILABLE, later calls go to
        the next target (unless a concurrent call has already moved the client on)."""
        error = _as_error(exc)
        if isinstance(error, Unavailable) and self._current == index and len(self.targets) > 1:
            self._current = (index + 1) % len(self.targets)
            log.info("%s is unavailable (%s); moving on to %s", self.targets[index], error, self.target)
        return error

    def _pause(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed attempts in a row: none while some target is still
        untried in this round, else full-jitter backoff by the number of rounds."""
        rounds, untried = divmod(failures, len(self.targets))
        return 0.0 if untried else self.retry.delay(min(rounds, 32))

    # --- streaming -------------------------------------------------------------------------------

    async def watch(
        self,
        order_ids: Iterable[str] = (),
        *,
        after_sequence: int | None = None,
        heartbeat_seconds: int = 0,
        reconnect: bool = True,
        give_up_after: float | None = 60.0,
    ) -> AsyncIterator[StatusUpdate]:
        """Status updates for ``order_ids`` (empty = all orders), oldest first, forever.

        ``after_sequence`` None means live only; N replays every retained update after N first.
        When the connection drops or the server goes away, the watch reconnects (to the next target, if
        there are several; with backoff once each has failed) and resumes after the last sequence it saw
        (heartbeats count), so nothing is missed or repeated.
        It raises :class:`Unavailable` once nothing has arrived for ``give_up_after`` seconds of
        failed attempts (None: keep trying), or at the first failure when ``reconnect`` is False.
        Heartbeats are used for resuming and not yielded.
        """
        ids = list(order_ids)
        cursor = after_sequence
        loop = asyncio.get_running_loop()
        last_alive = loop.time()
        failures = 0
        while True:
            request = OrderStatusStreamRequest(
                order_ids=ids, after_sequence=cursor, heartbeat_seconds=heartbeat_seconds
            )
            index = self._current
            try:
                async for update in self._stubs[index].order_status_stream(request):
                    failures, last_alive = 0, loop.time()
                    cursor = update.sequence
                    if update.order_id:
                        yield update
            except _TRANSPORT_ERRORS as exc:
                error = self._failed(index, exc)
                gave_up = give_up_after is not None and loop.time() - last_alive > give_up_after
                if not (reconnect and isinstance(error, Unavailable)) or gave_up:
                    raise error from exc
                failures += 1
                log.info("watch on %s interrupted (%s); resuming after sequence %s", self.targets[index], error, cursor)
                await asyncio.sleep(self._pause(failures))
            else:
                if not reconnect:
                    return
