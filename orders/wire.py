"""Conversions between domain records and the generated protobuf messages."""

from __future__ import annotations

import datetime

from orders import domain
from orders._proto.orders.v1 import Order, OrderItem, OrderStatus, StatusUpdate

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def timestamp(time_us: int) -> datetime.datetime:
    """An exact UTC datetime for microseconds since the epoch."""
    return _EPOCH + datetime.timedelta(microseconds=time_us)


def order_message(order: domain.Order) -> Order:
    """The wire form of a stored order."""
    return Order(
        id=order.id,
        items=[
            OrderItem(id=i.id, product_name=i.product_name, quantity=i.quantity, price=domain.to_units(i.price_cents))
            for i in order.items
        ],
        total_amount=domain.to_units(order.total_cents),
        status=OrderStatus(order.status),
        create_time=timestamp(order.create_time_us),
        update_time=timestamp(order.update_time_us),
        version=order.version,
        currency_code=order.currency_code,
    )


def status_update(event: domain.StatusEvent) -> StatusUpdate:
    """The wire form of an event-log entry."""
    return StatusUpdate(
        order_id=event.order_id,
        status=OrderStatus(event.status),
        timestamp=timestamp(event.time_us),
        sequence=event.sequence,
        previous_status=OrderStatus(event.previous or 0),
    )


def heartbeat(head: int) -> StatusUpdate:
    """A heartbeat: no order id, the log's head as sequence, the current time."""
    return StatusUpdate(sequence=head, timestamp=datetime.datetime.now(datetime.timezone.utc))
