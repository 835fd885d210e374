"""ListOrders over a real socket against a real server: paging, filters, and its error-table rows."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from orders import Item
from orders._proto.orders.v1 import (
    CreateOrderRequest,
    GetOrderRequest,
    ListOrdersRequest,
    ListOrdersResponse,
    Order,
    OrderItem,
    OrderServiceStub,
    OrderStatus,
    UpdateOrderStatusRequest,
)
from orders.client import OrderClient

PENDING, CONFIRMED, SHIPPED = OrderStatus.PENDING, OrderStatus.CONFIRMED, OrderStatus.SHIPPED
DELIVERED, CANCELLED = OrderStatus.DELIVERED, OrderStatus.CANCELLED


async def create(stub: OrderServiceStub, name: str = "Widget") -> Order:
    response = await stub.create_order(CreateOrderRequest(items=[OrderItem(product_name=name, quantity=1, price=1.0)]))
    assert response.order is not None
    return response.order


async def create_many(stub: OrderServiceStub, count: int) -> list[Order]:
    """``count`` orders, created one after another so their creation order is known."""
    return [await create(stub, f"order {i}") for i in range(count)]


async def create_fast(client: OrderClient, count: int, batch: int = 250) -> None:
    """``count`` orders, created concurrently in batches (creation order not tracked)."""
    for start in range(0, count, batch):
        chunk = range(start, min(start + batch, count))
        await asyncio.gather(*(client.create([Item(f"bulk {i}", 1, 0.5)]) for i in chunk))


async def update(stub: OrderServiceStub, order_id: str, status: OrderStatus) -> Order:
    response = await stub.update_order_status(UpdateOrderStatusRequest(id=order_id, status=status))
    assert response.order is not None
    return response.order


async def page(
    stub: OrderServiceStub, size: int = 0, token: str = "", statuses: list[int] | None = None
) -> ListOrdersResponse:
    request = ListOrdersRequest(page_size=size, page_token=token, statuses=statuses or [])  # type: ignore[arg-type]
    return await stub.list_orders(request)


async def every_page(stub: OrderServiceStub, size: int, statuses: list[int] | None = None) -> list[list[Order]]:
    pages, token = [], ""
    while True:
        response = await page(stub, size, token, statuses)
        pages.append(response.orders)
        token = response.next_page_token
        if not token:
            return pages


async def fails(call: object, status: Status, *fragments: str) -> GRPCError:
    with pytest.raises(GRPCError) as info:
        await call  # type: ignore[misc]
    error = info.value
    assert error.status is status, f"expected {status.name}, got {error.status.name}: {error.message}"
    for fragment in fragments:
        assert fragment in (error.message or ""), f"{fragment!r} not in {error.message!r}"
    return error


def ids(orders: list[Order]) -> list[str]:
    return [o.id for o in orders]


def forged(payload: object) -> str:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# --- basics ------------------------------------------------------------------------------------


async def test_empty_database(stub: OrderServiceStub) -> None:
    response = await page(stub)
    assert response.orders == []
    assert response.next_page_token == ""


async def test_oldest_first_and_equal_to_get(stub: OrderServiceStub) -> None:
    created = await create_many(stub, 7)
    await update(stub, created[3].id, CONFIRMED)  # a change does not move an order in the list
    response = await page(stub)
    assert ids(response.orders) == ids(created)
    assert response.next_page_token == ""
    for listed in response.orders:
        got = await stub.get_order(GetOrderRequest(id=listed.id))
        assert got.order == listed  # whole messages, timestamps included


async def test_paging_visits_every_order_once_in_creation_order(stub: OrderServiceStub) -> None:
    created = await create_many(stub, 10)
    pages = await every_page(stub, 3)
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    assert [o.id for p in pages for o in p] == ids(created)


async def test_last_page_exactly_full_has_no_token(stub: OrderServiceStub) -> None:
    created = await create_many(stub, 6)
    first = await page(stub, 3)
    assert first.next_page_token
    second = await page(stub, 3, first.next_page_token)
    assert ids(second.orders) == ids(created[3:])
    assert second.next_page_token == ""  # no empty third page


async def test_a_page_of_large_orders_stops_short_of_4_mib_and_continues_on_the_next(stub: OrderServiceStub) -> None:
    """Six valid orders of 1,000 items with 200-character names (0.8 MB each): a default page of all six would
    be 5 MB, which gRPC clients refuse by default (grpcio: "Received message larger than max")."""
    large = [OrderItem(product_name=f"{i:03}" + "🍕" * 197, quantity=1, price=1.0) for i in range(1_000)]
    created = [(await stub.create_order(CreateOrderRequest(items=large))).order for _ in range(6)]
    replies, token = [], ""
    while True:
        reply = await page(stub, 0, token)
        replies.append(reply)
        if not (token := reply.next_page_token):
            break
    assert all(len(bytes(reply)) <= 4 * 1024 * 1024 for reply in replies)
    assert [len(reply.orders) for reply in replies] == [4, 2]
    assert [o.id for reply in replies for o in reply.orders] == ids(created)  # each once, in order


async def test_page_size_zero_means_50(stub: OrderServiceStub) -> None:
    created = await create_many(stub, 51)
    first = await page(stub, 0)
    assert ids(first.orders) == ids(created[:50])
    assert first.next_page_token
    second = await page(stub, 0, first.next_page_token)
    assert ids(second.orders) == ids(created[50:])
    assert second.next_page_token == ""


async def test_page_size_is_capped_at_1000(stub: OrderServiceStub, client: OrderClient) -> None:
    await create_fast(client, 1001)
    first = await page(stub, 5000)
    assert len(first.orders) == 1000
    assert first.next_page_token
    second = await page(stub, 2**31 - 1, first.next_page_token)
    assert len(second.orders) == 1
    assert second.next_page_token == ""
    everything = ids(first.orders) + ids(second.orders)
    assert len(set(everything)) == 1001
    # oldest first: creation times never decrease along the list
    times = [o.create_time for o in first.orders + second.orders]
    assert times == sorted(times)  # type: ignore[type-var]


# --- status filter -----------------------------------------------------------------------------


async def test_status_filter(stub: OrderServiceStub) -> None:
    created = await create_many(stub, 8)
    await update(stub, created[1].id, CONFIRMED)
    await update(stub, created[5].id, CONFIRMED)
    await update(stub, created[2].id, CANCELLED)
    await update(stub, created[6].id, CONFIRMED)
    await update(stub, created[6].id, SHIPPED)
    expected = {
        (CONFIRMED,): [1, 5],
        (CANCELLED,): [2],
        (SHIPPED,): [6],
        (DELIVERED,): [],
        (PENDING,): [0, 3, 4, 7],
        (CONFIRMED, CANCELLED): [1, 2, 5],
        (CANCELLED, CONFIRMED, CANCELLED): [1, 2, 5],  # order and repeats do not matter
        (PENDING, CONFIRMED, SHIPPED, DELIVERED, CANCELLED): list(range(8)),
        (): list(range(8)),
    }
    for statuses, positions in expected.items():
        response = await page(stub, 0, "", list(statuses))
        assert ids(response.orders) == [created[i].id for i in positions], statuses
        assert not statuses or all(o.status in statuses for o in response.orders)
        assert response.next_page_token == ""


async def test_status_filter_pages(stub: OrderServiceStub) -> None:
    created = await create_many(stub, 9)
    for order in created[::2]:
        await update(stub, order.id, CONFIRMED)
    pages = await every_page(stub, 2, [CONFIRMED])
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [o.id for p in pages for o in p] == ids(created[::2])


@pytest.mark.parametrize("statuses", [[0], [99], [PENDING, 0], [6], [-1]])
async def test_unknown_status_in_filter(stub: OrderServiceStub, statuses: list[int]) -> None:
    bad = [s for s in statuses if s not in range(1, 6)][0]
    await fails(page(stub, 0, "", statuses), Status.INVALID_ARGUMENT, "statuses", f"got {bad}")


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [-1, -1000, -(2**31)])
async def test_negative_page_size(stub: OrderServiceStub, size: int) -> None:
    await fails(page(stub, size), Status.INVALID_ARGUMENT, "page_size", str(size))


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "!!!",
        "é",
        forged(b"{"),
        forged({"k": -1, "f": []}),
        forged({"k": "1", "f": []}),
        forged({"k": 2**63, "f": []}),  # past any database key
        forged({"k": 10**30, "f": []}),
        forged({"f": []}),
        forged([1, 2]),
        forged(b"[" * 50_000),  # deep nesting
    ],
)
async def test_malformed_page_token(stub: OrderServiceStub, token: str) -> None:
    await create_many(stub, 2)
    await fails(page(stub, 1, token), Status.INVALID_ARGUMENT, "page_token is malformed")


async def test_tampered_real_token(stub: OrderServiceStub) -> None:
    await create_many(stub, 3)
    token = (await page(stub, 1)).next_page_token
    assert token
    for tampered in (token[:-2], token + "x!", token[::-1]):
        with pytest.raises(GRPCError) as info:
            await page(stub, 1, tampered)
        assert info.value.status is Status.INVALID_ARGUMENT, info.value.message
        assert "page_token" in (info.value.message or "")


async def test_page_token_from_another_filter(stub: OrderServiceStub) -> None:
    created = await create_many(stub, 4)
    await update(stub, created[0].id, CONFIRMED)
    unfiltered = (await page(stub, 1)).next_page_token
    pending_only = (await page(stub, 1, "", [PENDING])).next_page_token
    assert unfiltered and pending_only
    message = "page_token belongs to a query with other statuses"
    await fails(page(stub, 1, unfiltered, [PENDING]), Status.INVALID_ARGUMENT, message)
    await fails(page(stub, 1, pending_only), Status.INVALID_ARGUMENT, message)
    await fails(page(stub, 1, pending_only, [PENDING, CONFIRMED]), Status.INVALID_ARGUMENT, message)
    # the same filter spelled differently is the same filter; the page size may change between pages
    both = (await page(stub, 1, "", [CONFIRMED, PENDING])).next_page_token
    continued = await page(stub, 10, both, [PENDING, CONFIRMED, PENDING])
    assert ids(continued.orders) == ids(created[1:])


# --- keyset paging under concurrent changes ----------------------------------------------------


async def test_orders_created_and_changed_between_pages(stub: OrderServiceStub) -> None:
    created = await create_many(stub, 6)
    first = await page(stub, 3)
    assert ids(first.orders) == ids(created[:3])
    # between pages: change orders already seen and not yet seen, create new ones
    await update(stub, created[0].id, CONFIRMED)
    await update(stub, created[1].id, CANCELLED)
    await update(stub, created[4].id, CONFIRMED)
    newer = await create_many(stub, 2)
    second = await page(stub, 3, first.next_page_token)
    assert ids(second.orders) == ids(created[3:])
    assert second.orders[1].status == CONFIRMED  # the current state, not a snapshot
    third = await page(stub, 3, second.next_page_token)
    assert ids(third.orders) == ids(newer)
    assert third.next_page_token == ""


async def test_filtered_paging_while_orders_change(stub: OrderServiceStub) -> None:
    created = await create_many(stub, 6)
    first = await page(stub, 2, "", [PENDING])
    assert ids(first.orders) == ids(created[:2])
    # an order already seen leaves the filter, one not yet seen leaves it, a new one joins it
    await update(stub, created[0].id, CONFIRMED)
    await update(stub, created[3].id, CONFIRMED)
    newer = await create(stub)
    seen = ids(first.orders)
    token = first.next_page_token
    while token:
        response = await page(stub, 2, token, [PENDING])
        seen += ids(response.orders)
        token = response.next_page_token
    assert seen == [created[i].id for i in (0, 1, 2, 4, 5)] + [newer.id]
    assert len(set(seen)) == len(seen)


async def test_concurrent_creates_never_split_or_repeat(stub: OrderServiceStub, client: OrderClient) -> None:
    await create_fast(client, 40, batch=40)
    seen: list[str] = []
    token = ""
    writers = asyncio.gather(*(client.create([Item("late", 1, 1.0)]) for _ in range(40)))
    while True:
        response = await page(stub, 7, token)
        seen += ids(response.orders)
        token = response.next_page_token
        if not token:
            break
    await writers
    assert len(seen) == len(set(seen))
    everything = ids((await page(stub, 1000)).orders)
    assert len(everything) == 80
    assert seen == everything[: len(seen)]  # a prefix of the creation order, without holes
    assert len(seen) >= 40
