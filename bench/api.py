"""The calls the load generator makes, behind one small interface with two implementations.

* :class:`StubApi` uses the generated betterproto2 ``OrderServiceStub``: what a Python user of the
  contract pays on the client side (pure-Python encoding and decoding of every message).
* :class:`UpbApi` makes the same calls through grpclib with the protobuf runtime's (upb, C) message
  classes for the same descriptors, so the client spends as little CPU per call as the baseline's
  client does. On a 2-core machine the load generator shares the CPU with the server, so a cheaper
  client leaves more of it to the server being measured.

Both speak through plain grpclib :class:`~grpclib.client.Channel` objects with grpclib's ProtoCodec,
exactly like the baseline's client.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

from google.protobuf import message_factory
from google.protobuf.empty_pb2 import Empty
from grpclib.client import Channel, UnaryStreamMethod, UnaryUnaryMethod

from bench.baseline import METHOD as BASELINE_METHOD
from orders._proto.orders.v1 import (
    CreateOrderRequest,
    CreateOrderResponse,
    GetOrderRequest,
    GetOrderResponse,
    ListOrdersRequest,
    ListOrdersResponse,
    OrderItem,
    OrderServiceStub,
    OrderStatusStreamRequest,
    StatusUpdate,
    UpdateOrderStatusRequest,
    UpdateOrderStatusResponse,
)

SERVICE = "/orders.v1.OrderService/"
CALL_TIMEOUT = 30.0  # seconds; a call that takes longer counts as an error (DEADLINE_EXCEEDED)

# Item sets for CreateOrder (1–3 items each), fixed so every run sends the same kind of payloads.
_PRODUCTS = ("Laptop", "Mouse", "Keyboard", "Monitor 27in", "USB-C cable", "Desk lamp", "Headphones", "Webcam")


def item_sets(count: int = 64, seed: int = 7) -> list[list[tuple[str, int, float]]]:
    """``count`` lists of 1–3 (product name, quantity, price) items, deterministic for ``seed``."""
    rng = random.Random(seed)
    return [
        [(rng.choice(_PRODUCTS), rng.randint(1, 5), rng.randint(100, 200_000) / 100) for _ in range(rng.randint(1, 3))]
        for _ in range(count)
    ]


ITEM_SETS = item_sets()


class Api(Protocol):
    """One caller's view of a server: each method is one RPC; errors raise grpclib's GRPCError."""

    async def create(self, item_set: int, request_id: str) -> tuple[str, int]:
        """CreateOrder with ``ITEM_SETS[item_set]``; return the new order's (id, version)."""
        ...

    async def get(self, order_id: str) -> None:
        """GetOrder."""
        ...

    async def list(self, page_token: str, page_size: int) -> str:
        """ListOrders; return the next page token."""
        ...

    async def update(self, order_id: str, status: int, expected_version: int) -> int:
        """UpdateOrderStatus; return the order's new version."""
        ...

    async def empty(self) -> None:
        """The baseline's trivial call (Empty in, Empty out)."""
        ...


class StubApi:
    """:class:`Api` through the generated betterproto2 ``OrderServiceStub``."""

    def __init__(self, channel: Channel, timeout: float = CALL_TIMEOUT) -> None:
        self._stub = OrderServiceStub(channel, timeout=timeout)
        self._items = [[OrderItem(product_name=n, quantity=q, price=p) for n, q, p in s] for s in ITEM_SETS]
        self._empty = UnaryUnaryMethod(channel, BASELINE_METHOD, Empty, Empty)
        self._timeout = timeout

    async def create(self, item_set: int, request_id: str) -> tuple[str, int]:
        reply = await self._stub.create_order(CreateOrderRequest(items=self._items[item_set], request_id=request_id))
        assert reply.order is not None
        return reply.order.id, reply.order.version

    async def get(self, order_id: str) -> None:
        await self._stub.get_order(GetOrderRequest(id=order_id))

    async def list(self, page_token: str, page_size: int) -> str:
        reply = await self._stub.list_orders(ListOrdersRequest(page_size=page_size, page_token=page_token))
        return reply.next_page_token

    async def update(self, order_id: str, status: int, expected_version: int) -> int:
        reply = await self._stub.update_order_status(
            UpdateOrderStatusRequest(id=order_id, status=status, expected_version=expected_version)  # type: ignore[arg-type]
        )
        assert reply.order is not None
        return reply.order.version

    async def empty(self) -> None:
        await self._empty(Empty(), timeout=self._timeout)


def upb(message_type: Any) -> Any:
    """The protobuf runtime's message class for a generated betterproto2 message type."""
    return message_factory.GetMessageClass(message_type.DESCRIPTOR)


class UpbApi:
    """:class:`Api` through grpclib with the protobuf runtime's message classes (cheap on the client)."""

    def __init__(self, channel: Channel, timeout: float = CALL_TIMEOUT) -> None:
        self._timeout = timeout
        self._create_request = upb(CreateOrderRequest)
        self._get_request = upb(GetOrderRequest)
        self._list_request = upb(ListOrdersRequest)
        self._update_request = upb(UpdateOrderStatusRequest)
        item = upb(OrderItem)
        self._items = [[item(product_name=n, quantity=q, price=p) for n, q, p in s] for s in ITEM_SETS]
        self._create = UnaryUnaryMethod(
            channel, SERVICE + "CreateOrder", self._create_request, upb(CreateOrderResponse)
        )
        self._get = UnaryUnaryMethod(channel, SERVICE + "GetOrder", self._get_request, upb(GetOrderResponse))
        self._list = UnaryUnaryMethod(channel, SERVICE + "ListOrders", self._list_request, upb(ListOrdersResponse))
        self._update = UnaryUnaryMethod(
            channel, SERVICE + "UpdateOrderStatus", self._update_request, upb(UpdateOrderStatusResponse)
        )
        self._empty = UnaryUnaryMethod(channel, BASELINE_METHOD, Empty, Empty)

    async def create(self, item_set: int, request_id: str) -> tuple[str, int]:
        request = self._create_request(items=self._items[item_set], request_id=request_id)
        reply = await self._create(request, timeout=self._timeout)
        return reply.order.id, reply.order.version

    async def get(self, order_id: str) -> None:
        await self._get(self._get_request(id=order_id), timeout=self._timeout)

    async def list(self, page_token: str, page_size: int) -> str:
        reply = await self._list(self._list_request(page_size=page_size, page_token=page_token), timeout=self._timeout)
        return str(reply.next_page_token)

    async def update(self, order_id: str, status: int, expected_version: int) -> int:
        request = self._update_request(id=order_id, status=status, expected_version=expected_version)
        reply = await self._update(request, timeout=self._timeout)
        return int(reply.order.version)

    async def empty(self) -> None:
        await self._empty(Empty(), timeout=self._timeout)


CLIENTS: dict[str, type[StubApi] | type[UpbApi]] = {"stub": StubApi, "upb": UpbApi}


def watch_method(channel: Channel) -> tuple[UnaryStreamMethod[Any, Any], Any]:
    """OrderStatusStream with upb messages, and its request class (for many cheap watchers)."""
    request = upb(OrderStatusStreamRequest)
    return UnaryStreamMethod(channel, SERVICE + "OrderStatusStream", request, upb(StatusUpdate)), request


def open_channels(host: str, port: int, count: int) -> list[Channel]:
    """``count`` independent grpclib channels (one HTTP/2 connection each) to ``host:port``."""
    return [Channel(host, port) for _ in range(count)]


def close_channels(channels: Sequence[Channel]) -> None:
    """Close every channel."""
    for channel in channels:
        channel.close()
