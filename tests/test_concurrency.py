"""Many clients racing on one order over real sockets: one winner per change, consistent versions and
event log, optimistic concurrency, and idempotent creates under contention."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from orders._proto.orders.v1 import (
    CancelOrderRequest,
    CreateOrderRequest,
    GetOrderRequest,
    ListOrdersRequest,
    Order,
    OrderItem,
    OrderServiceStub,
    OrderStatus,
    UpdateOrderStatusRequest,
)
from orders.client import Item
from orders.errors import DeadlineExceeded
from orders.server import OrderServer

CLIENTS = 20

ALLOWED = {
    OrderStatus.PENDING: {OrderStatus.CONFIRMED, OrderStatus.CANCELLED},
    OrderStatus.CONFIRMED: {OrderStatus.SHIPPED, OrderStatus.CANCELLED},
    OrderStatus.SHIPPED: {OrderStatus.DELIVERED, OrderStatus.CANCELLED},
    OrderStatus.DELIVERED: set(),
    OrderStatus.CANCELLED: set(),
}


@pytest.fixture
async def stubs(server: OrderServer) -> AsyncIterator[list[OrderServiceStub]]:
    """One connection per simulated client."""
    channels = [Channel("127.0.0.1", server.port) for _ in range(CLIENTS)]
    try:
        yield [OrderServiceStub(channel) for channel in channels]
    finally:
        for channel in channels:
            channel.close()


async def outcome(call: Awaitable[object]) -> Order | Status:
    """The order a call returned, or the status code it failed with."""
    try:
        response = await asyncio.wait_for(call, 15)
    except GRPCError as exc:
        return exc.status
    order = response if isinstance(response, Order) else response.order  # type: ignore[attr-defined]
    assert order is not None
    return order


async def create(stub: OrderServiceStub, **fields: object) -> Order:
    request = CreateOrderRequest(items=[OrderItem(product_name="Widget", quantity=3, price=9.99)], **fields)
    response = await asyncio.wait_for(stub.create_order(request), 10)
    return response.order


async def advance(stub: OrderServiceStub, order_id: str, *statuses: OrderStatus) -> Order:
    order = None
    for status in statuses:
        order = (await stub.update_order_status(UpdateOrderStatusRequest(id=order_id, status=status))).order
    assert order is not None
    return order


async def events_of(server: OrderServer, order_id: str) -> list[tuple[OrderStatus, OrderStatus]]:
    page = await server.storage.read(server.storage.repository.events_after, 0, (order_id,), 10_000)
    return [(OrderStatus(e.previous or 0), OrderStatus(e.status)) for e in page.events]


def update(stub: OrderServiceStub, order_id: str, status: OrderStatus, expected_version: int = 0) -> Awaitable[object]:
    if status == OrderStatus.CANCELLED and expected_version % 2:  # exercise CancelOrder as well
        return stub.cancel_order(CancelOrderRequest(id=order_id, expected_version=expected_version))
    return stub.update_order_status(
        UpdateOrderStatusRequest(id=order_id, status=status, expected_version=expected_version)
    )


async def test_terminal_race_has_exactly_one_winner(server, stubs):
    """From SHIPPED, DELIVERED and CANCELLED are both allowed and both terminal: whoever commits first
    wins, the others asking for the same status get the no-op OK, the rest FAILED_PRECONDITION."""
    order = await create(stubs[0])
    order = await advance(stubs[0], order.id, OrderStatus.CONFIRMED, OrderStatus.SHIPPED)
    assert order.version == 3
    targets = [OrderStatus.DELIVERED if i % 2 else OrderStatus.CANCELLED for i in range(CLIENTS)]
    results = await asyncio.gather(
        *(outcome(update(stub, order.id, t)) for stub, t in zip(stubs, targets, strict=True))
    )

    final = (await stubs[0].get_order(GetOrderRequest(id=order.id))).order
    assert final.status in (OrderStatus.DELIVERED, OrderStatus.CANCELLED)
    assert final.version == 4, "exactly one change was made"
    for target, result in zip(targets, results, strict=True):
        if target == final.status:
            assert isinstance(result, Order), f"{target.name}: {result}"
            assert (result.status, result.version, result.update_time) == (final.status, 4, final.update_time)
        else:
            assert result == Status.FAILED_PRECONDITION, f"{target.name} after {final.status.name}: {result}"
    log = await events_of(server, order.id)
    assert log[3:] == [(OrderStatus.SHIPPED, final.status)]
    assert len(log) == 4


async def test_racing_transitions_are_serialisable(server, stubs):
    """SHIPPED vs CANCELLED from CONFIRMED: SHIPPED -> CANCELLED is itself allowed, so the history is
    either CONFIRMED -> CANCELLED or CONFIRMED -> SHIPPED -> CANCELLED; every reply must fit it."""
    order = await create(stubs[0])
    order = await advance(stubs[0], order.id, OrderStatus.CONFIRMED)
    targets = [OrderStatus.SHIPPED if i % 2 else OrderStatus.CANCELLED for i in range(CLIENTS)]
    results = await asyncio.gather(
        *(outcome(update(stub, order.id, t)) for stub, t in zip(stubs, targets, strict=True))
    )

    log = await events_of(server, order.id)
    assert log[:2] == [(OrderStatus.UNSPECIFIED, OrderStatus.PENDING), (OrderStatus.PENDING, OrderStatus.CONFIRMED)]
    history = [OrderStatus.CONFIRMED] + [status for _, status in log[2:]]
    assert history in (
        [OrderStatus.CONFIRMED, OrderStatus.CANCELLED],
        [OrderStatus.CONFIRMED, OrderStatus.SHIPPED, OrderStatus.CANCELLED],
    )
    assert all(previous == history[i] for i, (previous, _) in enumerate(log[2:])), (
        "each event starts where the last ended"
    )

    final = (await stubs[0].get_order(GetOrderRequest(id=order.id))).order
    assert final.status == OrderStatus.CANCELLED
    assert final.version == 2 + len(history) - 1, "one version per real change"

    # Replay the replies against the history: version v of the order has status history[v - 2].
    for target, result in zip(targets, results, strict=True):
        if isinstance(result, Order):
            assert result.status == target
            assert history[result.version - 2] == target, (target, result.version, history)
        else:
            assert result == Status.FAILED_PRECONDITION, (target, result)
            # refused: at the moment it ran, the order was in a state that does not allow target
            assert any(target != s and target not in ALLOWED[s] for s in history), (target, history)
    # every change in the history was made (and answered) by one of the racing requests
    assert {(r.version, r.status) for r in results if isinstance(r, Order)} == {
        (2 + i, status) for i, status in enumerate(history) if i
    }
    shipped_ok = sum(
        1 for t, r in zip(targets, results, strict=True) if t == OrderStatus.SHIPPED and isinstance(r, Order)
    )
    assert (shipped_ok > 0) == (OrderStatus.SHIPPED in history)


async def test_each_step_of_a_life_has_one_winner_among_many_clients(server, stubs):
    """All clients push the order along PENDING -> CONFIRMED -> SHIPPED -> DELIVERED at once, step by
    step: each step commits once, and every other request for that step is the no-op OK."""
    order = await create(stubs[0])
    for step, status in enumerate((OrderStatus.CONFIRMED, OrderStatus.SHIPPED, OrderStatus.DELIVERED), start=2):
        results = await asyncio.gather(*(outcome(update(stub, order.id, status)) for stub in stubs))
        assert all(isinstance(r, Order) for r in results), results
        assert {(r.status, r.version, r.update_time) for r in results} == {(status, step, results[0].update_time)}
    log = await events_of(server, order.id)
    assert [s for _, s in log] == [
        OrderStatus.PENDING,
        OrderStatus.CONFIRMED,
        OrderStatus.SHIPPED,
        OrderStatus.DELIVERED,
    ]


@pytest.mark.parametrize("mixed_targets", [False, True])
async def test_same_expected_version_exactly_one_succeeds(server, stubs, mixed_targets):
    order = await create(stubs[0])
    targets = [OrderStatus.CANCELLED if mixed_targets and i % 2 else OrderStatus.CONFIRMED for i in range(CLIENTS)]
    results = await asyncio.gather(
        *(outcome(update(stub, order.id, t, expected_version=1)) for stub, t in zip(stubs, targets, strict=True))
    )
    winners = [(t, r) for t, r in zip(targets, results, strict=True) if isinstance(r, Order)]
    assert len(winners) == 1, results
    [(target, won)] = winners
    assert (won.status, won.version) == (target, 2)
    assert [r for r in results if not isinstance(r, Order)] == [Status.ABORTED] * (CLIENTS - 1)
    final = (await stubs[0].get_order(GetOrderRequest(id=order.id))).order
    assert final == won
    assert await events_of(server, order.id) == [
        (OrderStatus.UNSPECIFIED, OrderStatus.PENDING),
        (OrderStatus.PENDING, target),
    ]


async def test_concurrent_creates_with_one_request_id_make_one_order(server, stubs):
    request_id = str(uuid.uuid4())
    results = await asyncio.gather(*(outcome(create(stub, request_id=request_id)) for stub in stubs))
    assert all(isinstance(r, Order) for r in results), results
    assert len({r.id for r in results}) == 1
    assert all(r == results[0] for r in results), "every reply is the one original order"
    listed = (await stubs[0].list_orders(ListOrdersRequest(page_size=1000))).orders
    assert [o.id for o in listed] == [results[0].id]
    assert await events_of(server, results[0].id) == [(OrderStatus.UNSPECIFIED, OrderStatus.PENDING)]


async def test_concurrent_creates_with_distinct_request_ids_all_succeed_once(server, stubs):
    request_ids = [str(uuid.uuid4()) for _ in range(CLIENTS)]
    # every client sends every request id, in a different order
    calls = [
        outcome(create(stub, request_id=request_ids[(i + shift) % CLIENTS]))
        for i, stub in enumerate(stubs)
        for shift in range(0, CLIENTS, 7)
    ]
    results = await asyncio.gather(*calls)
    assert all(isinstance(r, Order) for r in results), results
    listed = (await stubs[0].list_orders(ListOrdersRequest(page_size=1000))).orders
    assert len(listed) == CLIENTS
    assert {r.id for r in results} == {o.id for o in listed}


async def test_concurrent_reads_each_get_their_own_order_or_not_found(server, stubs):
    """GetOrders arriving together are read in batches (one statement each); each still gets its own answer."""
    repository = server.storage.repository
    batches: list[int] = []
    get_orders = repository.get_orders

    def counting(order_ids: list[str]) -> list:
        batches.append(len(order_ids))
        return get_orders(order_ids)

    repository.get_orders = counting
    created = [await create(stubs[0]) for _ in range(5)]
    unknown_ids = [str(uuid.uuid4()) for _ in range(2)]
    asked = [order.id for order in created] + unknown_ids
    calls = [
        (order_id, outcome(stub.get_order(GetOrderRequest(id=order_id))))
        for i, stub in enumerate(stubs)
        for order_id in asked[i % len(asked) :] + asked[: i % len(asked)]
    ]
    results = await asyncio.gather(*(call for _, call in calls))
    expected = {order.id: order for order in created} | {order_id: Status.NOT_FOUND for order_id in unknown_ids}
    assert results == [expected[order_id] for order_id, _ in calls]
    assert sum(batches) == len(calls) and max(batches) > 1


async def test_conflicting_request_id_reuse_under_contention(server, stubs):
    """The same request_id with two different requests: one wins, the other request's callers get
    ALREADY_EXISTS, and there is exactly one order."""
    request_id = str(uuid.uuid4())

    def create_variant(stub: OrderServiceStub, quantity: int) -> Awaitable[object]:
        request = CreateOrderRequest(
            items=[OrderItem(product_name="Widget", quantity=quantity, price=1.0)], request_id=request_id
        )
        return stub.create_order(request)

    results = await asyncio.gather(*(outcome(create_variant(stub, 1 + i % 2)) for i, stub in enumerate(stubs)))
    orders = [r for r in results if isinstance(r, Order)]
    assert orders and len({o.id for o in orders}) == 1
    quantity = orders[0].items[0].quantity
    for i, result in enumerate(results):
        if 1 + i % 2 == quantity:
            assert isinstance(result, Order) and result.id == orders[0].id, result
        else:
            assert result == Status.ALREADY_EXISTS, result
    listed = (await stubs[0].list_orders(ListOrdersRequest(page_size=1000))).orders
    assert [o.id for o in listed] == [orders[0].id]


async def test_writes_abandoned_by_their_callers_leave_the_writer_serving(client) -> None:
    """Creates whose deadline expires while queued for the group-commit writer are dropped or completed,
    never half-done, and the writer keeps serving: later writes succeed and every acknowledged one is there."""
    async def hurried(i: int) -> str | None:
        try:
            return (await client.create([Item(f"rushed {i}", 1, 1.0)], timeout=0.03)).id
        except DeadlineExceeded:
            return None

    acknowledged = [order_id for order_id in await asyncio.gather(*(hurried(i) for i in range(200))) if order_id]
    after = await client.create([Item("after the rush", 1, 1.0)])
    stored = {order.id async for order in client.list(page_size=1000)}
    assert after.id in stored
    assert set(acknowledged) <= stored
    for order_id in stored - set(acknowledged) - {after.id}:  # ran, but the caller had gone: still whole
        order = await client.get(order_id)
        assert order.version == 1 and len(order.items) == 1 and order.total_amount == 1.0
