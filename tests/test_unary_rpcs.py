"""CreateOrder, GetOrder, UpdateOrderStatus and CancelOrder over a real socket against a real server.

Every unary row of the DESIGN.md error table is checked for its exact status code and for a message
that names the offending field or value. ListOrders has its own module, test_list_orders.py.
"""

from __future__ import annotations

import datetime
import math
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
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
from orders.server import OrderServer

PENDING, CONFIRMED, SHIPPED = OrderStatus.PENDING, OrderStatus.CONFIRMED, OrderStatus.SHIPPED
DELIVERED, CANCELLED = OrderStatus.DELIVERED, OrderStatus.CANCELLED
STATUSES = [PENDING, CONFIRMED, SHIPPED, DELIVERED, CANCELLED]
ALLOWED = {(PENDING, CONFIRMED), (PENDING, CANCELLED), (CONFIRMED, SHIPPED), (CONFIRMED, CANCELLED),
           (SHIPPED, DELIVERED), (SHIPPED, CANCELLED)}
PATH_TO = {
    PENDING: [],
    CONFIRMED: [CONFIRMED],
    SHIPPED: [CONFIRMED, SHIPPED],
    DELIVERED: [CONFIRMED, SHIPPED, DELIVERED],
    CANCELLED: [CANCELLED],
}
GOOD = ("Widget", 1, 2.5)
UNKNOWN_ID = "7f1e1b7c-8b1a-4d57-9b6e-2b6a4f2e0c11"

Items = list[tuple[str, int, float]]


# --- helpers -----------------------------------------------------------------------------------


def create_request(items: Items, *, total: float = 0.0, currency: str = "", request_id: str = "",
                   item_ids: list[str] | None = None) -> CreateOrderRequest:
    ids = item_ids or [""] * len(items)
    return CreateOrderRequest(
        items=[OrderItem(id=i, product_name=n, quantity=q, price=p) for i, (n, q, p) in zip(ids, items, strict=True)],
        total_amount=total,
        currency_code=currency,
        request_id=request_id,
    )


async def create(stub: OrderServiceStub, items: Items | None = None, **options: Any) -> Order:
    response = await stub.create_order(create_request(items or [GOOD], **options))
    assert response.order is not None
    return response.order


async def get(stub: OrderServiceStub, order_id: str) -> Order:
    response = await stub.get_order(GetOrderRequest(id=order_id))
    assert response.order is not None
    return response.order


async def update(stub: OrderServiceStub, order_id: str, status: int, expected_version: int = 0) -> Order:
    response = await stub.update_order_status(
        UpdateOrderStatusRequest(id=order_id, status=status, expected_version=expected_version)  # type: ignore[arg-type]
    )
    assert response.order is not None
    return response.order


async def cancel(stub: OrderServiceStub, order_id: str, expected_version: int = 0) -> Order:
    response = await stub.cancel_order(CancelOrderRequest(id=order_id, expected_version=expected_version))
    assert response.order is not None
    return response.order


async def order_in(stub: OrderServiceStub, status: OrderStatus) -> Order:
    """A new order walked through the allowed changes to ``status``."""
    order = await create(stub)
    for step in PATH_TO[status]:
        order = await update(stub, order.id, step)
    assert order.status == status
    return order


async def all_orders(stub: OrderServiceStub) -> list[Order]:
    response = await stub.list_orders(ListOrdersRequest(page_size=1000))
    assert response.next_page_token == ""
    return response.orders


async def fails(call: Awaitable[object], status: Status, *fragments: str) -> GRPCError:
    """Await ``call``, expect a GRPCError with exactly ``status`` whose message contains every fragment."""
    with pytest.raises(GRPCError) as info:
        await call
    error = info.value
    assert error.status is status, f"expected {status.name}, got {error.status.name}: {error.message}"
    for fragment in fragments:
        assert fragment in (error.message or ""), f"{fragment!r} not in {error.message!r}"
    assert "Traceback" not in (error.message or "")
    return error


def is_server_id(value: str) -> bool:
    """A server-assigned id: a version-7 UUID in canonical form."""
    try:
        return uuid.UUID(value).version == 7 and str(uuid.UUID(value)) == value
    except ValueError:
        return False


def id_time(value: str) -> datetime.datetime:
    """The creation time a version-7 UUID carries (whole milliseconds)."""
    return datetime.datetime.fromtimestamp((uuid.UUID(value).int >> 80) / 1000, datetime.UTC)


# --- CreateOrder: rejected requests ------------------------------------------------------------

BAD_CREATES: list[tuple[str, Items, float, str, list[str]]] = [
    ("no items", [], 0, "", ["at least one item"]),
    ("1001 items", [GOOD] * 1001, 0, "", ["at most 1,000 items", "1,001"]),
    ("quantity 0", [GOOD, ("x", 0, 1.0)], 0, "", ["items[1].quantity", "got 0"]),
    ("quantity -1", [GOOD, ("x", -1, 1.0)], 0, "", ["items[1].quantity", "got -1"]),
    ("quantity 1000001", [GOOD, ("x", 1_000_001, 1.0)], 0, "", ["items[1].quantity", "got 1000001"]),
    ("price NaN", [GOOD, ("x", 1, math.nan)], 0, "", ["items[1].price", "finite", "nan"]),
    ("price inf", [GOOD, ("x", 1, math.inf)], 0, "", ["items[1].price", "finite", "inf"]),
    ("price -inf", [GOOD, ("x", 1, -math.inf)], 0, "", ["items[1].price", "finite", "-inf"]),
    ("price -1", [GOOD, ("x", 1, -1.0)], 0, "", ["items[1].price", "negative", "-1.0"]),
    ("price 0.001", [GOOD, ("x", 1, 0.001)], 0, "", ["items[1].price", "whole number of cents", "0.001"]),
    ("price 19.999", [GOOD, ("x", 1, 19.999)], 0, "", ["items[1].price", "whole number of cents", "19.999"]),
    ("price > 10^12", [GOOD, ("x", 1, 1e12 + 0.01)], 0, "", ["items[1].price", "at most 1,000,000,000,000"]),
    ("name empty", [GOOD, ("", 1, 1.0)], 0, "", ["items[1].product_name", "empty"]),
    ("name whitespace", [GOOD, (" \t ", 1, 1.0)], 0, "", ["items[1].product_name", "whitespace"]),
    ("name 201 chars", [GOOD, ("n" * 201, 1, 1.0)], 0, "", ["items[1].product_name", "201 characters", "200"]),
    ("name NUL", [GOOD, ("a\x00b", 1, 1.0)], 0, "", ["items[1].product_name", "control characters"]),
    ("name newline", [GOOD, ("a\nb", 1, 1.0)], 0, "", ["items[1].product_name", "control characters"]),
    ("name DEL", [GOOD, ("a\x7f", 1, 1.0)], 0, "", ["items[1].product_name", "control characters"]),
    ("name line separator", [GOOD, ("a\u2028b", 1, 1.0)], 0, "", ["items[1].product_name", "U+2028"]),
    ("name noncharacter", [GOOD, ("a\ufffe", 1, 1.0)], 0, "", ["items[1].product_name", "noncharacters"]),
    ("name invisible", [GOOD, ("\u200b\u0301", 1, 1.0)], 0, "", ["items[1].product_name", "nothing visible"]),
    ("total != computed", [("pen", 3, 19.99)], 59.96, "", ["total_amount", "59.96", "59.97"]),
    ("total NaN", [("pen", 3, 19.99)], math.nan, "", ["total_amount", "finite"]),
    ("total negative", [("pen", 3, 19.99)], -59.97, "", ["total_amount", "negative"]),
    ("total fractional", [("pen", 3, 19.99)], 59.971, "", ["total_amount", "whole number of cents"]),
    ("total > 10^13", [("gold", 10, 1e12), ("penny", 1, 0.01)], 0, "", ["total", "10,000,000,000,000"]),
    ("currency usd", [GOOD], 0, "usd", ["currency_code", "'usd'", "3 uppercase letters"]),
    ("currency US", [GOOD], 0, "US", ["currency_code", "'US'"]),
    ("currency USDX", [GOOD], 0, "USDX", ["currency_code", "'USDX'"]),
    ("currency U$D", [GOOD], 0, "U$D", ["currency_code", "'U$D'"]),
]


@pytest.mark.parametrize(("items", "total", "currency", "fragments"), [c[1:] for c in BAD_CREATES],
                         ids=[c[0] for c in BAD_CREATES])
async def test_create_rejects_invalid_input_and_stores_nothing(
    stub: OrderServiceStub, items: Items, total: float, currency: str, fragments: list[str]
) -> None:
    request = create_request(items, total=total, currency=currency, request_id="key-1")
    await fails(stub.create_order(request), Status.INVALID_ARGUMENT, *fragments)
    assert await all_orders(stub) == []
    # the rejected request did not claim its request_id either
    order = await create(stub, request_id="key-1")
    assert [o.id for o in await all_orders(stub)] == [order.id]


async def test_create_rejects_overlong_request_id(stub: OrderServiceStub) -> None:
    await fails(stub.create_order(create_request([GOOD], request_id="k" * 129)), Status.INVALID_ARGUMENT,
                "request_id", "128", "129")
    assert await all_orders(stub) == []


@pytest.mark.parametrize("request_id", ["a\x00b", "line\n", "\x7f"])
async def test_create_rejects_a_request_id_with_control_characters(stub: OrderServiceStub, request_id: str) -> None:
    """On both backends alike (PostgreSQL's text cannot hold NUL: this was INTERNAL there)."""
    await fails(stub.create_order(create_request([GOOD], request_id=request_id)), Status.INVALID_ARGUMENT,
                "request_id", "control characters")
    assert await all_orders(stub) == []


# --- CreateOrder: accepted requests ------------------------------------------------------------


async def test_create_assigns_ids_and_returns_items_in_request_order(stub: OrderServiceStub) -> None:
    items = [("Laptop", 1, 1000.0), ("Mouse", 2, 25.0), ("Cable", 3, 4.99), ("Mouse", 2, 25.0)]
    client_ids = ["client-item", "dup", "dup", str(uuid.uuid4())]
    before = datetime.datetime.now(datetime.UTC)
    order = await create(stub, items, item_ids=client_ids)
    after = datetime.datetime.now(datetime.UTC)

    assert is_server_id(order.id)
    assert [(i.product_name, i.quantity, i.price) for i in order.items] == items
    item_ids = [i.id for i in order.items]
    assert all(is_server_id(i) for i in item_ids)
    assert len(set(item_ids)) == len(items)
    assert not set(item_ids) & set(client_ids)  # client-supplied ids are ignored (output only)
    assert order.id not in item_ids
    assert order.status == PENDING
    assert order.version == 1
    assert order.currency_code == "USD"
    assert order.total_amount == 1000 + 50 + 14.97 + 50
    assert order.create_time is not None and order.create_time == order.update_time
    assert before - datetime.timedelta(seconds=1) <= order.create_time <= after + datetime.timedelta(seconds=1)
    assert abs(id_time(order.id) - order.create_time) < datetime.timedelta(milliseconds=50)  # made at creation


async def test_every_create_gets_a_fresh_id(stub: OrderServiceStub) -> None:
    first, second = await create(stub), await create(stub)
    assert first.id != second.id
    assert first.create_time is not None and second.create_time is not None
    assert first.create_time <= second.create_time


@pytest.mark.parametrize(
    ("items", "total", "expected"),
    [
        ([("pen", 3, 19.99)], 0.0, 59.97),
        ([("pen", 3, 19.99)], 59.97, 59.97),
        ([("pen", 3, 19.99)], -0.0, 59.97),
        ([("a", 1, 0.1), ("b", 1, 0.2)], 0.0, 0.3),
        ([("a", 1, 0.1), ("b", 1, 0.2)], 0.1 + 0.2, 0.3),  # float noise in the total is fine
        ([("free sample", 5, 0.0)], 0.0, 0.0),
        ([("x", 1_000_000, 0.01)], 10_000.0, 10_000.0),
        ([("gold", 10, 1e12)], 0.0, 1e13),  # the largest total allowed
        ([("a", 7, 0.07), ("b", 3, 1234567.89)], 0.0, 3703704.16),
    ],
)
async def test_create_computes_exact_totals(
    stub: OrderServiceStub, items: Items, total: float, expected: float
) -> None:
    order = await create(stub, items, total=total)
    assert order.total_amount == expected
    assert [i.price for i in order.items] == [p for _, _, p in items]
    assert await get(stub, order.id) == order


async def test_create_keeps_float_noise_prices_as_whole_cents(stub: OrderServiceStub) -> None:
    order = await create(stub, [("noisy", 1, 0.1 + 0.2)])
    assert order.items[0].price == 0.3
    assert order.total_amount == 0.3


@pytest.mark.parametrize(("currency", "expected"), [("", "USD"), ("USD", "USD"), ("EUR", "EUR"), ("JPY", "JPY")])
async def test_create_currency(stub: OrderServiceStub, currency: str, expected: str) -> None:
    order = await create(stub, currency=currency)
    assert order.currency_code == expected
    assert (await get(stub, order.id)).currency_code == expected


@pytest.mark.parametrize("name", ["Café ☕", "日本語の本", "🍕", "n" * 200, "é" * 200, " padded  name "])
async def test_create_keeps_unicode_names_verbatim(stub: OrderServiceStub, name: str) -> None:
    order = await create(stub, [(name, 1, 1.0)])
    assert order.items[0].product_name == name
    assert (await get(stub, order.id)).items[0].product_name == name


async def test_create_accepts_the_bounds(stub: OrderServiceStub) -> None:
    items = [(f"item {i}", 1_000_000 if i == 0 else 1, 0.01 * (i + 1)) for i in range(1000)]
    order = await create(stub, items)
    assert [(i.product_name, i.quantity) for i in order.items] == [(n, q) for n, q, _ in items]
    assert order.items[0].quantity == 1_000_000
    expected_cents = 1_000_000 * 1 + sum(range(2, 1001))
    assert order.total_amount == expected_cents / 100
    assert await get(stub, order.id) == order
    biggest = await create(stub, [("jet", 1, 1e12)])
    assert biggest.items[0].price == 1e12


# --- CreateOrder: request_id idempotency -------------------------------------------------------


async def test_same_request_id_and_request_returns_the_original_order(stub: OrderServiceStub) -> None:
    items = [("Laptop", 1, 1000.0), ("Mouse", 2, 25.0)]
    first = await create(stub, items, request_id="checkout-42")
    again = await create(stub, items, request_id="checkout-42")
    assert again == first  # the whole message, ids and timestamps included
    assert [o.id for o in await all_orders(stub)] == [first.id]


async def test_idempotent_retry_ignores_client_item_ids_and_compares_the_computed_total(
    stub: OrderServiceStub,
) -> None:
    items = [("pen", 3, 19.99), ("ink", 1, 0.1 + 0.2)]
    first = await create(stub, items, request_id="k", item_ids=["a", "b"])
    retries = [
        create_request(items, request_id="k", item_ids=["x", "y"]),  # other client item ids
        create_request(items, request_id="k", total=60.27),  # explicit correct total vs computed (0)
        create_request(items, request_id="k", currency="USD"),  # explicit default currency
        create_request([("pen", 3, 19.99), ("ink", 1, 0.3)], request_id="k"),  # same cents, other float
    ]
    for retry in retries:
        assert (await stub.create_order(retry)).order == first
    assert len(await all_orders(stub)) == 1


@pytest.mark.parametrize(
    ("items", "currency"),
    [
        ([("pen", 4, 19.99)], ""),  # quantity
        ([("pen", 3, 19.98)], ""),  # price
        ([("Pen", 3, 19.99)], ""),  # name
        ([("pen", 3, 19.99), ("pen", 3, 19.99)], ""),  # more items
        ([("pen", 3, 19.99)], "EUR"),  # currency
    ],
)
async def test_same_request_id_with_a_different_request_is_already_exists(
    stub: OrderServiceStub, items: Items, currency: str
) -> None:
    first = await create(stub, [("pen", 3, 19.99)], request_id="order-7")
    error = await fails(stub.create_order(create_request(items, currency=currency, request_id="order-7")),
                        Status.ALREADY_EXISTS, "request_id", "'order-7'", first.id)
    assert "new request_id" in (error.message or "")
    assert [o.id for o in await all_orders(stub)] == [first.id]


async def test_item_order_is_part_of_the_request(stub: OrderServiceStub) -> None:
    await create(stub, [("a", 1, 1.0), ("b", 1, 2.0)], request_id="r")
    await fails(stub.create_order(create_request([("b", 1, 2.0), ("a", 1, 1.0)], request_id="r")),
                Status.ALREADY_EXISTS, "'r'")


async def test_request_ids_are_independent(stub: OrderServiceStub) -> None:
    first = await create(stub, request_id="one")
    second = await create(stub, request_id="two")
    third = await create(stub)  # no request_id: never deduplicated
    fourth = await create(stub)
    assert len({first.id, second.id, third.id, fourth.id}) == 4
    assert len(await all_orders(stub)) == 4


async def test_idempotent_retry_after_a_status_change_returns_the_same_order(stub: OrderServiceStub) -> None:
    first = await create(stub, request_id="k")
    confirmed = await update(stub, first.id, CONFIRMED)
    again = await create(stub, request_id="k")
    assert again.id == first.id
    assert again == confirmed == await get(stub, first.id)
    assert len(await all_orders(stub)) == 1


# --- GetOrder ----------------------------------------------------------------------------------


async def test_get_empty_id(stub: OrderServiceStub) -> None:
    await fails(stub.get_order(GetOrderRequest(id="")), Status.INVALID_ARGUMENT, "id must not be empty")


@pytest.mark.parametrize("bad", ["nope", "12345", UNKNOWN_ID[:-1], UNKNOWN_ID + "0", "g" * 32, "' OR 1=1 --"])
async def test_get_non_uuid_id(stub: OrderServiceStub, bad: str) -> None:
    await fails(stub.get_order(GetOrderRequest(id=bad)), Status.INVALID_ARGUMENT, "id must be a UUID", repr(bad))


async def test_get_unknown_id(stub: OrderServiceStub) -> None:
    await create(stub)
    await fails(stub.get_order(GetOrderRequest(id=UNKNOWN_ID)), Status.NOT_FOUND, UNKNOWN_ID)


async def test_get_accepts_any_spelling_of_the_uuid(stub: OrderServiceStub) -> None:
    order = await create(stub)
    assert await get(stub, order.id.upper()) == order
    assert await get(stub, "{" + order.id + "}") == order


async def test_get_returns_exactly_what_the_last_write_returned(stub: OrderServiceStub) -> None:
    order = await create(stub, [("Laptop", 1, 1000.0), ("Mouse", 2, 25.0)], currency="EUR")
    assert await get(stub, order.id) == order
    for step in (CONFIRMED, SHIPPED, DELIVERED):
        order = await update(stub, order.id, step)
        assert await get(stub, order.id) == order
    other = await create(stub)
    cancelled = await cancel(stub, other.id)
    assert await get(stub, other.id) == cancelled
    # a rejected change leaves the order as the last successful write returned it
    await fails(stub.update_order_status(UpdateOrderStatusRequest(id=order.id, status=PENDING)),
                Status.FAILED_PRECONDITION)
    assert await get(stub, order.id) == order


# --- UpdateOrderStatus -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [0, 6, 99, -1])
async def test_update_rejects_unspecified_and_unknown_statuses(stub: OrderServiceStub, status: int) -> None:
    order = await create(stub)
    await fails(stub.update_order_status(UpdateOrderStatusRequest(id=order.id, status=status)),  # type: ignore[arg-type]
                Status.INVALID_ARGUMENT, "status must be one of", f"got {status}")
    assert await get(stub, order.id) == order


@pytest.mark.parametrize(
    ("current", "target"),
    [(a, b) for a in STATUSES for b in STATUSES if a != b and (a, b) not in ALLOWED],
    ids=lambda s: s.name,
)
async def test_update_disallowed_transition(stub: OrderServiceStub, current: OrderStatus, target: OrderStatus) -> None:
    order = await order_in(stub, current)
    await fails(stub.update_order_status(UpdateOrderStatusRequest(id=order.id, status=target)),
                Status.FAILED_PRECONDITION, f"from {current.name} to {target.name}")
    assert await get(stub, order.id) == order


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED), ids=lambda s: s.name)
async def test_update_allowed_transition(stub: OrderServiceStub, current: OrderStatus, target: OrderStatus) -> None:
    order = await order_in(stub, current)
    changed = await update(stub, order.id, target)
    assert changed.status == target
    assert changed.version == order.version + 1
    assert changed.update_time is not None and order.update_time is not None
    assert changed.update_time > order.update_time
    # nothing else changes
    assert (changed.id, changed.items, changed.total_amount, changed.currency_code, changed.create_time) == (
        order.id, order.items, order.total_amount, order.currency_code, order.create_time)
    assert await get(stub, order.id) == changed


@pytest.mark.parametrize("status", STATUSES, ids=lambda s: s.name)
async def test_update_to_the_same_status_is_a_no_op(stub: OrderServiceStub, status: OrderStatus) -> None:
    order = await order_in(stub, status)
    again = await update(stub, order.id, status)
    assert again == order  # same version, same update_time
    assert await get(stub, order.id) == order
    # also with the correct expected_version
    assert await update(stub, order.id, status, expected_version=order.version) == order


async def test_versions_bump_by_one_per_change(stub: OrderServiceStub) -> None:
    order = await create(stub)
    times = [order.update_time]
    for expected_version, step in enumerate((CONFIRMED, SHIPPED, DELIVERED), start=2):
        order = await update(stub, order.id, step)
        assert order.version == expected_version
        times.append(order.update_time)
    assert times == sorted(times) and len(set(times)) == 4


async def test_expected_version(stub: OrderServiceStub) -> None:
    order = await create(stub)
    confirmed = await update(stub, order.id, CONFIRMED, expected_version=1)
    assert confirmed.version == 2
    await fails(stub.update_order_status(UpdateOrderStatusRequest(id=order.id, status=SHIPPED, expected_version=1)),
                Status.ABORTED, order.id, "version 2", "expected 1")
    await fails(stub.update_order_status(UpdateOrderStatusRequest(id=order.id, status=SHIPPED, expected_version=3)),
                Status.ABORTED, "version 2", "expected 3")
    assert await get(stub, order.id) == confirmed
    shipped = await update(stub, order.id, SHIPPED, expected_version=2)
    assert shipped.version == 3 and shipped.status == SHIPPED


async def test_negative_expected_version(stub: OrderServiceStub) -> None:
    order = await create(stub)
    await fails(stub.update_order_status(UpdateOrderStatusRequest(id=order.id, status=CONFIRMED, expected_version=-1)),
                Status.INVALID_ARGUMENT, "expected_version", "-1")
    await fails(stub.cancel_order(CancelOrderRequest(id=order.id, expected_version=-1)),
                Status.INVALID_ARGUMENT, "expected_version", "-1")
    assert await get(stub, order.id) == order


async def test_update_id_validation(stub: OrderServiceStub) -> None:
    await fails(stub.update_order_status(UpdateOrderStatusRequest(id="", status=CONFIRMED)),
                Status.INVALID_ARGUMENT, "id must not be empty")
    await fails(stub.update_order_status(UpdateOrderStatusRequest(id="nope", status=CONFIRMED)),
                Status.INVALID_ARGUMENT, "id must be a UUID", "'nope'")
    await fails(stub.update_order_status(UpdateOrderStatusRequest(id=UNKNOWN_ID, status=CONFIRMED)),
                Status.NOT_FOUND, UNKNOWN_ID)


# check order: validation -> NOT_FOUND -> ABORTED -> no-op -> FAILED_PRECONDITION
async def test_update_check_order(stub: OrderServiceStub) -> None:
    async def code(order_id: str, status: int, expected_version: int = 0) -> Status:
        request = UpdateOrderStatusRequest(id=order_id, status=status, expected_version=expected_version)  # type: ignore[arg-type]
        try:
            await stub.update_order_status(request)
        except GRPCError as error:
            return error.status
        return Status.OK

    delivered = await order_in(stub, DELIVERED)  # version 4
    pending = await create(stub)
    # validation beats everything
    assert await code(UNKNOWN_ID, 0) is Status.INVALID_ARGUMENT
    assert await code(UNKNOWN_ID, 99, expected_version=7) is Status.INVALID_ARGUMENT
    assert await code("nope", CONFIRMED) is Status.INVALID_ARGUMENT
    assert await code(delivered.id, 0, expected_version=1) is Status.INVALID_ARGUMENT
    assert await code(delivered.id, PENDING, expected_version=-5) is Status.INVALID_ARGUMENT
    # unknown id beats a version check
    assert await code(UNKNOWN_ID, CONFIRMED, expected_version=3) is Status.NOT_FOUND
    # a stale version beats both the no-op and the transition table
    assert await code(delivered.id, PENDING, expected_version=1) is Status.ABORTED
    assert await code(delivered.id, DELIVERED, expected_version=1) is Status.ABORTED
    assert await code(pending.id, PENDING, expected_version=2) is Status.ABORTED
    # the no-op beats the transition table (DELIVERED -> DELIVERED is not in the table)
    assert await code(delivered.id, DELIVERED, expected_version=4) is Status.OK
    assert await code(delivered.id, PENDING, expected_version=4) is Status.FAILED_PRECONDITION
    assert await get(stub, delivered.id) == delivered
    assert await get(stub, pending.id) == pending


# --- CancelOrder -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [PENDING, CONFIRMED, SHIPPED], ids=lambda s: s.name)
async def test_cancel(stub: OrderServiceStub, status: OrderStatus) -> None:
    order = await order_in(stub, status)
    cancelled = await cancel(stub, order.id)
    assert cancelled.status == CANCELLED
    assert cancelled.version == order.version + 1
    assert cancelled.update_time is not None and order.update_time is not None
    assert cancelled.update_time > order.update_time
    assert cancelled.items == order.items and cancelled.create_time == order.create_time
    assert await get(stub, order.id) == cancelled


async def test_cancel_delivered_is_failed_precondition(stub: OrderServiceStub) -> None:
    order = await order_in(stub, DELIVERED)
    await fails(stub.cancel_order(CancelOrderRequest(id=order.id)), Status.FAILED_PRECONDITION,
                "from DELIVERED to CANCELLED")
    assert await get(stub, order.id) == order


async def test_cancel_cancelled_is_a_no_op(stub: OrderServiceStub) -> None:
    order = await order_in(stub, CANCELLED)
    assert order.version == 2
    assert await cancel(stub, order.id) == order
    assert await cancel(stub, order.id, expected_version=2) == order
    assert await get(stub, order.id) == order


async def test_cancel_errors(stub: OrderServiceStub) -> None:
    await fails(stub.cancel_order(CancelOrderRequest(id="")), Status.INVALID_ARGUMENT, "id must not be empty")
    await fails(stub.cancel_order(CancelOrderRequest(id="42")), Status.INVALID_ARGUMENT, "UUID", "'42'")
    await fails(stub.cancel_order(CancelOrderRequest(id=UNKNOWN_ID)), Status.NOT_FOUND, UNKNOWN_ID)
    await fails(stub.cancel_order(CancelOrderRequest(id=UNKNOWN_ID, expected_version=9)), Status.NOT_FOUND)
    order = await create(stub)
    await fails(stub.cancel_order(CancelOrderRequest(id=order.id, expected_version=2)), Status.ABORTED,
                "version 1", "expected 2")
    delivered = await order_in(stub, DELIVERED)
    # stale version beats the transition table; cancelling a cancelled order with a stale version too
    await fails(stub.cancel_order(CancelOrderRequest(id=delivered.id, expected_version=1)), Status.ABORTED)
    cancelled = await cancel(stub, order.id, expected_version=1)
    await fails(stub.cancel_order(CancelOrderRequest(id=order.id, expected_version=1)), Status.ABORTED)
    assert await get(stub, order.id) == cancelled


# --- raw bytes on the wire: never UNKNOWN or INTERNAL ------------------------------------------


class RawCodec(ProtoCodec):
    """Sends bytes as they are and returns reply bytes undecoded."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        return message

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


RawCall = Callable[[str, bytes], Awaitable[bytes]]


@pytest.fixture
async def raw(server: OrderServer) -> AsyncIterator[RawCall]:
    channel = Channel("127.0.0.1", server.port, codec=RawCodec())

    async def call(method: str, payload: bytes) -> bytes:
        path = f"/orders.v1.OrderService/{method}"
        async with channel.request(path, Cardinality.UNARY_UNARY, bytes, bytes) as stream:
            await stream.send_message(payload, end=True)
            reply = await stream.recv_message()
            assert reply is not None
            return reply

    try:
        yield call
    finally:
        channel.close()


def _string(field: int, value: bytes) -> bytes:
    assert len(value) < 128
    return bytes([field << 3 | 2, len(value)]) + value


async def test_unknown_fields_are_ignored_so_a_client_order_id_is_too(raw: RawCall, stub: OrderServiceStub) -> None:
    item = _string(2, b"Widget") + b"\x18\x01"  # product_name, quantity 1, price 0 (free)
    payload = _string(1, item) + _string(15, b"my-own-order-id") + _string(9, str(uuid.uuid4()).encode())
    reply = await raw("CreateOrder", payload)
    (order,) = await all_orders(stub)
    assert is_server_id(order.id)
    assert order.id.encode() in reply
    assert b"my-own-order-id" not in reply
    assert [(i.product_name, i.quantity, i.price) for i in order.items] == [("Widget", 1, 0.0)]


MALFORMED = [
    b"\xff",  # truncated varint tag
    b"\x0a\x05ab",  # length beyond the end
    b"\x0a\x02\xff\xfe",  # field 1 is not valid UTF-8 / not a valid message
    b"\x08",  # varint without a value
    b"\x08\x01",  # field 1 with the varint wire type
    b"\x0b",  # field 1 as a group start
    b"\x0c",  # group end
    b"\x10\x01",  # field 2 varint
    b"\x11" + b"\x00" * 8,  # field 2 fixed64
    b"\x13",  # field 2 group
    b"\x15\x00\x00\x00\x00",  # field 2 fixed32
    b"\x12\x01a",  # field 2 length-delimited
    b"\x18\x01",  # field 3 varint
    b"\x1a\x01\x63",  # field 3 length-delimited
    b"\x1b",  # field 3 group
    b"\x22\x02\xff\xfe",  # field 4 bad UTF-8
    b"\x0a\x04\x08\x01\x10\x01",  # nested message with wrong wire types
    b"\x0a\x02\x12\x00",
    b"\x0a\x02\x0b\x0c",
    b"\x0a\x09\x21" + b"\x00" * 8,  # well-formed: an item with only a price (and no name)
]
@pytest.mark.parametrize(
    ("method", "payload", "fragment"),
    [
        ("CreateOrder", _string(1, _string(2, b"caf\xe9") + b"\x18\x01"), "CreateOrderRequest"),  # Latin-1, not UTF-8
        ("CreateOrder", _string(4, b"\xff\xfe\xfd"), "CreateOrderRequest"),
        ("CreateOrder", b"\x08\x01", "items"),  # items sent as a number
        ("CreateOrder", _string(1, b"\x10\x01"), "product_name"),  # product_name sent as a number
        ("CreateOrder", _string(1, _string(3, b"\x01")), "quantity"),  # quantity sent as bytes
        ("CreateOrder", b"\x10\x01", "total_amount"),  # a double sent as a varint
        ("GetOrder", b"\x08\x01", "id"),  # the id sent as a number
        ("GetOrder", _string(1, b"\xc3"), "GetOrderRequest"),  # truncated UTF-8
        ("UpdateOrderStatus", _string(2, b"\x02"), "status"),  # enum sent length-delimited
        ("ListOrders", _string(1, b"abc"), "page_size"),  # int32 sent length-delimited
    ],
)
async def test_wrong_wire_types_and_bad_utf8_are_invalid_argument(
    raw: RawCall, stub: OrderServiceStub, method: str, payload: bytes, fragment: str
) -> None:
    await fails(raw(method, payload), Status.INVALID_ARGUMENT, "not a valid", fragment)
    assert await all_orders(stub) == []


METHODS = ["CreateOrder", "GetOrder", "UpdateOrderStatus", "CancelOrder", "ListOrders"]


@pytest.mark.parametrize("method", METHODS)
async def test_malformed_messages_are_never_unknown_or_internal(raw: RawCall, method: str) -> None:
    rng = random.Random(f"orders-{method}")
    payloads = MALFORMED + [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(300)]
    codes: dict[str, int] = {}
    for payload in payloads:
        try:
            await raw(method, payload)
            code = "OK"
        except GRPCError as error:
            code = error.status.name
            assert error.status not in (Status.UNKNOWN, Status.INTERNAL), (payload, error.message)
            assert "Traceback" not in (error.message or "")
        codes[code] = codes.get(code, 0) + 1
    assert codes.get("INVALID_ARGUMENT", 0) > 0
