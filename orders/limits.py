"""Server limits, enforced as :class:`~orders.calls.CallGuard` admission hooks.

* :class:`MessageSizeLimit` caps a request message's size (``--max-message-bytes``). grpclib has no
  such limit: it reads a message's 5-byte prefix and then buffers as many bytes as the prefix
  announces. This guard swaps the call's ``recv_message`` for one that checks the announced length
  *before* reading the body, so an oversized message is refused (RESOURCE_EXHAUSTED) with its body
  unread, however large it claims to be.
* :class:`StreamLimits` caps open OrderStatusStream calls in all (``--max-watchers``) and per
  HTTP/2 connection (``--max-streams-per-connection``); unary calls are not counted.

Every refusal names the limit and the flag that sets it. Before a request is decoded, its repeated
fields are counted (items, ListOrders statuses, OrderStatusStream order_ids; INVALID_ARGUMENT beyond),
so that no message within the size limit keeps the event loop busy for long; see ``_check_counts``.
Item count and product-name length are also validation rules in :mod:`orders.domain`.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from google.protobuf.message import DecodeError
from grpclib.server import Stream

from orders import domain
from orders._proto.orders.v1 import CreateOrderRequest, ListOrdersRequest, OrderStatusStreamRequest
from orders.calls import Call, Release, _protobuf_class
from orders.compression import decompressed, request_encoding
from orders.errors import InvalidArgument, ResourceExhausted
from orders.wire import WATCH_METHOD

_PREFIX = struct.Struct(">?I")  # gRPC length-prefixed message: compressed flag, big-endian length


class MessageSizeLimit:
    """Refuse request messages larger than ``max_bytes`` before their body is read."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"--max-message-bytes must not be negative, got {max_bytes}")
        self.max_bytes = max_bytes

    def admit(self, call: Call) -> Release | None:
        stream = call.stream

        async def recv_message() -> Any:
            return await recv_limited(stream, self.max_bytes)

        stream.recv_message = recv_message  # type: ignore[method-assign]
        return None


async def recv_limited(stream: Stream[Any, Any], max_bytes: int) -> Any:
    """grpclib's ``Stream.recv_message`` (0.4.x), with the announced length checked first.

    Unlike grpclib, a message cut short by the end of the stream is INVALID_ARGUMENT (grpclib: an
    AssertionError, so INTERNAL), an empty DATA frame is not the end of the stream (grpclib: INTERNAL),
    a unary call without a request message, or with more than one, is INVALID_ARGUMENT (grpclib hands
    the handler None, or ignores the rest; grpc-java refuses both), and a compressed message is inflated
    (see :mod:`orders.compression`; grpclib: NotImplementedError, so INTERNAL), within the same limit.
    Then the request's repeated fields are counted (see ``_check_counts``) and it is decoded.
    """
    h2_stream = stream._stream
    prefix = await _read(h2_stream, _PREFIX.size, end_ok=True)
    if not prefix:
        if not stream._cardinality.client_streaming and not stream._messages_received:
            raise InvalidArgument("the call ended without a request message")
        return None
    compressed, length = _PREFIX.unpack(prefix)
    if length > max_bytes:
        raise ResourceExhausted(
            f"request message is {length:,} bytes; the limit is {max_bytes:,} (--max-message-bytes)"
        )
    data = await _read(h2_stream, length, end_ok=False)
    if compressed:
        data = decompressed(data, request_encoding(h2_stream), max_bytes)
    if not stream._cardinality.client_streaming and await _read(h2_stream, 1, end_ok=True):
        raise InvalidArgument("a call of this method carries one request message; this one carried more")
    _check_counts(data, stream._recv_type)
    message = stream._codec.decode(data, stream._recv_type)
    # the rest is what grpclib's Stream.recv_message does after decoding: events and counters
    (message,) = await stream._dispatch.recv_message(message)
    stream._messages_received += 1
    connection = h2_stream.connection
    connection.messages_received += 1
    connection.last_message_received = time.monotonic()
    return message


async def _read(h2_stream: Any, size: int, *, end_ok: bool) -> bytes:
    """``size`` bytes of the request stream; b"" at its end if ``end_ok``; else INVALID_ARGUMENT.

    grpclib's buffer takes an empty DATA frame (legal HTTP/2) for the end of the stream and stops short
    (an AssertionError, or b""); then, unless the stream really has ended, this reads on.
    """
    buffer = h2_stream.buffer
    while True:
        try:
            data: bytes | None = await h2_stream.recv_data(size)
        except AssertionError:
            data = None
        if data is not None and len(data) == size:
            return data
        if buffer._eof and buffer._unacked.empty():
            break
    if end_ok and data == b"":
        return data
    what = "message prefix" if end_ok else f"{size:,}-byte message its prefix announced"
    raise InvalidArgument(f"the request stream ended in the middle of a message: the {what} is incomplete")


# Repeated fields are counted before decoding: betterproto2 decodes in pure Python, on the event loop
# (~6 us an item), and 4 MiB holds two million empty items or four million packed statuses: a stall of
# 13-25 s for every client. The C protobuf runtime counts them in milliseconds. Each rule: the field, the
# most entries allowed, the fewest bytes an entry takes (smaller messages cannot break the rule, so they
# skip the count), and the message.
MAX_STATUS_FILTERS = 1_000
MAX_WATCH_ORDER_IDS = 10_000
_REPEATED_LIMITS: dict[type, tuple[str, int, int, str]] = {
    CreateOrderRequest: ("items", domain.MAX_ITEMS, 2, "an order may have at most {limit:,} items, got {count:,}"),
    ListOrdersRequest: ("statuses", MAX_STATUS_FILTERS, 1, "statuses may list at most {limit:,} values, got {count:,}"),
    OrderStatusStreamRequest: (
        "order_ids",
        MAX_WATCH_ORDER_IDS,
        2,
        "a stream may watch at most {limit:,} order_ids, got {count:,}; watch all orders (no order_ids) instead",
    ),
}


def _check_counts(data: bytes, message_type: Any) -> None:
    """Raise InvalidArgument if a repeated field of the request has more entries than its rule allows."""
    rule = _REPEATED_LIMITS.get(message_type)
    if rule is None:
        return
    name, limit, entry_bytes, message = rule
    if len(data) <= limit * entry_bytes:
        return
    try:
        count = len(getattr(_protobuf_class(message_type).FromString(data), name))
    except DecodeError:
        return  # malformed: the codec says so (INVALID_ARGUMENT) without decoding much
    if count > limit:
        raise InvalidArgument(message.format(limit=limit, count=count))


class StreamLimits:
    """Cap open OrderStatusStream calls in all and per connection; the slot is freed when the call ends."""

    def __init__(self, max_watchers: int, max_per_connection: int, method: str = WATCH_METHOD) -> None:
        self.max_watchers = max_watchers
        self.max_per_connection = max_per_connection
        self.method = method
        self.open = 0
        self._per_connection: dict[object, int] = {}

    def admit(self, call: Call) -> Release | None:
        if call.method != self.method:
            return None
        if self.open >= self.max_watchers:
            raise ResourceExhausted(
                f"{self.open:,} OrderStatusStream calls are open on this server; the limit is "
                f"{self.max_watchers:,} (--max-watchers); retry later"
            )
        connection = _connection_of(call)
        on_connection = self._per_connection.get(connection, 0)
        if on_connection >= self.max_per_connection:
            raise ResourceExhausted(
                f"{on_connection:,} OrderStatusStream calls are open on this connection; the limit is "
                f"{self.max_per_connection:,} per connection (--max-streams-per-connection); "
                "close one or open another connection"
            )
        self.open += 1
        self._per_connection[connection] = on_connection + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open -= 1
            left = self._per_connection[connection] - 1
            if left:
                self._per_connection[connection] = left
            else:
                del self._per_connection[connection]

        return release


def _connection_of(call: Call) -> object:
    """A key for the call's HTTP/2 connection: its transport (one per connection), else the peer address."""
    peer = call.stream.peer
    transport = getattr(peer, "_transport", None)
    return transport if transport is not None else peer.addr()
