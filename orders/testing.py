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
from datetime import datetime
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
    CREATEDB privilege, and the server must be PostgreSQL 14 or newer.
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
        yield _with_database(server, name)
    finally:
        with psycopg.connect(_libpq_url(server), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _libpq_url(url: str) -> str:
    """A playhouse ``postgres(ql)://`` URL as libpq reads it (it knows only the ``postgresql`` scheme)."""
    return "postgresql" + url[url.index(":") :]  # not urlsplit's round trip: it makes postgresql:///db postgresql:/db


def _with_database(url: str, name: str) -> str:
    """``url`` naming the database ``name`` on the same server, with the same parameters."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/{name}" + (f"?{parts.query}" if parts.query else "")


@contextlib.asynccontextmanager
async def running_server(db: str | None = None, **config: Any) -> AsyncIterator[OrderServer]:
    """A started :class:`OrderServer` in this process, on a free port (``server.port``) of ``host`` (by
    default 127.0.0.1), on ``db`` or else a :func:`temporary_database`. ``config``: any other
    :class:`~orders.config.ServerConfig` field of one server (``token``, ``retention_events``,
    ``max_message_bytes``, …); not ``port``, nor what only ``orders serve`` does (``workers``, and the
    ``log_level``/``log_format`` of the process's logging, which is the test's to set up)."""
    if "port" in config:
        raise TypeError("running_server() picks a free port itself (server.port); it takes no port")
    if refused := sorted(set(config) & {"workers", "log_level", "log_format"}):
        raise TypeError(f"running_server() runs one server in this process; it takes no {', '.join(refused)}")
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
    """Valid CreateOrderRequests (total_amount 0: computed by the server; no request_id)."""
    return st.builds(_create_request, st.lists(items(), min_size=1, max_size=5), currencies())


def _create_request(its: list[Item], currency_code: str) -> CreateOrderRequest:
    order_items = [OrderItem(product_name=i.product_name, quantity=i.quantity, price=i.price) for i in its]
    return CreateOrderRequest(items=order_items, currency_code=currency_code)


def _with_item(request: CreateOrderRequest, position: int, **changes: object) -> CreateOrderRequest:
    """``request`` with the item at ``position`` (modulo their number) changed."""
    index = position % len(request.items)
    item = request.items[index]
    changed = OrderItem(
        product_name=changes.get("product_name", item.product_name),  # type: ignore[arg-type]
        quantity=changes.get("quantity", item.quantity),  # type: ignore[arg-type]
        price=changes.get("price", item.price),  # type: ignore[arg-type]
    )
    items = [*request.items[:index], changed, *request.items[index + 1 :]]
    return CreateOrderRequest(items=items, currency_code=request.currency_code)


def _priciest(quantity: int) -> CreateOrderRequest:
    """An order of one item at the largest valid price: valid, unless ``quantity`` makes its total too large."""
    return CreateOrderRequest(
        items=[OrderItem(product_name="Gold", quantity=quantity, price=float(domain.MAX_PRICE_UNITS))]
    )


def _computed_total(request: CreateOrderRequest) -> float:
    cents = sum(i.quantity * domain.to_cents(i.price, "price") for i in request.items)
    return domain.to_units(cents)


INVISIBLE = " \u200b\u2060\u0301\u20dd"  # a space, format characters (Cf) and combining marks (Mn, Me)


def invalid_create_requests() -> st.SearchStrategy[CreateOrderRequest]:
    """CreateOrderRequests that break exactly one validation rule (INVALID_ARGUMENT), any of them: no items
    or too many; a product name empty, too long, with nothing visible, or with a forbidden character; a
    quantity or price out of range, or a price of fractional cents; an order total too large or not the
    items' sum; a malformed currency code or request_id. The broken item may be any of the order's."""
    printable = st.characters(blacklist_categories=("Cc", "Cs"))
    control = st.characters(whitelist_categories=("Cc",))
    forbidden_in_name = control | st.sampled_from("\u2028\u2029\ufdd0\uffff\U0010ffff")
    base = create_requests()
    position = st.integers(0, 4)

    def item(**changes: st.SearchStrategy[object]) -> st.SearchStrategy[CreateOrderRequest]:
        return st.builds(_with_item, base, position, **changes)

    rules = [  # one branch a rule, so that each is drawn about as often
        st.just(CreateOrderRequest()),  # no items
        base.map(lambda r: CreateOrderRequest(items=[r.items[0]] * (domain.MAX_ITEMS + 1))),
        item(product_name=st.just("") | st.text(" \t", min_size=1, max_size=5)),
        item(  # a valid name, padded past the limit
            product_name=st.builds(
                lambda name, extra: (name + "x" * domain.MAX_NAME_LENGTH)[: domain.MAX_NAME_LENGTH + 1 + extra],
                product_names(),
                st.integers(0, 19),
            )
        ),
        item(product_name=st.text(st.sampled_from(INVISIBLE), min_size=1, max_size=5).filter(str.strip)),
        item(product_name=st.builds(lambda a, c: "x" + a + c, st.text(printable, max_size=5), forbidden_in_name)),
        item(quantity=st.integers(-(2**31), 0) | st.integers(domain.MAX_QUANTITY + 1, 2**31 - 1)),
        item(price=st.sampled_from([float("nan"), float("inf"), float("-inf")])),
        item(price=st.floats(max_value=-0.01, allow_nan=False)),
        item(price=st.sampled_from([0.001, 1.005, 19.999])),  # fractional cents
        item(price=st.just(float(domain.MAX_PRICE_UNITS) + 1), quantity=st.just(1)),  # not a too large total too
        st.builds(_priciest, st.integers(domain.MAX_TOTAL_UNITS // domain.MAX_PRICE_UNITS + 1, domain.MAX_QUANTITY)),
        st.builds(
            lambda r, c: CreateOrderRequest(items=r.items, currency_code=c),
            base,
            st.sampled_from(["usd", "US", "USDX", "12A", "€€€"])
            | st.text(min_size=1).filter(lambda c: not (len(c) == 3 and c.isascii() and c.isupper() and c.isalpha())),
        ),
        st.builds(lambda r: CreateOrderRequest(items=r.items, total_amount=_computed_total(r) + 0.01), base),
        st.builds(
            lambda r, key: CreateOrderRequest(items=r.items, request_id=key),
            base,
            st.text("abc-123", min_size=domain.MAX_REQUEST_ID_LENGTH + 1, max_size=domain.MAX_REQUEST_ID_LENGTH + 10),
        ),
        st.builds(
            lambda r, key: CreateOrderRequest(items=r.items, request_id=key),
            base,
            st.builds(lambda a, c: "key-" + a + c, st.text("abc", max_size=3), control),
        ),
    ]
    return st.one_of(rules)


# --- the stateful model --------------------------------------------------------------------------


@dataclass
class ModelOrder:
    """What the model expects of one order."""

    id: str
    items: list[tuple[str, int, int]]  # (product name, quantity, unit price in cents), in request order
    total_cents: int
    currency_code: str
    create_time: datetime
    update_time: datetime
    status: domain.Status = domain.Status.PENDING
    version: int = 1


FORWARD = {  # the next step of an order on its way to delivery
    domain.Status.PENDING: domain.Status.CONFIRMED,
    domain.Status.CONFIRMED: domain.Status.SHIPPED,
    domain.Status.SHIPPED: domain.Status.DELIVERED,
}
STREAM_PATIENCE = 2.0  # seconds the watch may go without a new update while it still owes some


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # each example starts a server
class OrderStateMachine(RuleBasedStateMachine):
    """Drives random create/update/cancel/get/list sequences through :class:`OrderClient` against a
    real server and checks every reply, and the contents of a watch stream, against an in-memory model.

    Orders are taken along the whole state machine (PENDING → CONFIRMED → SHIPPED → DELIVERED, and
    cancelled on the way), with stale and current ``expected_version``s and transitions that are not
    allowed. A failed check raises AssertionError saying what was expected and what came.

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
            else:  # a retry: the order the first request made, as it is now
                _check(self._run(self._create(request, request_id)), self.model[order_id])
            return multiple()
        order = self._run(self._create(request, request_id))
        new = domain.validate_new_order(
            [(i.product_name, i.quantity, i.price) for i in request.items], 0, request.currency_code
        )
        expected_items = [(i.product_name, i.quantity, i.price_cents) for i in new.items]
        expected = ModelOrder(
            order.id, expected_items, new.total_cents, new.currency_code, order.create_time, order.create_time
        )
        _check(order, expected)
        self.model[order.id] = expected
        self.created.append(order.id)
        self.expected_events.append((order.id, None, domain.Status.PENDING))
        if request_id:
            self.request_ids[request_id] = (request, order.id)
        return order.id

    @precondition(lambda self: bool(self.request_ids))
    @rule(data=st.data())
    def create_again(self, data: st.DataObject) -> None:
        """The same create sent again under its request_id (a retry): the original order, as it is now."""
        request_id = data.draw(st.sampled_from(sorted(self.request_ids)), label="request_id")
        request, order_id = self.request_ids[request_id]
        _check(self._run(self._create(request, request_id)), self.model[order_id])

    async def _create(self, request: CreateOrderRequest, request_id: str) -> Order:
        items = [Item(i.product_name, i.quantity, i.price) for i in request.items]
        return await self.client.create(
            items, total_amount=request.total_amount, currency_code=request.currency_code, request_id=request_id or None
        )

    @rule(request=invalid_create_requests())
    def create_invalid(self, request: CreateOrderRequest) -> None:
        with _raises(InvalidArgument):
            self._run(self._create(request, request.request_id))

    @rule(order_id=orders, steps=st.integers(1, 3))
    def advance(self, order_id: str, steps: int) -> None:
        """Take an order up to ``steps`` steps towards DELIVERED (one that has ended stays put: refused)."""
        for _ in range(steps):
            target = FORWARD.get(self.model[order_id].status, domain.Status.DELIVERED)
            self._change(order_id, target, self.model[order_id].version, cancel=False)

    @rule(order_id=orders, status=st.sampled_from(domain.Status), any_version=st.booleans())
    def update(self, order_id: str, status: domain.Status, any_version: bool) -> None:
        """Any status, allowed or not, at the current version or with none (0: any)."""
        self._change(order_id, status, 0 if any_version else self.model[order_id].version, cancel=False)

    @rule(order_id=orders, any_version=st.booleans())
    def cancel(self, order_id: str, any_version: bool) -> None:
        self._change(order_id, domain.Status.CANCELLED, 0 if any_version else self.model[order_id].version, cancel=True)

    @rule(order_id=orders, data=st.data(), cancel=st.booleans())
    def change_stale(self, order_id: str, data: st.DataObject, cancel: bool) -> None:
        """A change at a version the order is not at, older or newer: ABORTED, whatever the status."""
        version = self.model[order_id].version
        stale = st.integers(version + 1, version + 5)
        stale_version = data.draw(stale | st.integers(1, version - 1) if version > 1 else stale, label="stale")
        target = domain.Status.CANCELLED if cancel else data.draw(st.sampled_from(domain.Status), label="target")
        self._change(order_id, target, stale_version, cancel=cancel)

    def _change(self, order_id: str, target: domain.Status, version: int, *, cancel: bool) -> None:
        expected = self.model[order_id]
        if cancel:
            call = self.client.cancel(order_id, expected_version=version)
        else:
            call = self.client.update_status(order_id, OrderStatus(target), expected_version=version)
        if version not in (0, expected.version):
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
            _expect(order.update_time >= expected.update_time, f"{order_id}: update_time moves on with a change")
            expected.update_time = order.update_time
        _check(order, expected)

    @rule(order_id=orders)
    def get(self, order_id: str) -> None:
        _check(self._run(self.client.get(order_id)), self.model[order_id])

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
        _expect_equal([o.id for o in listed], expected, f"ids listed with statuses {sorted(statuses)}")
        for order in listed:
            _check(order, self.model[order.id])

    @rule(data=st.data())
    def watch_replay(self, data: st.DataObject) -> None:
        """A second stream: replay after a random point of the log (as the first stream saw it, gaps in the
        numbering allowed), optionally filtered, must match the model."""
        self.stream_matches_the_model()  # so the first stream has seen every event, with its sequence
        start = data.draw(st.integers(0, len(self.expected_events)), label="events before the replay")
        after = self.seen[start - 1].sequence if start else 0
        ids = data.draw(
            st.lists(st.sampled_from(self.created), unique=True, max_size=3) if self.created else st.just([])
        )
        expected = [e for e in self.expected_events[start:] if not ids or e[0] in ids]

        async def replay() -> list[StatusUpdate]:
            received: list[StatusUpdate] = []
            if not expected:
                return received
            updates = self.client.watch(ids, after_sequence=after)
            try:
                while len(received) < len(expected):
                    received.append(await asyncio.wait_for(anext(updates), STREAM_PATIENCE))
            except TimeoutError:
                pass  # said below, with what did come
            finally:
                await updates.aclose()
            return received

        received = self._run(replay())
        what = f"a replay after sequence {after} of orders {ids or 'all'}"
        _expect_equal([_event_of(u) for u in received], expected, what)
        _expect(all(u.sequence > after for u in received), f"{what}: every sequence after {after}")
        _expect([u.sequence for u in received] == sorted({u.sequence for u in received}), f"{what}: in order")

    # --- checks --------------------------------------------------------------------------------

    @invariant()
    def stream_matches_the_model(self) -> None:
        """The first stream has received every event so far, each once, in order (it may wait for them:
        up to STREAM_PATIENCE seconds without a new one)."""

        async def caught_up() -> None:
            loop = asyncio.get_running_loop()
            heard, last_heard = len(self.seen), loop.time()
            while len(self.seen) < len(self.expected_events):
                if self.watcher.done():
                    self.watcher.result()  # raises the watch's error
                    raise AssertionError("the watch ended")
                if len(self.seen) > heard:
                    heard, last_heard = len(self.seen), loop.time()
                elif loop.time() - last_heard > STREAM_PATIENCE:
                    return  # said below, with what did come
                await asyncio.sleep(0.002)

        self._run(caught_up())
        _expect_equal([_event_of(u) for u in self.seen], self.expected_events, "the events the watch received")
        sequences = [u.sequence for u in self.seen]
        _expect(sequences == sorted(set(sequences)) and all(n > 0 for n in sequences), f"rising sequences: {sequences}")


def _check(order: Order, expected: ModelOrder) -> None:
    """``order`` is what the model expects, or AssertionError saying what differs."""
    got = (
        order.id,
        domain.Status(order.status),
        order.version,
        [(i.product_name, i.quantity, domain.to_cents(i.price, "price")) for i in order.items],
        domain.to_cents(order.total_amount, "total_amount"),
        order.currency_code,
        order.create_time,
        order.update_time,
    )
    wanted = (
        expected.id,
        expected.status,
        expected.version,
        expected.items,
        expected.total_cents,
        expected.currency_code,
        expected.create_time,
        expected.update_time,
    )
    _expect_equal(got, wanted, f"order {expected.id} (id, status, version, items, total, currency, create, update)")
    item_ids = [i.id for i in order.items]
    _expect(all(item_ids) and len(set(item_ids)) == len(item_ids), f"order {expected.id}: item ids {item_ids}")


def _expect(condition: bool, what: str) -> None:
    """AssertionError unless ``condition`` (kept under ``python -O``, which drops asserts)."""
    if not condition:
        raise AssertionError(f"expected {what}")


def _expect_equal(got: object, wanted: object, what: str) -> None:
    if got != wanted:
        raise AssertionError(f"{what}:\n  expected {wanted!r}\n  got      {got!r}")


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
    except OrderError as other:
        raise AssertionError(f"expected {error.__name__}, got {type(other).__name__}: {other.message}") from other
    raise AssertionError(f"expected {error.__name__}, but the call succeeded")
