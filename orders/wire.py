"""Domain records → the response messages that go on the wire.

An order is encoded once, when it is written: the repository stores it as an encoded ``orders.v1.Order``
message beside its columns (see :func:`encode_order`), and every reply that carries orders is those stored
bytes behind a field header (:func:`order_reply`, :func:`list_orders_reply`). A page of 50 orders is then
read and framed in about 70 µs, where loading the rows into domain records and encoding them took about
600 µs. Other replies are built as protobuf-runtime messages (upb, in C) of the very descriptors the
generated betterproto2 classes carry, so the bytes are the same as betterproto2's, encoded about 25 times
faster. Requests arrive as protobuf-runtime messages too (see :class:`orders.calls.StrictProtoCodec`,
which decodes them and sends every kind of reply).
"""

from __future__ import annotations

import functools
import time
from typing import Any

from google.protobuf import message_factory
from google.protobuf.message import Message

from orders import domain
from orders._proto.orders.v1 import Order, StatusUpdate
from orders.domain import to_units

WATCH_METHOD = "/orders.v1.OrderService/OrderStatusStream"  # the streaming RPC's path


class EncodedReply(bytes):
    """A reply message already encoded: the codec sends these bytes as they are."""


Reply = Message | EncodedReply  # what the servicer returns: encoded by the codec, or already encoded
Request = Any  # what the servicer receives: a protobuf-runtime message of the method's request type


def _runtime_class(message_type: type) -> type[Message]:
    return message_factory.GetMessageClass(message_type.DESCRIPTOR)  # type: ignore[attr-defined]


_ORDER = _runtime_class(Order)
_STATUS_UPDATE = _runtime_class(StatusUpdate)

# Every reply that carries orders has them in field 1 (``order`` in the four unary order replies,
# ``repeated orders`` in ListOrdersResponse), and ListOrdersResponse its token in field 2; both fields are
# length-delimited (wire type 2).
_ORDERS_TAG = bytes([1 << 3 | 2])
_NEXT_PAGE_TOKEN_TAG = bytes([2 << 3 | 2])


def _set_time(target: Message, time_us: int) -> None:
    seconds, micros = divmod(time_us, 1_000_000)
    target.seconds, target.nanos = seconds, micros * 1000  # type: ignore[attr-defined]


def encode_order(order: domain.Order) -> bytes:
    """``order`` as an encoded ``orders.v1.Order`` message: the form the repository stores."""
    message = _ORDER(
        id=order.id,
        items=[
            {"id": i.id, "product_name": i.product_name, "quantity": i.quantity, "price": to_units(i.price_cents)}
            for i in order.items
        ],
        total_amount=to_units(order.total_cents),
        status=order.status,
        version=order.version,
        currency_code=order.currency_code,
    )
    _set_time(message.create_time, order.create_time_us)  # type: ignore[attr-defined]
    _set_time(message.update_time, order.update_time_us)  # type: ignore[attr-defined]
    return message.SerializeToString()


def with_status(encoded_order: bytes, status: domain.Status, version: int, update_time_us: int) -> bytes:
    """An encoded order (as :func:`encode_order` makes them) changed to ``status`` at ``version``."""
    message = _ORDER.FromString(encoded_order)
    message.status, message.version = status, version  # type: ignore[attr-defined]
    _set_time(message.update_time, update_time_us)  # type: ignore[attr-defined]
    return message.SerializeToString()


def _varint(value: int) -> bytes:
    encoded = bytearray()
    while value > 0x7F:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


@functools.lru_cache(maxsize=4096)  # orders are mostly a few hundred bytes long: a few hundred lengths
def _order_header(length: int) -> bytes:
    return _ORDERS_TAG + _varint(length)


def order_reply(encoded_order: bytes) -> EncodedReply:
    """A CreateOrder, GetOrder, UpdateOrderStatus or CancelOrder response (each is just its ``order``)."""
    return EncodedReply(_order_header(len(encoded_order)) + encoded_order)


# The most a ListOrders page's orders may take: gRPC clients refuse replies over 4 MiB by default (grpcio's
# "Received message larger than max"), and fifty orders of a thousand long-named items are ten times that.
# The rest is left for the page token and each order's field header (at most 4 bytes).
MAX_PAGE_BYTES = 4 * 1024 * 1024 - 4096
ORDER_FIELD_HEADER_BYTES = 4


def orders_that_fit(encoded_orders: list[bytes]) -> int:
    """How many of ``encoded_orders``, from the first, fit in one ListOrders reply (MAX_PAGE_BYTES); at least
    one, since no single order comes near it."""
    total = 0
    for count, order in enumerate(encoded_orders):
        total += len(order) + ORDER_FIELD_HEADER_BYTES
        if total > MAX_PAGE_BYTES:
            return max(count, 1)
    return len(encoded_orders)


def list_orders_reply(encoded_orders: list[bytes], next_page_token: str) -> EncodedReply:
    """A ListOrdersResponse of encoded orders (as :func:`encode_order` makes them)."""
    header = _order_header
    parts = [header(len(order)) + order for order in encoded_orders]
    if next_page_token:
        token = next_page_token.encode()
        parts.append(_NEXT_PAGE_TOKEN_TAG + _varint(len(token)) + token)
    return EncodedReply(b"".join(parts))


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
