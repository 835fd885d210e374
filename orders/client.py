"""The async client library: ``OrderClient``.

    async with OrderClient("localhost:50051") as orders:
        order = await orders.create([Item("Laptop", 1, 1000.00)])
        async for update in orders.watch([order.id]):
            ...

Security: ``token="…"`` sends ``authorization: Bearer …`` with every call (streams included);
``ca_file="ca.pem"`` turns TLS on and trusts that CA, ``tls=True`` turns TLS on with the system
trust store, and ``tls=`` an :class:`ssl.SSLContext` uses that context as it is:

    async with OrderClient("orders.example.com:443", token=os.environ["ORDERS_TOKEN"], ca_file="ca.pem") as c:
        ...

Every call has a deadline (``timeout``, default 10 s, shared by its retries). Calls that are safe to
repeat are retried with exponential backoff when the server is unreachable or UNAVAILABLE: reads,
creates (each carries a ``request_id``, generated when not given, so a retry never makes a second
order), and status changes without ``expected_version`` (setting a status twice is a no-op). Every
failure is raised as an :class:`orders.errors.OrderError` subclass carrying the gRPC status name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
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
from orders.errors import DeadlineExceeded, OrderError, Unavailable, error_for

R = TypeVar("R")

log = logging.getLogger(__name__)

DEFAULT_TARGET = "localhost:50051"


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
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"target must look like host:port, got {target!r}")
    return host.strip("[]"), int(port)


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


class OrderClient:
    """An async client of the orders service; use it as ``async with OrderClient(target) as c``.

    ``token``: a bearer token, sent as ``authorization: Bearer <token>`` metadata on every call; a server
    started with ``--token`` refuses calls without it (:class:`orders.errors.Unauthenticated`). Without TLS
    the token crosses the network in clear text, so give a CA or ``tls=True`` for any remote server.

    ``ca_file``: path of a PEM file of CA certificates; turns TLS on and verifies the server against them.
    ``tls``: ``True`` turns TLS on with the system trust store; an :class:`ssl.SSLContext` is used as given
    (offer ALPN ``h2`` in it). Both off (the default): plaintext HTTP/2. The server's certificate must name
    the target's host. TLS failures (untrusted certificate, plaintext server) raise
    :class:`orders.errors.Unavailable` promptly.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        tls: bool | ssl.SSLContext = False,
        timeout: float | None = 10.0,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry
        host, port = parse_target(target)
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
            if context is None and not is_loopback(host):
                log.warning("sending a bearer token to %s without TLS: it can be read on the network", target)
        self._channel = Channel(host, port, ssl=context)
        if token is not None:
            listen(self._channel, SendRequest, add_token(token))  # every call, unary and streaming
        self._stub = OrderServiceStub(self._channel)

    async def __aenter__(self) -> OrderClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; open streams end."""
        self._channel.close()

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

        ``request_id`` is the idempotency key: the same key and request return the original order.
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
            request_id=request_id or str(uuid.uuid4()),
        )
        response = await self._unary(self._stub.create_order, request, timeout, retry=True)
        return response.order

    async def get(self, order_id: str, *, timeout: float | None = None) -> Order:
        """The order with this id."""
        response = await self._unary(self._stub.get_order, GetOrderRequest(id=order_id), timeout, retry=True)
        return response.order

    async def update_status(
        self, order_id: str, status: OrderStatus, *, expected_version: int = 0, timeout: float | None = None
    ) -> Order:
        """Move an order to ``status``; with ``expected_version`` the change applies only to that version."""
        request = UpdateOrderStatusRequest(id=order_id, status=status, expected_version=expected_version)
        response = await self._unary(self._stub.update_order_status, request, timeout, retry=not expected_version)
        return response.order

    async def cancel(self, order_id: str, *, expected_version: int = 0, timeout: float | None = None) -> Order:
        """Cancel an order (cancelling a cancelled order is a no-op)."""
        request = CancelOrderRequest(id=order_id, expected_version=expected_version)
        response = await self._unary(self._stub.cancel_order, request, timeout, retry=not expected_version)
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
        return await self._unary(self._stub.list_orders, request, timeout, retry=True)

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
        self, method: Callable[..., Awaitable[R]], request: object, timeout: float | None, *, retry: bool
    ) -> R:
        timeout = self.timeout if timeout is None else timeout
        deadline = Deadline.from_timeout(timeout) if timeout else None
        attempts = self.retry.attempts if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                return await method(request, deadline=deadline)
            except _TRANSPORT_ERRORS as exc:
                error = _as_error(exc)
                retryable = isinstance(error, Unavailable) and attempt < attempts
                delay = self.retry.delay(attempt)
                if not retryable or (deadline is not None and deadline.time_remaining() <= delay):
                    raise error from exc
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

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
        When the connection drops or the server goes away, the watch reconnects with backoff and
        resumes after the last sequence it saw (heartbeats count), so nothing is missed or repeated.
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
            try:
                async for update in self._stub.order_status_stream(request):
                    failures, last_alive = 0, loop.time()
                    cursor = update.sequence
                    if update.order_id:
                        yield update
            except _TRANSPORT_ERRORS as exc:
                error = _as_error(exc)
                gave_up = give_up_after is not None and loop.time() - last_alive > give_up_after
                if not (reconnect and isinstance(error, Unavailable)) or gave_up:
                    raise error from exc
                failures += 1
                log.info("watch on %s interrupted (%s); reconnecting after sequence %s", self.target, error, cursor)
                await asyncio.sleep(self.retry.delay(min(failures, 10)))
            else:
                if not reconnect:
                    return
