"""Replies built from stored, encoded orders are byte for byte what the protobuf runtime encodes for the
same messages, whatever the orders' sizes (field headers with one- to three-byte lengths)."""

from __future__ import annotations

import pytest
from google.protobuf import message_factory
from hypothesis import given
from hypothesis import strategies as st

from orders import domain, wire
from orders._proto.orders.v1 import GetOrderResponse, ListOrdersResponse
from orders.testing import product_names

pytestmark = pytest.mark.database_free

GET_ORDER = message_factory.GetMessageClass(GetOrderResponse.DESCRIPTOR)
LIST_ORDERS = message_factory.GetMessageClass(ListOrdersResponse.DESCRIPTOR)

times = st.integers(0, 2**42)
items = st.builds(
    domain.Item,
    st.uuids().map(str),
    product_names(),
    st.integers(1, domain.MAX_QUANTITY),
    st.integers(1, domain.MAX_PRICE_UNITS * domain.CENTS_PER_UNIT),
)
orders = st.builds(
    domain.Order,
    st.uuids().map(str),
    st.lists(items, max_size=40).map(tuple),
    st.integers(1, domain.MAX_TOTAL_UNITS * domain.CENTS_PER_UNIT),
    st.sampled_from(["USD", "EUR", "JPY"]),
    st.sampled_from(domain.Status),
    st.integers(1, 2**40),
    times,
    times,
)


def runtime_order(order: domain.Order, target: object) -> None:
    """Fill ``target`` (a protobuf-runtime Order) field by field, independently of orders.wire."""
    target.id, target.currency_code = order.id, order.currency_code
    target.total_amount = order.total_cents / 100
    target.status, target.version = order.status, order.version
    target.create_time.FromMicroseconds(order.create_time_us)
    target.update_time.FromMicroseconds(order.update_time_us)
    for item in order.items:
        added = target.items.add(id=item.id, product_name=item.product_name, quantity=item.quantity)
        added.price = item.price_cents / 100


@given(orders)
def test_an_order_reply_is_the_runtimes_encoding(order: domain.Order) -> None:
    expected = GET_ORDER()
    runtime_order(order, expected.order)
    assert wire.order_reply(wire.encode_order(order)) == expected.SerializeToString()


@given(st.lists(orders, max_size=5), st.text(max_size=300))
def test_a_list_reply_is_the_runtimes_encoding(page: list[domain.Order], token: str) -> None:
    expected = LIST_ORDERS(next_page_token=token)
    for order in page:
        runtime_order(order, expected.orders.add())
    assert wire.list_orders_reply([wire.encode_order(order) for order in page], token) == expected.SerializeToString()


@given(orders, st.sampled_from(domain.Status), st.integers(1, 2**40), times)
def test_a_status_change_rewrites_only_status_version_and_update_time(
    order: domain.Order, status: domain.Status, version: int, update_time_us: int
) -> None:
    changed = order._replace(status=status, version=version, update_time_us=update_time_us)
    assert wire.with_status(wire.encode_order(order), status, version, update_time_us) == wire.encode_order(changed)


def test_orders_that_fit_one_list_reply() -> None:
    assert wire.orders_that_fit([]) == 0
    assert wire.orders_that_fit([b"x" * 100] * 50) == 50
    exactly = wire.MAX_PAGE_BYTES // 2 - wire.ORDER_FIELD_HEADER_BYTES
    assert wire.orders_that_fit([b"x" * exactly] * 3) == 2  # the second ends at the budget, the third is over
    assert wire.orders_that_fit([b"x" * (exactly + 1)] * 3) == 1
    assert wire.orders_that_fit([b"x" * wire.MAX_PAGE_BYTES, b"x"]) == 1  # never an empty page
