"""The public test harness for code that uses the orders service.

* :func:`serve` runs a real server on a temporary database and yields a connected
  :class:`~orders.client.OrderClient` (like ``grpclib.testing.ChannelFor``, but over a real socket).
* :func:`temporary_database` makes a fresh, empty database: a temporary SQLite file, or, when
  ``ORDERS_TEST_DATABASE`` holds a PostgreSQL URL, a new database on that server, dropped afterwards.
* Hypothesis strategies for valid and invalid requests.
* :class:`OrderStateMachine`, a stateful model of the service to check it (or a fork of it) against.

Needs the ``test`` extra (hypothesis).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, multiple, precondition, rule

from orders import domain
from orders._proto.orders.v1 import CreateOrderRequest, Order, OrderItem, OrderStatus, StatusUpdate
from orders.client import Item, OrderClient
from orders.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, OrderError
from orders.server import OrderServer, ServerConfig

__all__ = [
    "OrderStateMachine",
    "create_requests",
    "currencies",
    "invalid_create_requests",
    "items",
    "prices",
    "product_names",
    "running_server",
    "serve",
    "temporary_database",
]

T = TypeVar("T")

DATABASE_ENV = "ORDERS_TEST_DATABASE"


@contextlib.contextmanager
def temporary_database(server: str | None = None) -> Iterator[str]:
    """The URL of a fresh, empty database, deleted afterwards.

    ``server`` (default: ``$ORDERS_TEST_DATABASE``, else ``sqlite``) is ``sqlite`` for a file in a temporary
    directory, or the URL of any database on a PostgreSQL server (``postgresql://postgres@127.0.0.1:5432/test``)
    to create a new database there, named ``orders_test_…``, and drop it afterwards: its user needs the
    CREATEDB privilege, and the server must be PostgreSQL 13 or newer.
    """
    server = server or os.environ.get(DATABASE_ENV) or "sqlite"
    if urllib.parse.urlsplit(server).scheme not in ("postgres", "postgresql") and server != "sqlite":
        raise ValueError(
            f"a temporary database is made on 'sqlite' (a temporary file) or on a PostgreSQL server given as "
            f"postgresql://user@host:port/db, not on {server!r}"
        )
    if server == "sqlite":
        with tempfile.TemporaryDirectory(prefix="orders-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'orders.db'}"
        return
    import psycopg  # the ``postgres`` extra
    from psycopg import sql

    name = f"orders_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(_libpq_url(server), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urllib.parse.urlsplit(server)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(_libpq_url(server), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _libpq_url(url: str) -> str:
    """A playhouse ``postgres(ql)://`` URL as libpq reads it (it knows only the ``postgresql`` scheme)."""
    return urllib.parse.urlsplit(url)._replace(scheme="postgresql").geturl()


@contextlib.asynccontextmanager
async def running_server(db: str | None = None, **config: Any) -> AsyncIterator[OrderServer]:
    """A started :class:`OrderServer` on 127.0.0.1 and a free port (``server.port``), on ``db`` or else a
    :func:`temporary_database`. ``config``: any other :class:`~orders.config.ServerConfig` field
    (``token``, ``retention_events``, ``max_message_bytes``, …)."""
    if "port" in config:
        raise TypeError("running_server() picks a free port itself (server.port); it takes no port")
    with contextlib.ExitStack() as stack:
        url = db or stack.enter_context(temporary_database())
        async with OrderServer(ServerConfig(port=0, db=url, **config)) as server:
            yield server


@contextlib.asynccontextmanager
async def serve(
    db: str | None = None, *, token: str | None = None, **client_options: Any
) -> AsyncIterator[OrderClient]:
    """Run a real server (on ``db``, else a :func:`temporary_database`) and yield a client connected to it.

    ``token``: the server requires it and the client sends it. ``client_options``: any other
    :class:`~orders.client.OrderClient` argument (``timeout``, ``retry``)."""
    async with (
        running_server(db, token=token) as server,
        OrderClient(f"127.0.0.1:{server.port}", token=token, **client_options) as client,
    ):
        yield client


# --- hypothesis strategies -----------------------------------------------------------------------


def product_names() -> st.SearchStrategy[str]:
    """Valid product names: 1-200 characters, something visible, no control characters, line breaks or
    noncharacters."""
    return st.text(
        st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=domain.MAX_NAME_LENGTH
    ).filter(_is_valid_product_name)


def _is_valid_product_name(name: str) -> bool:
    try:
        domain.validate_product_name(name, "")
    except InvalidArgument:
        return False
    return True


def prices(max_cents: int = 10**8) -> st.SearchStrategy[float]:
    """Valid unit prices: whole numbers of cents, up to ``max_cents``."""
    largest = domain.MAX_PRICE_UNITS * domain.CENTS_PER_UNIT
    if not 0 <= max_cents <= largest:
        raise ValueError(f"max_cents must be from 0 to {largest:_}, the largest valid price in cents")
    return st.integers(0, max_cents).map(domain.to_units)


def items(max_quantity: int = 1_000) -> st.SearchStrategy[Item]:
    """Valid items; with the default bounds, totals small enough that any few of them form a valid order."""
    if not 1 <= max_quantity <= domain.MAX_QUANTITY:
        raise ValueError(f"max_quantity must be from 1 to {domain.MAX_QUANTITY}, the largest valid quantity")
    return st.builds(Item, product_names(), st.integers(1, max_quantity), prices())


def currencies() -> st.SearchStrategy[str]:
    """Valid currency codes, including "" (USD)."""
    return st.sampled_from(["", "USD", "EUR", "GBP", "JPY"])


def create_requests() -> st.SearchStrategy[CreateOrderRequest]:
    """Valid CreateOrderRequests (total_amount 0: computed by the server)."""
    return st.builds(
        lambda its, currency: CreateOrderRequest(
            items=[OrderItem(product_name=i.product_name, quantity=i.quantity, price=i.price) for i in its],
            currency_code=currency,
        ),
        st.lists(items(), min_size=1, max_size=5),
        currencies(),
    )


def _with_item(request: CreateOrderRequest, **changes: object) -> CreateOrderRequest:
    first = request.items[0]
    item = OrderItem(
        product_name=changes.get("product_name", first.product_name),  # type: ignore[arg-type]
        quantity=changes.get("quantity", first.quantity),  # type: ignore[arg-type]
        price=changes.get("price", first.price),  # type: ignore[arg-type]
    )
    return CreateOrderRequest(items=[item, *request.items[1:]], currency_code=request.currency_code)


def _computed_total(request: CreateOrderRequest) -> float:
    cents = sum(i.quantity * domain.to_cents(i.price, "price") for i in request.items)
    return domain.to_units(cents)


def invalid_create_requests() -> st.SearchStrategy[CreateOrderRequest]:
    """CreateOrderRequests that break exactly one validation rule (INVALID_ARGUMENT)."""
    printable = st.characters(blacklist_categories=("Cc", "Cs"))
    bad_name = st.one_of(
        st.just(""),
        st.text(" \t", min_size=1, max_size=5),
        st.text(printable, min_size=domain.MAX_NAME_LENGTH + 1, max_size=domain.MAX_NAME_LENGTH + 20).filter(str.strip),
        st.builds(
            lambda a, c: "x" + a + c, st.text(printable, max_size=5), st.characters(whitelist_categories=("Cc",))
        ),
    )
    bad_quantity = st.one_of(st.integers(-(2**31), 0), st.integers(domain.MAX_QUANTITY + 1, 2**31 - 1))
    bad_price = st.one_of(
        st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.01, 0.001, 1.005, 10.0**12 + 1]),
        st.floats(max_value=-0.01, allow_nan=False),
    )
    bad_currency = st.one_of(
        st.sampled_from(["usd", "US", "USDX", "12A", "€€€"]),
        st.text(min_size=1).filter(lambda c: not (len(c) == 3 and c.isascii() and c.isupper() and c.isalpha())),
    )
    base = create_requests()
    return st.one_of(
        st.just(CreateOrderRequest()),
        st.builds(_with_item, base, product_name=bad_name),
        st.builds(_with_item, base, quantity=bad_quantity),
        st.builds(_with_item, base, price=bad_price),
        st.builds(lambda r, c: CreateOrderRequest(items=r.items, currency_code=c), base, bad_currency),
        st.builds(lambda r: CreateOrderRequest(items=r.items, total_amount=_computed_total(r) + 0.01), base),
    )


# --- the stateful model --------------------------------------------------------------------------


@dataclass
class ModelOrder:
    """What the model expects of one order."""

    id: str
    total_cents: int
    currency_code: str
    item_names: list[str]
    status: domain.Status = domain.Status.PENDING
    version: int = 1


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # each example starts a server
class OrderStateMachine(RuleBasedStateMachine):
    """Drives random create/update/cancel/get/list sequences through :class:`OrderClient` against a
    real server and checks every reply, and the contents of a watch stream, against an in-memory model.

    Run it with ``TestOrders = OrderStateMachine.TestCase``; to change how much it runs, keep its settings
    as the parent: ``TestOrders.settings = settings(TestOrders.settings, max_examples=50)``. Each example
    gets a fresh server on a fresh :func:`temporary_database` (``ORDERS_TEST_DATABASE`` picks SQLite or
    PostgreSQL); override :meth:`connect` to drive another server.
    """

    orders = Bundle("orders")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        try:
            self.client: OrderClient = self._run(self.stack.enter_async_context(self.connect()))
        except BaseException:
            self.loop.close()
            raise
        self.model: dict[str, ModelOrder] = {}
        self.created: list[str] = []
        self.expected_events: list[tuple[str, domain.Status | None, domain.Status]] = []
        self.seen: list[StatusUpdate] = []
        self.request_ids: dict[str, tuple[CreateOrderRequest, str]] = {}
        self.watcher = self.loop.create_task(self._watch())

    def connect(self) -> contextlib.AbstractAsyncContextManager[OrderClient]:
        """A client of the service to check, which must start with no orders and no events, for one example
        (default: :func:`serve`, a new server on a new temporary database)."""
        return serve()

    async def _watch(self) -> None:
        async for update in self.client.watch(after_sequence=0):
            self.seen.append(update)

    def _run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        """Stop the watch and the server, and close the example's event loop, whatever fails."""
        try:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                self._run(self.watcher)  # raises the watch's own error, if it had one
        finally:
            try:
                self._run(self.stack.aclose())
            finally:
                self.loop.close()

    # --- rules ---------------------------------------------------------------------------------

    @rule(target=orders, request=create_requests(), key=st.none() | st.integers(0, 3))
    def create(self, request: CreateOrderRequest, key: int | None) -> str:
        """A create without a request_id, or with one of a few, which may already have made an order."""
        request_id = "" if key is None else f"key-{key}"
        if request_id in self.request_ids:
            first_request, order_id = self.request_ids[request_id]
            if _fingerprint(first_request) != _fingerprint(request):
                with _raises(AlreadyExists):
                    self._run(self._create(request, request_id))
                return multiple()
            assert self._run(self._create(request, request_id)).id == order_id
            return multiple()
        order = self._run(self._create(request, request_id))
        new = domain.validate_new_order(
            [(i.product_name, i.quantity, i.price) for i in request.items], 0, request.currency_code
        )
        expected = ModelOrder(order.id, new.total_cents, new.currency_code, [i.product_name for i in new.items])
        self._check(order, expected)
        assert order.create_time == order.update_time
        self.model[order.id] = expected
        self.created.append(order.id)
        self.expected_events.append((order.id, None, domain.Status.PENDING))
        if request_id:
            self.request_ids[request_id] = (request, order.id)
        return order.id

    @precondition(lambda self: bool(self.request_ids))
    @rule(data=st.data())
    def create_again(self, data: st.DataObject) -> None:
        """The same create sent again under its request_id (a retry): the original order, unchanged."""
        request_id = data.draw(st.sampled_from(sorted(self.request_ids)), label="request_id")
        request, order_id = self.request_ids[request_id]
        order = self._run(self._create(request, request_id))
        assert order.id == order_id
        self._check(order, self.model[order_id])

    async def _create(self, request: CreateOrderRequest, request_id: str) -> Order:
        items = [Item(i.product_name, i.quantity, i.price) for i in request.items]
        return await self.client.create(
            items, total_amount=request.total_amount, currency_code=request.currency_code, request_id=request_id or None
        )

    @rule(request=invalid_create_requests())
    def create_invalid(self, request: CreateOrderRequest) -> None:
        with _raises(InvalidArgument):
            self._run(self._create(request, ""))

    @rule(order_id=orders, target_status=st.sampled_from(domain.Status), stale=st.booleans())
    def update(self, order_id: str, target_status: domain.Status, stale: bool) -> None:
        self._change(order_id, target_status, stale, cancel=False)

    @rule(order_id=orders, stale=st.booleans())
    def cancel(self, order_id: str, stale: bool) -> None:
        self._change(order_id, domain.Status.CANCELLED, stale, cancel=True)

    def _change(self, order_id: str, target: domain.Status, stale: bool, *, cancel: bool) -> None:
        expected = self.model[order_id]
        version = expected.version + 1 if stale else expected.version
        if cancel:
            call = self.client.cancel(order_id, expected_version=version)
        else:
            call = self.client.update_status(order_id, OrderStatus(target), expected_version=version)
        if stale:
            with _raises(Aborted):
                self._run(call)
            return
        if target != expected.status and target not in domain.ALLOWED_TRANSITIONS[expected.status]:
            with _raises(FailedPrecondition):
                self._run(call)
            return
        order = self._run(call)
        if target != expected.status:
            self.expected_events.append((order_id, expected.status, target))
            expected.status = target
            expected.version += 1
        self._check(order, expected)

    @rule(order_id=orders)
    def get(self, order_id: str) -> None:
        self._check(self._run(self.client.get(order_id)), self.model[order_id])

    @rule()
    def get_unknown(self) -> None:
        with _raises(NotFound):
            self._run(self.client.get(domain.new_id()))

    @rule(statuses=st.sets(st.sampled_from(domain.Status), max_size=3), page_size=st.integers(1, 7))
    def list_all(self, statuses: set[domain.Status], page_size: int) -> None:
        async def collect() -> list[Order]:
            wanted = [OrderStatus(s) for s in statuses]
            return [o async for o in self.client.list(statuses=wanted, page_size=page_size)]

        listed = self._run(collect())
        expected = [i for i in self.created if not statuses or self.model[i].status in statuses]
        assert [o.id for o in listed] == expected
        for order in listed:
            self._check(order, self.model[order.id])

    @rule(data=st.data())
    def watch_replay(self, data: st.DataObject) -> None:
        """A second stream: replay after a random point, optionally filtered, must match the model."""
        after = data.draw(st.integers(0, len(self.expected_events)), label="after_sequence")
        ids = data.draw(
            st.lists(st.sampled_from(self.created), unique=True, max_size=3) if self.created else st.just([])
        )
        expected = [e for e in self.expected_events[after:] if not ids or e[0] in ids]

        async def replay() -> list[StatusUpdate]:
            received: list[StatusUpdate] = []
            if not expected:
                return received
            async for update in self.client.watch(ids, after_sequence=after):
                received.append(update)
                if len(received) == len(expected):
                    break
            return received

        received = self._run(asyncio.wait_for(replay(), 5))
        assert [_event_of(u) for u in received] == expected
        assert all(u.sequence > after for u in received)
        assert [u.sequence for u in received] == sorted({u.sequence for u in received})

    # --- checks --------------------------------------------------------------------------------

    @invariant()
    def stream_matches_the_model(self) -> None:
        async def caught_up() -> None:
            while len(self.seen) < len(self.expected_events):
                if self.watcher.done():
                    self.watcher.result()  # raises the watch's error
                    raise AssertionError("the watch ended")
                await asyncio.sleep(0.002)

        self._run(asyncio.wait_for(caught_up(), 5))
        assert [u.sequence for u in self.seen] == list(range(1, len(self.seen) + 1))
        assert [_event_of(u) for u in self.seen] == self.expected_events

    @staticmethod
    def _check(order: Order, expected: ModelOrder) -> None:
        assert order.id == expected.id
        assert domain.Status(order.status) == expected.status
        assert order.version == expected.version
        assert domain.to_cents(order.total_amount, "total") == expected.total_cents
        assert order.currency_code == expected.currency_code
        assert [i.product_name for i in order.items] == expected.item_names
        assert order.update_time >= order.create_time


def _event_of(update: StatusUpdate) -> tuple[str, domain.Status | None, domain.Status]:
    previous = domain.Status(update.previous_status) if update.previous_status else None
    return update.order_id, previous, domain.Status(update.status)


def _fingerprint(request: CreateOrderRequest) -> str:
    items = [(i.product_name, i.quantity, i.price) for i in request.items]
    return domain.validate_new_order(items, request.total_amount, request.currency_code).fingerprint()


@contextlib.contextmanager
def _raises(error: type[OrderError]) -> Iterator[None]:
    try:
        yield
    except error:
        return
    raise AssertionError(f"expected {error.__name__}")
