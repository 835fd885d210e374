"""The gRPC servicer: wire messages in, domain decisions and storage calls, wire messages out.

The only module that touches both the generated messages and the domain. Errors are raised as
:mod:`orders.errors` exceptions; :mod:`orders.calls` turns them into gRPC status codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from orders import domain, wire
from orders._proto.orders.v1 import OrderServiceBase
from orders.calls import FramedMessages, framed, send_framed
from orders.feed import Feed
from orders.storage_threads import Storage

# Seconds after a stream was woken for events before it is woken again: with 1,000 watchers of every
# order, one write per event per stream is a million sends a second at 1,000 changes a second. A stream
# that was not woken within the window (most of them, when each watches a few orders) is woken at once.
BATCH_WINDOW = 0.01


def new_feed(storage: Storage, poll_interval: float) -> Feed[FramedMessages]:
    """A feed over ``storage``'s event log that renders each event once, as a framed wire StatusUpdate; it
    reads the log for other processes' commits every ``poll_interval`` s, besides whenever it is notified,
    and wakes each stream at most once per BATCH_WINDOW, sending it what arrived meanwhile in one write."""
    repository = storage.repository
    return Feed(
        read_events=lambda after, order_ids, limit: storage.read(repository.events_after, after, order_ids, limit),
        read_bounds=lambda: storage.read(repository.log_bounds),
        render=lambda event: framed(wire.status_update(event)),
        render_heartbeat=lambda head: framed(wire.heartbeat(head)),
        poll_interval=poll_interval,
        batch_window=BATCH_WINDOW,
    )


class OrderService(OrderServiceBase):
    """orders.v1.OrderService over a :class:`Storage` and its :class:`Feed`."""

    def __init__(self, storage: Storage, feed: Feed[FramedMessages]) -> None:
        self._storage = storage
        self._repository = storage.repository
        self._feed = feed

    # Requests are protobuf-runtime messages of the declared types' descriptors; replies carrying orders
    # are sent as encoded (the repository stores orders encoded). See orders.wire and
    # orders.calls.StrictProtoCodec.

    async def create_order(self, message: wire.Request) -> wire.Reply:  # type: ignore[override]
        new = domain.validate_new_order(
            [(item.product_name, item.quantity, item.price) for item in message.items],
            message.total_amount,
            message.currency_code,
        )
        request_id = domain.parse_request_id(message.request_id)
        order, event = await self._storage.write_together(self._repository.create_orders, (new, request_id))
        if event is not None:
            self._feed.notify(event.sequence)
        return wire.order_reply(order)

    async def get_order(self, message: wire.Request) -> wire.Reply:  # type: ignore[override]
        order_id = domain.parse_order_id(message.id)
        order = await self._storage.read_together(self._repository.get_orders, order_id)
        return wire.order_reply(order)

    async def update_order_status(self, message: wire.Request) -> wire.Reply:  # type: ignore[override]
        return await self._change_status(message.id, domain.parse_status(message.status), message.expected_version)

    async def cancel_order(self, message: wire.Request) -> wire.Reply:  # type: ignore[override]
        return await self._change_status(message.id, domain.Status.CANCELLED, message.expected_version)

    async def _change_status(self, raw_id: str, target: domain.Status, expected_version: int) -> wire.EncodedReply:
        order_id = domain.parse_order_id(raw_id)
        expected = domain.parse_expected_version(expected_version)
        change = (order_id, target, expected)
        order, event = await self._storage.write_together(self._repository.change_statuses, change)
        if event is not None:
            self._feed.notify(event.sequence)
        return wire.order_reply(order)

    async def list_orders(self, message: wire.Request) -> wire.Reply:  # type: ignore[override]
        query = domain.parse_list_query(message.page_size, message.page_token, message.statuses)
        orders, last_key = await self._storage.read(self._repository.list_orders, query)
        token = "" if last_key is None else domain.encode_page_token(query.statuses, last_key)
        return wire.list_orders_reply(orders, token)

    async def order_status_stream(  # type: ignore[override]  # StatusUpdates, sent pre-encoded
        self, message: wire.Request
    ) -> AsyncIterator[FramedMessages]:
        after_sequence = message.after_sequence if message.HasField("after_sequence") else None
        query = domain.parse_watch_query(message.order_ids, after_sequence, message.heartbeat_seconds)
        # The first batch, empty, says that the watch is registered: the response headers go out then, so
        # a client waiting for them (gRPC Go's Header(), proxies) knows the call runs before any update.
        async with contextlib.aclosing(self._feed.watch(query, announce=True)) as batches:  # see below
            async for batch in batches:
                yield FramedMessages(b"".join(batch))

    async def _call_rpc_handler_server_stream(self, handler: Callable[..., Any], stream: Any, request: Any) -> None:
        """betterproto2's loop that sends a server stream, but closing the generator however it ends.

        A client that cancels, hits its deadline or disconnects while the server waits to send (HTTP/2
        flow control: the client stopped reading) cancels this task outside the generator. The base class
        then just drops the generator, which its local variable keeps alive as long as the exception's
        traceback lives (grpclib keeps it with the finished task): the generator's ``finally``, where the
        feed unregisters the watcher, would run seconds later or only after a garbage collection.
        """
        async with contextlib.aclosing(handler(request)) as responses:
            async for response in responses:
                await send_framed(stream, response)
