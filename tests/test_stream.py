"""OrderStatusStream over a real socket: live, replay-then-live, filters, heartbeats, lagging
watchers, cancellation and shutdown (DESIGN.md "Stream semantics")."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from orders import domain
from orders._proto.orders.v1 import (
    CreateOrderRequest,
    Order,
    OrderItem,
    OrderServiceStub,
    OrderStatus,
    OrderStatusStreamRequest,
    StatusUpdate,
    UpdateOrderStatusRequest,
)
from orders.domain import EventPage, StatusEvent, WatchQuery
from orders.feed import MAX_CATCHING_UP, Feed
from orders.server import OrderServer, ServerConfig

STREAM_METHOD = "/orders.v1.OrderService/OrderStatusStream"
TAILER_TASK = "orders-feed-tailer"


# --- helpers -------------------------------------------------------------------------------------


async def create(stub: OrderServiceStub, name: str = "Widget") -> Order:
    request = CreateOrderRequest(items=[OrderItem(product_name=name, quantity=2, price=2.5)])
    response = await asyncio.wait_for(stub.create_order(request), 10)
    assert response.order is not None
    return response.order


async def set_status(stub: OrderServiceStub, order_id: str, status: OrderStatus) -> Order:
    request = UpdateOrderStatusRequest(id=order_id, status=status)
    response = await asyncio.wait_for(stub.update_order_status(request), 10)
    assert response.order is not None
    return response.order


async def event_log(server: OrderServer, after: int = 0, order_ids: tuple[str, ...] = ()) -> list[StatusEvent]:
    repository = server.storage.repository
    return (await server.storage.read(repository.events_after, after, order_ids, 1_000_000)).events


async def log_head(server: OrderServer) -> int:
    _, head = await server.storage.read(server.storage.repository.log_bounds)
    return head


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def as_tuple(update: StatusUpdate) -> tuple[object, ...]:
    return (update.sequence, update.order_id, update.previous_status, update.status, update.timestamp)


EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def event_tuple(event: StatusEvent) -> tuple[object, ...]:
    return (
        event.sequence,
        event.order_id,
        OrderStatus(event.previous or 0),
        OrderStatus(event.status),
        EPOCH + datetime.timedelta(microseconds=event.time_us),
    )


class Watch:
    """A stream consumed by a background task; updates pile up in ``updates``."""

    def __init__(self, stub: OrderServiceStub, request: OrderStatusStreamRequest, **kwargs: object) -> None:
        self.updates: list[StatusUpdate] = []
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(stub, request, kwargs))

    async def _run(self, stub: OrderServiceStub, request: OrderStatusStreamRequest, kwargs: dict) -> None:
        try:
            async for update in stub.order_status_stream(request, **kwargs):
                self.updates.append(update)
                self._changed.set()
        except Exception as exc:  # kept for the test to inspect
            self.error = exc
        finally:
            self._changed.set()

    @property
    def events(self) -> list[StatusUpdate]:
        """Received updates without heartbeats."""
        return [u for u in self.updates if u.order_id]

    async def wait_for(self, predicate: Callable[[list[StatusUpdate]], bool], what: str, timeout: float = 5.0) -> None:
        async def wait() -> None:
            while not predicate(self.updates):
                if self.task.done():
                    raise AssertionError(f"stream ended ({self.error!r}) before {what}; got {self.updates}")
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; got {self.updates}") from None

    async def wait_for_sequence(self, sequence: int, timeout: float = 5.0) -> None:
        await self.wait_for(
            lambda updates: any(u.sequence >= sequence and u.order_id for u in updates), f"sequence {sequence}", timeout
        )

    async def ended(self, timeout: float = 5.0) -> BaseException | None:
        await asyncio.wait_for(asyncio.shield(self.task), timeout)
        return self.error

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def open_watch(
    server: OrderServer, stub: OrderServiceStub, request: OrderStatusStreamRequest, **kwargs: object
) -> Watch:
    """Open a stream and wait until the server has registered it with the feed."""
    before = server.feed.watcher_count
    watch = Watch(stub, request, **kwargs)
    await eventually(lambda: server.feed.watcher_count > before or watch.task.done(), "the stream to register")
    return watch


async def stream_error(stub: OrderServiceStub, request: OrderStatusStreamRequest) -> GRPCError:
    async def first() -> None:
        async for _ in stub.order_status_stream(request):
            raise AssertionError("the stream sent an update instead of failing")

    with pytest.raises(GRPCError) as caught:
        await asyncio.wait_for(first(), 5)
    return caught.value


# --- live only -----------------------------------------------------------------------------------


async def test_live_only_gets_later_changes_and_nothing_earlier(server, stub):
    earlier = await create(stub, "earlier")
    await set_status(stub, earlier.id, OrderStatus.CONFIRMED)
    watch = await open_watch(server, stub, OrderStatusStreamRequest())
    try:
        start_head = await log_head(server)
        later = await create(stub, "later")
        confirmed = await set_status(stub, earlier.id, OrderStatus.SHIPPED)
        confirmed_later = await set_status(stub, later.id, OrderStatus.CONFIRMED)
        await watch.wait_for_sequence(start_head + 3)
        await asyncio.sleep(0.1)  # anything extra (e.g. a replay of earlier events) would arrive now
        got = watch.updates
        assert [u.sequence for u in got] == [start_head + 1, start_head + 2, start_head + 3]
        creation, shipped, later_confirmed = got
        assert (creation.order_id, creation.previous_status, creation.status) == (
            later.id,
            OrderStatus.UNSPECIFIED,
            OrderStatus.PENDING,
        )
        assert creation.timestamp == later.create_time
        assert (shipped.order_id, shipped.previous_status, shipped.status) == (
            earlier.id,
            OrderStatus.CONFIRMED,
            OrderStatus.SHIPPED,
        )
        assert shipped.timestamp == confirmed.update_time
        assert (later_confirmed.order_id, later_confirmed.previous_status, later_confirmed.status) == (
            later.id,
            OrderStatus.PENDING,
            OrderStatus.CONFIRMED,
        )
        assert later_confirmed.timestamp == confirmed_later.update_time
        assert [as_tuple(u) for u in got] == [event_tuple(e) for e in await event_log(server, start_head)]
    finally:
        await watch.close()


async def test_live_only_skips_changes_acknowledged_before_the_call_even_when_the_feed_lags(server, stub):
    """A change acknowledged before the stream is accepted is not "live", however late the tailer is."""
    gate = asyncio.Event()
    read_events = server.feed._read_events

    async def slow_tailer(after, order_ids, limit):
        if asyncio.current_task().get_name() == TAILER_TASK:
            await gate.wait()
        return await read_events(after, order_ids, limit)

    server.feed._read_events = slow_tailer
    await asyncio.sleep(0.3)  # let the tailer's in-flight poll finish; its next read waits at the gate
    acknowledged = await create(stub, "acknowledged before the watch")
    watch = await open_watch(server, stub, OrderStatusStreamRequest())
    try:
        later = await create(stub, "after the watch")
        gate.set()
        await watch.wait_for(lambda u: any(x.order_id == later.id for x in u), "the later order's creation")
        assert acknowledged.id not in {u.order_id for u in watch.updates}, watch.updates
    finally:
        gate.set()
        await watch.close()


# --- replay then live ----------------------------------------------------------------------------


async def test_replay_from_zero_then_live_without_gap_or_duplicate_while_writes_race(server, stub):
    server.feed._page_size = 7  # replay takes many pages, so writes land between them
    read_events = server.feed._read_events
    heads_seen_by_replay: list[int] = []

    async def slow_replay(after, order_ids, limit):
        if asyncio.current_task().get_name() != TAILER_TASK:
            heads_seen_by_replay.append(await log_head(server))
            await asyncio.sleep(0.05)  # a slow page: the writer gets ahead of the replay
        return await read_events(after, order_ids, limit)

    server.feed._read_events = slow_replay
    ids = [(await create(stub, f"before {i}")).id for i in range(10)]
    for order_id in ids[:5]:
        await set_status(stub, order_id, OrderStatus.CONFIRMED)

    started = asyncio.Event()

    async def writer() -> None:
        for i in range(40):
            if i == 5:
                started.set()
            order = await create(stub, f"during {i}")
            await set_status(stub, order.id, OrderStatus.CANCELLED)

    writing = asyncio.create_task(writer())
    await asyncio.wait_for(started.wait(), 10)
    watch = Watch(stub, OrderStatusStreamRequest(after_sequence=0))
    try:
        await asyncio.wait_for(writing, 20)
        head = await log_head(server)
        await watch.wait_for_sequence(head, timeout=10)
        extra = await create(stub, "after the writer")  # live after the replay and the race
        await watch.wait_for_sequence(head + 1)
        await asyncio.sleep(0.1)
        log = await event_log(server)
        sequences = [u.sequence for u in watch.updates]
        assert sequences == list(range(1, head + 2)), sequences
        assert [as_tuple(u) for u in watch.updates] == [event_tuple(e) for e in log]
        assert watch.updates[-1].order_id == extra.id
        assert len(set(heads_seen_by_replay)) > 1, f"no write landed during the replay: {heads_seen_by_replay}"
    finally:
        await watch.close()


async def test_after_sequence_mid_log_replays_the_rest_then_continues_live(server, stub):
    for i in range(4):
        order = await create(stub, f"order {i}")
        await set_status(stub, order.id, OrderStatus.CONFIRMED)
    head = await log_head(server)
    assert head == 8
    watch = await open_watch(server, stub, OrderStatusStreamRequest(after_sequence=5))
    try:
        await watch.wait_for_sequence(8)
        live = await create(stub, "live")
        await watch.wait_for_sequence(9)
        await asyncio.sleep(0.1)
        assert [u.sequence for u in watch.updates] == [6, 7, 8, 9]
        assert [as_tuple(u) for u in watch.updates] == [event_tuple(e) for e in await event_log(server, 5)]
        assert watch.updates[-1].order_id == live.id
    finally:
        await watch.close()


async def test_after_sequence_at_head_sends_only_new_events(server, stub):
    for i in range(3):
        await create(stub, f"old {i}")
    head = await log_head(server)
    watch = await open_watch(server, stub, OrderStatusStreamRequest(after_sequence=head))
    try:
        await asyncio.sleep(0.2)
        assert watch.updates == []
        new = await create(stub, "new")
        await watch.wait_for_sequence(head + 1)
        await asyncio.sleep(0.1)
        assert [(u.sequence, u.order_id) for u in watch.updates] == [(head + 1, new.id)]
    finally:
        await watch.close()


async def test_after_sequence_zero_on_an_empty_log_waits_for_the_first_event(server, stub):
    watch = await open_watch(server, stub, OrderStatusStreamRequest(after_sequence=0))
    try:
        first = await create(stub)
        await watch.wait_for_sequence(1)
        assert [(u.sequence, u.order_id) for u in watch.updates] == [(1, first.id)]
    finally:
        await watch.close()


@pytest.mark.parametrize("ahead", [1, 1000])
async def test_after_sequence_beyond_head_is_out_of_range_with_the_bounds(server, stub, ahead):
    for i in range(3):
        await create(stub, f"order {i}")
    head = await log_head(server)
    error = await stream_error(stub, OrderStatusStreamRequest(after_sequence=head + ahead))
    assert error.status == Status.OUT_OF_RANGE
    numbers = {int(n) for n in re.findall(r"\d+", error.message or "")}
    assert {head + ahead, head} <= numbers, error.message
    assert {0, 1} & numbers, f"the message should say where the log starts: {error.message}"
    assert server.feed.watcher_count == 0


async def test_after_sequence_one_on_an_empty_log_is_out_of_range(server, stub):
    error = await stream_error(stub, OrderStatusStreamRequest(after_sequence=1))
    assert error.status == Status.OUT_OF_RANGE


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        OrderStatusStreamRequest(after_sequence=-1),
        OrderStatusStreamRequest(after_sequence=-(2**63)),
        OrderStatusStreamRequest(order_ids=["not-a-uuid"]),
        OrderStatusStreamRequest(order_ids=[str(uuid.uuid4()), ""]),
        OrderStatusStreamRequest(order_ids=[str(uuid.uuid4()) + "x"]),
        OrderStatusStreamRequest(heartbeat_seconds=-1),
    ],
    ids=[
        "after_sequence=-1",
        "after_sequence=min",
        "order_id-garbage",
        "order_id-empty",
        "order_id-suffix",
        "heartbeat=-1",
    ],
)
async def test_invalid_stream_requests_are_invalid_argument(server, stub, request_):
    await create(stub)
    error = await stream_error(stub, request_)
    assert error.status == Status.INVALID_ARGUMENT
    assert error.message
    assert server.feed.watcher_count == 0


# --- order_ids filter ------------------------------------------------------------------------------


async def test_unknown_order_id_is_allowed_and_receives_no_foreign_events(server, stub):
    unknown = str(uuid.uuid4())
    watch = await open_watch(server, stub, OrderStatusStreamRequest(order_ids=[unknown], heartbeat_seconds=1))
    try:
        for i in range(3):
            order = await create(stub, f"other {i}")
            await set_status(stub, order.id, OrderStatus.CONFIRMED)
        head = await log_head(server)
        # the heartbeat only comes when the watcher is idle and up to date: nothing foreign was sent
        await watch.wait_for(lambda u: any(x.sequence == head for x in u), f"a heartbeat at head {head}", timeout=4)
        assert watch.error is None
        assert all(u.order_id == "" for u in watch.updates), watch.updates
    finally:
        await watch.close()


async def test_order_ids_filter_replays_and_streams_only_those_orders(server, stub):
    a, b, c = [await create(stub, name) for name in "abc"]
    await set_status(stub, a.id, OrderStatus.CONFIRMED)
    await set_status(stub, b.id, OrderStatus.CONFIRMED)
    replaying = await open_watch(server, stub, OrderStatusStreamRequest(order_ids=[a.id, c.id], after_sequence=0))
    live = await open_watch(server, stub, OrderStatusStreamRequest(order_ids=[c.id]))
    try:
        await set_status(stub, b.id, OrderStatus.SHIPPED)
        await set_status(stub, c.id, OrderStatus.CANCELLED)
        await set_status(stub, a.id, OrderStatus.SHIPPED)
        await create(stub, "d")
        head = await log_head(server)
        expected = [event_tuple(e) for e in await event_log(server, 0, (a.id, c.id))]
        assert len(expected) == 5
        await replaying.wait_for(lambda u: len(u) >= len(expected), "every event of a and c")
        await live.wait_for(lambda u: len(u) >= 1, "c's cancellation")
        await create(stub, "e")
        await asyncio.sleep(0.2)
        assert [as_tuple(u) for u in replaying.updates] == expected
        assert [(u.order_id, u.status) for u in live.updates] == [(c.id, OrderStatus.CANCELLED)]
        assert all(u.sequence <= head for u in replaying.updates + live.updates)
    finally:
        await replaying.close()
        await live.close()


# --- heartbeats ----------------------------------------------------------------------------------


async def test_heartbeat_when_idle_carries_the_log_head(server, stub):
    for i in range(3):
        await create(stub, f"order {i}")
    head = await log_head(server)
    opened = time.monotonic()
    watch = await open_watch(server, stub, OrderStatusStreamRequest(heartbeat_seconds=1))
    try:
        await watch.wait_for(lambda u: len(u) >= 1, "the first heartbeat", timeout=4)
        first_after = time.monotonic() - opened
        beat = watch.updates[0]
        assert beat.order_id == ""
        assert beat.sequence == head
        assert 0.8 <= first_after <= 3, first_after

        order = await create(stub, "live")
        await watch.wait_for(lambda u: len(u) >= 3, "the event and the next heartbeat", timeout=4)
        event, beat = watch.updates[1:3]
        assert (event.order_id, event.sequence) == (order.id, head + 1)
        assert (beat.order_id, beat.sequence) == ("", head + 1)
    finally:
        await watch.close()


async def test_no_heartbeat_without_heartbeat_seconds(server, stub):
    watch = await open_watch(server, stub, OrderStatusStreamRequest())
    try:
        await asyncio.sleep(1.3)
        assert watch.updates == []
    finally:
        await watch.close()


# --- a watcher that falls behind -----------------------------------------------------------------


async def test_slow_watcher_catches_up_from_the_database_and_rejoins_live(server, stub):
    server.feed._queue_capacity = 4
    server.feed._page_size = 16  # catching up takes many pages
    catch_up_reads = 0
    read_events = server.feed._read_events

    async def counting(after, order_ids, limit):
        nonlocal catch_up_reads
        if asyncio.current_task().get_name() != TAILER_TASK:
            catch_up_reads += 1
        return await read_events(after, order_ids, limit)

    server.feed._read_events = counting
    writers = [await create(stub, f"writer {i}") for i in range(5)]
    start_head = await log_head(server)

    # The smallest HTTP/2 windows HTTP/2 allows: a client that does not read stalls the server's
    # generator after ~64 KiB, and then the feed's queue (capacity 4) overflows.
    config = Configuration(http2_connection_window_size=2**16 - 1, http2_stream_window_size=2**16 - 1)
    channel = Channel("127.0.0.1", server.port, config=config)
    try:
        async with channel.request(
            STREAM_METHOD, Cardinality.UNARY_STREAM, OrderStatusStreamRequest, StatusUpdate
        ) as stream:
            await stream.send_message(OrderStatusStreamRequest(), end=True)
            await eventually(lambda: server.feed.watcher_count == 1, "the stream to register")
            [watcher] = server.feed._watchers

            rounds = 0
            while not watcher.lagged:
                rounds += 1
                assert rounds <= 40, "the watcher never fell behind; the test does not exercise lagging"
                orders = await asyncio.gather(*(create(stub, f"burst {rounds}.{i}") for i in range(50)))
                await asyncio.gather(*(set_status(stub, o.id, OrderStatus.CONFIRMED) for o in orders))
            # more changes while it is behind
            for order in writers:
                await set_status(stub, order.id, OrderStatus.CANCELLED)
            head = await log_head(server)

            received: list[StatusUpdate] = []

            async def read_until(sequence: int) -> None:
                while not received or received[-1].sequence < sequence:
                    update = await stream.recv_message()
                    assert update is not None, "the stream ended"
                    received.append(update)

            await asyncio.wait_for(read_until(head), 20)
            assert catch_up_reads >= 1
            # back on the live queue: a new change arrives without another catch-up from the database
            reads_before = catch_up_reads
            live = await create(stub, "live again")
            await asyncio.wait_for(read_until(head + 1), 5)
            assert received[-1].order_id == live.id
            assert catch_up_reads == reads_before
            await stream.cancel()
    finally:
        channel.close()

    sequences = [u.sequence for u in received]
    assert sequences == list(range(start_head + 1, head + 2)), (
        f"gap or duplicate: {len(sequences)} updates, {len(set(sequences))} distinct, "
        f"expected {start_head + 1}..{head + 1}"
    )
    assert [as_tuple(u) for u in received] == [event_tuple(e) for e in await event_log(server, start_head)]


async def test_lagging_on_a_burst_is_invisible_to_a_filtered_watcher(server, stub):
    """A tailer page larger than the queue overflows it at once; the filtered watcher still gets all."""
    server.feed._queue_capacity = 2
    order = await create(stub)
    gate = asyncio.Event()
    read_events = server.feed._read_events

    async def gated(after, order_ids, limit):
        if asyncio.current_task().get_name() == TAILER_TASK:
            await gate.wait()
        return await read_events(after, order_ids, limit)

    watch = await open_watch(server, stub, OrderStatusStreamRequest(order_ids=[order.id], after_sequence=0))
    try:
        await watch.wait_for_sequence(1)
        server.feed._read_events = gated
        await asyncio.sleep(0.3)  # the tailer's next read now waits at the gate
        for status in (OrderStatus.CONFIRMED, OrderStatus.SHIPPED, OrderStatus.DELIVERED):
            await create(stub, "noise")
            await set_status(stub, order.id, status)
        gate.set()  # one page of 6 events, 3 of them for this watcher: more than its queue holds
        expected = [event_tuple(e) for e in await event_log(server, 0, (order.id,))]
        assert len(expected) == 4
        await watch.wait_for(lambda u: len(u) >= 4, "every event of the order")
        await asyncio.sleep(0.1)
        assert [as_tuple(u) for u in watch.updates] == expected
    finally:
        gate.set()
        await watch.close()


# --- the end of a stream -------------------------------------------------------------------------


@pytest.mark.parametrize("heartbeat", [0, 5])
async def test_client_deadline_ends_the_server_generator(server, stub, heartbeat):
    await create(stub)
    request = OrderStatusStreamRequest(after_sequence=0, heartbeat_seconds=heartbeat)
    watch = await open_watch(server, stub, request, timeout=0.5)
    error = await watch.ended(timeout=5)
    assert isinstance(error, (GRPCError, asyncio.TimeoutError)), repr(error)
    if isinstance(error, GRPCError):
        assert error.status == Status.DEADLINE_EXCEEDED
    await eventually(lambda: server.feed.watcher_count == 0, "the server to drop the watcher", timeout=2)


@pytest.mark.parametrize("how", ["cancel", "close-channel"])
@pytest.mark.parametrize("heartbeat", [0, 1])
async def test_client_cancel_or_disconnect_ends_the_server_generator(server, how, heartbeat):
    channel = Channel("127.0.0.1", server.port)
    stub = OrderServiceStub(channel)
    try:
        order = await create(stub)
        watches = [
            await open_watch(server, stub, OrderStatusStreamRequest(heartbeat_seconds=heartbeat)),
            await open_watch(
                server,
                stub,
                OrderStatusStreamRequest(order_ids=[order.id], after_sequence=0, heartbeat_seconds=heartbeat),
            ),
        ]
        assert server.feed.watcher_count == 2
        await watches[1].wait_for_sequence(1)
        if how == "cancel":
            for watch in watches:
                await watch.close()
        else:
            channel.close()
        await eventually(lambda: server.feed.watcher_count == 0, "the server to drop the watchers", timeout=2)
    finally:
        channel.close()
        for watch in watches:
            await watch.close()


async def test_server_shutdown_ends_streams_with_unavailable(database_url):
    server = OrderServer(ServerConfig(port=0, db=database_url))
    await server.start()
    channel = Channel("127.0.0.1", server.port)
    stub = OrderServiceStub(channel)
    stopped = False
    try:
        order = await create(stub)
        watches = [
            await open_watch(server, stub, OrderStatusStreamRequest()),
            await open_watch(server, stub, OrderStatusStreamRequest(after_sequence=0, heartbeat_seconds=30)),
            await open_watch(server, stub, OrderStatusStreamRequest(order_ids=[order.id])),
        ]
        await create(stub, "Another")  # sequence 2: not for the third watch, which has been sent all it needs
        await watches[1].wait_for_sequence(2)
        started = time.monotonic()
        await asyncio.wait_for(server.stop(), 8)
        stopped = True
        assert time.monotonic() - started < 3, "streams should end at once, not after the grace period"
        for watch in watches:
            error = await watch.ended()
            assert isinstance(error, GRPCError), repr(error)
            assert error.status == Status.UNAVAILABLE, error
            # where to resume: the head, as a heartbeat would say (a quiet filtered stream too: not 1)
            assert error.message == "the server is shutting down; reconnect with after_sequence=2", error.message
        assert server.feed.watcher_count == 0
    finally:
        channel.close()
        if not stopped:
            await asyncio.wait_for(server.stop(), 15)


# --- cancellation races inside the feed (no socket: the timing has to be exact) ---------------------


def _bare_feed() -> Feed[object]:
    async def no_events(after: int, order_ids: object, limit: int) -> EventPage:
        return EventPage([], 0)

    async def empty_log() -> tuple[int, int]:
        return (1, 0)

    return Feed(no_events, empty_log, lambda event: event, lambda head: ("heartbeat", head))


@pytest.mark.parametrize("delay", range(8))
async def test_feed_close_is_not_lost_when_events_arrive_at_the_same_moment(delay):
    """Stopping the server must not hang when a commit's wake-up races the tailer's cancellation
    (asyncio.wait_for before Python 3.12 swallows such a cancellation)."""
    feed = _bare_feed()
    await feed.start()
    await asyncio.sleep(0.01)
    publish = feed._publish_next_page
    committed_while_publishing = [True]

    async def publish_and_commit() -> bool:
        more = await publish()
        if committed_while_publishing:
            committed_while_publishing.pop()
            feed.notify()
        return more

    feed._publish_next_page = publish_and_commit
    feed.notify()
    for _ in range(delay):
        await asyncio.sleep(0)
    closing = asyncio.ensure_future(feed.close())
    done, _ = await asyncio.wait({closing}, timeout=2)
    if not done:
        feed._closed = True  # let the runaway tailer stop so the test run itself can end
        feed.notify()
        await asyncio.wait({closing}, timeout=2)
    assert done, "Feed.close() hung: the tailer's cancellation was swallowed"


@pytest.mark.parametrize("delay", range(6))
async def test_cancelled_heartbeat_stream_stops_even_when_an_event_arrives_at_the_same_moment(delay):
    feed = _bare_feed()
    await feed.start()
    received: list[object] = []

    async def consume() -> None:
        async for update in feed.watch(WatchQuery(frozenset(), None, 30)):
            received.append(update)

    consumer = asyncio.create_task(consume())
    await eventually(lambda: feed.watcher_count == 1, "the watcher to register")
    await asyncio.sleep(0.01)
    [watcher] = feed._watchers
    assert watcher.offer((1, "event"))
    feed._wake(watcher)  # wakes the stream ...
    for _ in range(delay):
        await asyncio.sleep(0)
    consumer.cancel()  # ... just as the client goes away
    done, _ = await asyncio.wait({consumer}, timeout=1)
    try:
        assert done and consumer.cancelled(), f"the stream swallowed its cancellation and went on: {received}"
        assert feed.watcher_count == 0
    finally:
        consumer.cancel()
        await asyncio.wait({consumer}, timeout=1)
        await asyncio.wait_for(feed.close(), 2)


class InMemoryLog:
    """An event log for a bare Feed, counting concurrent reads and renders."""

    def __init__(self) -> None:
        self.events: list[StatusEvent] = []
        self.reads = self.reading = self.most_reading = self.renders = 0

    def append(self, count: int) -> None:
        for _ in range(count):
            sequence = len(self.events) + 1
            self.events.append(StatusEvent(sequence, str(uuid.uuid4()), None, domain.Status.PENDING, sequence))

    async def read(self, after: int, order_ids: object, limit: int) -> EventPage:
        self.reads += 1
        self.reading += 1
        self.most_reading = max(self.most_reading, self.reading)
        await asyncio.sleep(0.001)
        self.reading -= 1
        return EventPage(self.events[after : after + limit], 0)

    async def bounds(self) -> tuple[int, int]:
        return (1, len(self.events))

    def render(self, event: StatusEvent) -> int:
        self.renders += 1
        return event.sequence

    @contextlib.asynccontextmanager
    async def started_feed(self) -> AsyncIterator[Feed[int]]:
        """A started Feed over this log, closed on the way out."""
        feed = Feed(self.read, self.bounds, self.render, lambda head: -head, page_size=50)
        await feed.start()
        try:
            yield feed
        finally:
            await feed.close()


async def _replay(feed: Feed[int], through: int, after_sequence: int | None = 0) -> list[int]:
    got: list[int] = []
    async with contextlib.aclosing(feed.watch(WatchQuery(frozenset(), after_sequence, 0))) as batches:
        async for batch in batches:
            got += batch
            if got[-1] >= through:
                return got
    raise AssertionError("the stream ended")


@pytest.mark.database_free  # the Feed alone, over an in-memory log
async def test_streams_catching_up_read_the_log_a_few_at_a_time() -> None:
    """A thousand streams that fell behind must not each hold a page of the log at once (memory)."""
    log = InMemoryLog()
    log.append(500)
    async with log.started_feed() as feed:
        replays = await asyncio.wait_for(asyncio.gather(*(_replay(feed, 500) for _ in range(100))), 30)
    assert all(replay == list(range(1, 501)) for replay in replays)
    # The limit is on catching-up streams; the feed's tailer polls the log besides them (seen: 17 reading).
    assert 1 < log.most_reading <= MAX_CATCHING_UP + 1


@pytest.mark.database_free  # the Feed alone, over an in-memory log
async def test_streams_catching_up_reuse_what_the_tailer_rendered() -> None:
    log = InMemoryLog()
    async with log.started_feed() as feed:
        live = asyncio.ensure_future(_replay(feed, 300))  # a watcher, so the tailer renders what it publishes
        await eventually(lambda: feed.watcher_count == 1, "the first watcher to register")
        log.append(300)
        feed.notify()
        assert await asyncio.wait_for(live, 10) == list(range(1, 301))
        renders = log.renders
        replays = await asyncio.wait_for(asyncio.gather(*(_replay(feed, 300) for _ in range(20))), 10)
    assert all(replay == list(range(1, 301)) for replay in replays)
    assert log.renders == renders == 300


@pytest.mark.database_free  # the Feed alone, over an in-memory log
async def test_a_feed_nobody_watches_moves_its_head_without_reading_the_log() -> None:
    log = InMemoryLog()
    async with log.started_feed() as feed:
        log.append(3)
        feed.notify(3)
        await asyncio.sleep(0.1)  # time enough for a woken tailer to read
        assert (feed.head, log.reads) == (3, 0)
        live = asyncio.ensure_future(_replay(feed, 5, after_sequence=None))
        replay = asyncio.ensure_future(_replay(feed, 5))
        await eventually(lambda: feed.watcher_count == 2, "both watchers to register")
        log.append(2)
        feed.notify(5)
        assert await asyncio.wait_for(live, 5) == [4, 5]
        assert await asyncio.wait_for(replay, 5) == [1, 2, 3, 4, 5]
        assert feed.head == 5


@pytest.mark.parametrize("after_sequence", [None, 0])
async def test_stream_opened_while_the_feed_is_closing_ends_with_unavailable(server, stub, after_sequence):
    """A call that reaches the service between the feed closing and the drain starting must not
    wait for events that will never come (it would hold shutdown for the whole grace period)."""
    await create(stub)
    await asyncio.wait_for(server.feed.close(), 5)
    error = await stream_error(stub, OrderStatusStreamRequest(after_sequence=after_sequence))
    assert error.status == Status.UNAVAILABLE
    assert server.feed.watcher_count == 0


@pytest.mark.database_free  # the Feed alone, over an in-memory log
async def test_a_quiet_stream_gets_its_update_at_once_and_a_busy_one_once_per_batch_window() -> None:
    log = InMemoryLog()
    feed = Feed(log.read, log.bounds, log.render, lambda head: -head, batch_window=2.0)
    await feed.start()
    batches: list[tuple[float, list[int]]] = []
    loop = asyncio.get_running_loop()

    async def watch() -> None:
        async for batch in feed.watch(WatchQuery(frozenset(), 0, 0)):
            batches.append((loop.time(), batch))

    watching = asyncio.create_task(watch())
    try:
        await eventually(lambda: feed.watcher_count == 1, "the watcher to register")
        log.append(1)
        began = loop.time()
        feed.notify()
        await eventually(lambda: len(batches) == 1, "the first update", timeout=1.0)  # not after the 2 s window
        log.append(2)
        feed.notify()
        await asyncio.sleep(0.5)
        assert [batch for _, batch in batches] == [[1]]  # woken within the window: it waits for the window
        await eventually(lambda: len(batches) == 2, "the batch at the end of the window", timeout=5.0)
        assert batches[1][1] == [2, 3] and batches[1][0] - began >= 2.0
    finally:
        watching.cancel()
        await asyncio.wait({watching}, timeout=1)
        await asyncio.wait_for(feed.close(), 2)
