"""Streams under stress (issue 4, guarantee 4): watchers that stop reading cost bounded memory and do
not slow writers, and streams ended by the client (cancel, deadline, disconnect) leave no task or
watcher behind in the server. The server runs in this process so its feed, memory and tasks can be
inspected; the clients talk to it over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import tracemalloc
from collections.abc import AsyncIterator

import pytest
from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from test_stream import STREAM_METHOD, TAILER_TASK, create, eventually, open_watch, set_status

from orders._proto.orders.v1 import (
    CreateOrderRequest,
    CreateOrderResponse,
    OrderItem,
    OrderServiceStub,
    OrderStatus,
    OrderStatusStreamRequest,
    StatusUpdate,
    UpdateOrderStatusRequest,
)
from orders.server import OrderServer

STALLED = 20
# The smallest HTTP/2 windows: a client that does not read stalls the server's generators after 64 KiB
# per connection, after which the feed's bounded queues overflow.
SMALL_WINDOWS = Configuration(http2_connection_window_size=2**16 - 1, http2_stream_window_size=2**16 - 1)


@contextlib.asynccontextmanager
async def stalled_watchers(server: OrderServer, count: int = STALLED) -> AsyncIterator[list[Stream]]:
    """``count`` all-orders streams on two connections whose client never reads a message."""
    channels = [Channel("127.0.0.1", server.port, config=SMALL_WINDOWS) for _ in range(2)]
    before = server.feed.watcher_count
    try:
        async with contextlib.AsyncExitStack() as streams:
            opened = []
            for i in range(count):
                stream = await streams.enter_async_context(
                    channels[i % 2].request(
                        STREAM_METHOD, Cardinality.UNARY_STREAM, OrderStatusStreamRequest, StatusUpdate
                    )
                )
                await stream.send_message(OrderStatusStreamRequest(), end=True)
                opened.append(stream)
            await eventually(lambda: server.feed.watcher_count == before + count, "the streams to register")
            yield opened
            for stream in opened:
                await stream.cancel()
    finally:
        for channel in channels:
            channel.close()


async def burst(stub: OrderServiceStub, n: int) -> None:
    """``n`` committed events: n // 2 concurrent creates, each then confirmed."""
    orders = await asyncio.gather(*(create(stub, f"burst {i}") for i in range(n // 2)))
    await asyncio.gather(*(set_status(stub, o.id, OrderStatus.CONFIRMED) for o in orders))


def largest_queue(server: OrderServer) -> int:
    return max((len(w.pending) for w in server.feed._watchers), default=0)


async def write_events(server: OrderServer, n: int) -> None:
    """``n`` committed events through the service in this process (n // 2 creates, each then confirmed):
    no client connection whose own bookkeeping would be measured with the server."""
    request = CreateOrderRequest(items=[OrderItem(product_name="widget", quantity=1, price=1.0)])
    replies = await asyncio.gather(*(server.service.create_order(request) for _ in range(n // 2)))
    created = [CreateOrderResponse.parse(reply).order for reply in replies]
    await asyncio.gather(
        *(
            server.service.update_order_status(UpdateOrderStatusRequest(id=o.id, status=OrderStatus.CONFIRMED))
            for o in created
        )
    )


async def traced_bytes(server: OrderServer, head: int) -> int:
    await eventually(lambda: server.feed.head == head, "the tailer to publish every event", timeout=10)
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def test_watchers_that_stop_reading_do_not_grow_server_memory(server, no_gc):
    capacity = 64
    server.feed._queue_capacity = capacity
    head = 0

    async def write_and_check_queues(rounds: int) -> None:
        nonlocal head
        for _ in range(rounds):
            await write_events(server, 100)
            head += 100
            largest = largest_queue(server)
            assert largest <= capacity, f"a watcher's queue holds {largest} updates, more than {capacity}"

    async with stalled_watchers(server):
        watchers = set(server.feed._watchers)
        # fill the HTTP/2 windows (~64 KiB per connection), then overflow every queue
        rounds = 0
        while not all(w.lagged for w in watchers):
            rounds += 1
            assert rounds <= 20, "the stalled watchers never fell behind; the test would prove nothing"
            await write_and_check_queues(1)
        await write_and_check_queues(10)
        events = 1000
        tracemalloc.start()
        try:
            before = await traced_bytes(server, head)
            await write_and_check_queues(events // 100)
            growth = await traced_bytes(server, head) - before
        finally:
            tracemalloc.stop()
        assert server.feed.watcher_count == STALLED
        assert all(w.lagged for w in watchers), "a stalled watcher should stay behind, not be fed"
    # Keeping each update for each stalled watcher costs about STALLED x events x 80 bytes (a queue
    # entry) = ~1.5 MiB here, as measured with unbounded queues; a bounded feed keeps nothing per event.
    assert growth < 512 * 1024, f"server memory grew by {growth / 1024:.0f} KiB over {events} events"
    # cancelled while the server waits to send to them: their watchers (and queues) go at once
    await eventually(lambda: server.feed.watcher_count == 0, "the stalled watchers to be dropped")


# --- (b) writers -----------------------------------------------------------------------------------


async def time_creates(stub: OrderServiceStub, n: int) -> float:
    """Best of three: seconds for ``n`` sequential creates."""
    request = CreateOrderRequest(items=[OrderItem(product_name="timed", quantity=1, price=1.0)])
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(n):
            await asyncio.wait_for(stub.create_order(request), 10)
        best = min(best, time.perf_counter() - started)
    return best


async def test_watchers_that_stop_reading_do_not_slow_writers(server, stub):
    n = 60
    server.feed._queue_capacity = 64  # they fall behind sooner; the queues' size is not what is timed
    await time_creates(stub, 10)  # warm up connection, database and code paths
    without = await time_creates(stub, n)
    async with stalled_watchers(server):
        watchers = set(server.feed._watchers)
        rounds = 0
        while not all(w.lagged for w in watchers):
            rounds += 1
            assert rounds <= 20, "the stalled watchers never fell behind"
            await burst(stub, 100)
        with_stalled = await time_creates(stub, n)
        assert server.feed.watcher_count == STALLED
    # Sequential fsyncs, which a checkpoint after the bursts can slow down; writers held up by the stalled
    # watchers would take many times as long, or hang.
    ratio = with_stalled / without
    assert ratio < 5, f"{n} creates took {with_stalled:.3f}s with {STALLED} stalled watchers, {without:.3f}s without"


# --- (c) no leaks ------------------------------------------------------------------------------------


async def settle(server: OrderServer, baseline: set[asyncio.Task], what: str) -> None:
    """Every task started since ``baseline`` has ended and the feed has no watchers."""

    def tailer_poll(task: asyncio.Task) -> bool:  # the tailer's poll timer, renewed on every poll
        frame = getattr(task.get_coro(), "cr_frame", None)
        return frame is not None and frame.f_locals.get("self") is server.feed._new_events

    def extra() -> set[asyncio.Task]:
        tasks = asyncio.all_tasks() - baseline - {asyncio.current_task()}
        return {t for t in tasks if not t.done() and not tailer_poll(t)}

    try:
        await eventually(lambda: server.feed.watcher_count == 0 and not extra(), what, timeout=5)
    except AssertionError:
        leaked = sorted(f"{t.get_name()}: {t.get_coro()}" for t in extra())
        raise AssertionError(f"{what}: {server.feed.watcher_count} watchers, leaked tasks {leaked}") from None


@pytest.mark.parametrize("heartbeat", [0, 1])
async def test_cancel_and_deadline_leave_no_tasks_or_watchers_behind(server, stub, heartbeat, no_gc):
    for _ in range(5):
        await burst(stub, 20)  # a log to replay
    head = server.feed.head
    baseline = set(asyncio.all_tasks())
    assert any(t.get_name() == TAILER_TASK for t in baseline)

    # 1. live and replaying streams, ended by the client's cancel
    watches = [
        await open_watch(server, stub, OrderStatusStreamRequest(heartbeat_seconds=heartbeat)),
        await open_watch(server, stub, OrderStatusStreamRequest(after_sequence=0, heartbeat_seconds=heartbeat)),
    ]
    await watches[1].wait_for_sequence(head)
    for watch in watches:
        await watch.close()
    await settle(server, baseline, "after the client cancelled")

    # 2. streams ended by their deadline, idle and in the middle of a slow catch-up read
    read_events = server.feed._read_events

    async def slow_catch_up(after, order_ids, limit):
        if asyncio.current_task().get_name() != TAILER_TASK:
            await asyncio.sleep(0.05)
        return await read_events(after, order_ids, limit)

    server.feed._read_events = slow_catch_up
    server.feed._page_size = 3
    try:
        watches = [
            await open_watch(server, stub, OrderStatusStreamRequest(heartbeat_seconds=heartbeat), timeout=0.5),
            await open_watch(
                server, stub, OrderStatusStreamRequest(after_sequence=0, heartbeat_seconds=heartbeat), timeout=0.5
            ),
        ]
        for watch in watches:
            error = await watch.ended(timeout=5)
            assert isinstance(error, (GRPCError, asyncio.TimeoutError)), repr(error)
        assert 0 < len(watches[1].updates) < head, "the deadline should strike in the middle of the replay"
        await settle(server, baseline, "after the deadlines")
    finally:
        server.feed._read_events = read_events
        server.feed._page_size = 500

    # and the server still streams
    watch = await open_watch(server, stub, OrderStatusStreamRequest())
    try:
        order = await create(stub, "still streaming")
        await watch.wait_for(lambda u: any(x.order_id == order.id for x in u), "a live update")
    finally:
        await watch.close()
    await settle(server, baseline, "at the end")


async def open_raw(channel: Channel, request: OrderStatusStreamRequest, timeout: float | None = None) -> Stream:
    """A stream whose messages this test never reads (closed with the channel)."""
    stream = channel.request(
        STREAM_METHOD, Cardinality.UNARY_STREAM, OrderStatusStreamRequest, StatusUpdate, timeout=timeout
    )
    await stream.__aenter__()
    await stream.send_message(request, end=True)
    return stream


async def test_streams_stalled_by_flow_control_end_on_cancel_deadline_and_disconnect(server, stub, no_gc):
    """The server's generator is blocked sending (the client stopped reading) and its queue overflowed:
    cancel, deadline and disconnect still end it promptly and free its task and watcher."""
    server.feed._queue_capacity = 8
    for _ in range(10):
        await burst(stub, 100)  # replaying 1,000 updates overflows 64 KiB windows at once
    baseline = set(asyncio.all_tasks())
    channel = Channel("127.0.0.1", server.port, config=SMALL_WINDOWS)
    other = Channel("127.0.0.1", server.port, config=SMALL_WINDOWS)
    try:
        replay = OrderStatusStreamRequest(after_sequence=0, heartbeat_seconds=1)
        cancelled = await open_raw(channel, replay)
        timed_out = await open_raw(channel, replay, timeout=3)
        opened = time.monotonic()
        await open_raw(other, replay)
        await open_raw(other, OrderStatusStreamRequest(after_sequence=0))  # no heartbeat
        await eventually(lambda: server.feed.watcher_count == 4, "the streams to register")
        watchers = set(server.feed._watchers)
        await asyncio.sleep(0.3)
        assert not any(w.live for w in watchers), "the replays should be stuck in their catch-up"
        await burst(stub, 20)  # offered while they are stuck: every queue overflows
        await eventually(lambda: all(w.lagged for w in watchers), "every stalled stream to fall behind")

        await cancelled.cancel()
        await eventually(lambda: server.feed.watcher_count == 3, "the cancelled stream to end", timeout=2)
        other.close()
        await eventually(lambda: server.feed.watcher_count == 1, "the disconnected streams to end", timeout=2)
        # the server enforces the deadline of the last one although it is still stalled (nothing read)
        await eventually(lambda: server.feed.watcher_count == 0, "the timed-out stream to end", timeout=5)
        assert time.monotonic() - opened < 3 + 1.5, "the deadline was not enforced promptly"
        with pytest.raises((GRPCError, StreamTerminatedError, asyncio.TimeoutError)) as caught:
            await asyncio.wait_for(drain(timed_out), 10)
        if isinstance(caught.value, GRPCError):
            assert caught.value.status == Status.DEADLINE_EXCEEDED, caught.value
    finally:
        channel.close()
        other.close()
    await settle(server, baseline, "after the stalled streams ended")


async def drain(stream: Stream) -> None:
    """Read a stream to its end; its final status raises GRPCError if it is not OK."""
    while await stream.recv_message() is not None:
        pass
    await stream.recv_trailing_metadata()
    raise AssertionError("the stream ended with OK")


# --- a slow database ---------------------------------------------------------------------------------


async def test_a_live_stream_gets_every_change_committed_once_it_is_registered_even_when_reads_are_slow(server, stub):
    """A busy reader thread delays the head read that opens a live-only stream: a change committed while it
    waits is still after the call was accepted (the stream already counts as a watcher) and must arrive."""
    read_bounds = server.feed._read_bounds

    async def slow_bounds() -> tuple[int, int]:
        if asyncio.current_task().get_name() != TAILER_TASK:
            await asyncio.sleep(0.3)
        return await read_bounds()

    await create(stub, "before")
    server.feed._read_bounds = slow_bounds
    watch = await open_watch(server, stub, OrderStatusStreamRequest())
    try:
        order = await create(stub, "after the stream was registered")
        await watch.wait_for(lambda u: any(x.order_id == order.id for x in u), "the change", timeout=5)
        assert [u.order_id for u in watch.updates] == [order.id]
    finally:
        server.feed._read_bounds = read_bounds
        await watch.close()
