"""Domain records → the response messages that go on the wire.

Responses are built as protobuf-runtime messages (upb, in C) of the very descriptors the generated
betterproto2 classes carry, so the bytes are the same; but they are encoded in C, where betterproto2's
pure-Python encoder spent about 25 times as long (a one-item GetOrderResponse: ~10 µs against ~260 µs,
the largest single cost of a GetOrder). Requests arrive as protobuf-runtime messages too (see
:class:`orders.calls.StrictProtoCodec`, which decodes them and sends either kind of reply).
"""

from __future__ import annotations

import time
from typing import Any

from google.protobuf import message_factory
from google.protobuf.message import Message

from orders import domain
from orders._proto.orders.v1 import (
    CancelOrderResponse,
    CreateOrderResponse,
    GetOrderResponse,
    ListOrdersResponse,
    StatusUpdate,
    UpdateOrderStatusResponse,
)

Reply = Message  # what the servicer returns: a protobuf-runtime message, encoded by the codec
Request = Any  # what the servicer receives: a protobuf-runtime message of the method's request type


def _runtime_class(message_type: type) -> type[Message]:
    return message_factory.GetMessageClass(message_type.DESCRIPTOR)  # type: ignore[attr-defined]


CREATE_ORDER = _runtime_class(CreateOrderResponse)
GET_ORDER = _runtime_class(GetOrderResponse)
UPDATE_ORDER_STATUS = _runtime_class(UpdateOrderStatusResponse)
CANCEL_ORDER = _runtime_class(CancelOrderResponse)
_LIST_ORDERS = _runtime_class(ListOrdersResponse)
_STATUS_UPDATE = _runtime_class(StatusUpdate)


def _set_time(target: Message, time_us: int) -> None:
    seconds, micros = divmod(time_us, 1_000_000)
    target.seconds, target.nanos = seconds, micros * 1000  # type: ignore[attr-defined]


def _set_order(target: Message, order: domain.Order) -> None:
    # Written out flat (no helper calls per item or timestamp): a ListOrders page runs this 50 times,
    # and the calls were a sixth of its cost.
    cents = domain.CENTS_PER_UNIT
    target.id = order.id  # type: ignore[attr-defined]
    add_item = target.items.add  # type: ignore[attr-defined]
    for item in order.items:
        added = add_item()
        added.id, added.product_name, added.quantity = item.id, item.product_name, item.quantity
        added.price = item.price_cents / cents
    target.total_amount = order.total_cents / cents  # type: ignore[attr-defined]
    target.status = order.status  # type: ignore[attr-defined]
    created, updated = target.create_time, target.update_time  # type: ignore[attr-defined]
    created.seconds, micros = divmod(order.create_time_us, 1_000_000)
    created.nanos = micros * 1000
    updated.seconds, micros = divmod(order.update_time_us, 1_000_000)
    updated.nanos = micros * 1000
    target.version = order.version  # type: ignore[attr-defined]
    target.currency_code = order.currency_code  # type: ignore[attr-defined]


def order_reply(reply_class: type[Message], order: domain.Order) -> Reply:
    """A ``reply_class`` (CREATE_ORDER, GET_ORDER, ...: each holds one ``order``) carrying ``order``."""
    reply = reply_class()
    _set_order(reply.order, order)  # type: ignore[attr-defined]
    return reply


def list_orders_reply(orders: list[domain.Order], next_page_token: str) -> Reply:
    """A ListOrdersResponse."""
    reply = _LIST_ORDERS(next_page_token=next_page_token)
    for order in orders:
        _set_order(reply.orders.add(), order)  # type: ignore[attr-defined]
    return reply


def status_update(event: domain.StatusEvent) -> Reply:
    """The wire form of an event-log entry."""
    update = _STATUS_UPDATE(
        order_id=event.order_id, status=event.status, sequence=event.sequence, previous_status=event.previous or 0
    )
    _set_time(update.timestamp, event.time_us)  # type: ignore[attr-defined]
    return update


def heartbeat(head: int) -> Reply:
    """A heartbeat: no order id, the log's head as sequence, the current time."""
    update = _STATUS_UPDATE(sequence=head)
    _set_time(update.timestamp, time.time_ns() // 1000)  # type: ignore[attr-defined]
    return update
