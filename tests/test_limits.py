"""Limits (issue 4, guarantee 3), each at its boundary, over a real socket against a real server.

* request message size: ``--max-message-bytes`` (4 MiB by default), refused with RESOURCE_EXHAUSTED as soon
  as the 5-byte gRPC prefix announces too much, before any of the body is read;
* open OrderStatusStream calls: ``--max-watchers`` in all and ``--max-streams-per-connection`` per HTTP/2
  connection (RESOURCE_EXHAUSTED beyond; unary calls are not counted; a slot is freed however a stream ends);
* items per order (1,000) and product-name length (200 characters): INVALID_ARGUMENT;
* repeated fields are counted before decoding (items, ListOrders statuses (1,000), OrderStatusStream
  order_ids (10,000)) and unknown fields are capped (64 KiB), so no message within the size limit can
  keep the server's event loop busy for seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import h2.events
import h2.exceptions
import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest
from server_process import ServerProcess
from test_hostile import RawCodec, RawH2, f_bytes, f_varint, grpc_message, padded

from orders._proto.orders.v1 import (
    CreateOrderRequest,
    ListOrdersRequest,
    OrderItem,
    OrderServiceStub,
    OrderStatusStreamRequest,
    StatusUpdate,
)
from orders.config import MIB, add_server_arguments, config_from_args
from orders.server import OrderServer
from orders.testing import running_server

SERVICE = "/orders.v1.OrderService/"
TIMEOUT = 10.0


# --- helpers -------------------------------------------------------------------------------------------------------


async def raw_call(port: int, method: str, payload: bytes, path: str | None = None) -> tuple[str, str]:
    """Send exactly ``payload`` as one request message; (status name, message).

    The message is sent while the answer is awaited: a refused message is answered before it is all sent.
    """
    channel = Channel("127.0.0.1", port, codec=RawCodec())
    try:
        async with channel.request(
            path or SERVICE + method, Cardinality.UNARY_UNARY, bytes, bytes, timeout=TIMEOUT
        ) as stream:
            await stream.send_request()
            sending = asyncio.ensure_future(stream.send_message(payload, end=True))
            try:
                await stream.recv_message()
            finally:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
    except GRPCError as error:
        return error.status.name, error.message or ""
    finally:
        channel.close()
    return "OK", ""


def create_message(name: str = "Widget", items: int = 1) -> bytes:
    return bytes(CreateOrderRequest(items=[OrderItem(product_name=name, quantity=1, price=2.5)] * items))


async def order_count(server: OrderServer) -> int:
    channel = Channel("127.0.0.1", server.port)
    try:
        response = await asyncio.wait_for(
            OrderServiceStub(channel).list_orders(ListOrdersRequest(page_size=1000)), TIMEOUT
        )
        return len(response.orders)
    finally:
        channel.close()


async def healthy(server: OrderServer) -> None:
    channel = Channel("127.0.0.1", server.port)
    try:
        await asyncio.wait_for(HealthStub(channel).Check(HealthCheckRequest()), TIMEOUT)
    finally:
        channel.close()


async def eventually(predicate: object, what: str, timeout: float = 5.0) -> None:
    assert callable(predicate)
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Watcher:
    """An OrderStatusStream consumed in the background."""

    def __init__(self, channel: Channel, request: OrderStatusStreamRequest | None = None, **options: object) -> None:
        self.updates: list[StatusUpdate] = []
        self.error: BaseException | None = None
        self.task = asyncio.create_task(
            self._run(OrderServiceStub(channel), request or OrderStatusStreamRequest(), options)
        )

    async def _run(self, stub: OrderServiceStub, request: OrderStatusStreamRequest, options: dict) -> None:
        try:
            async for update in stub.order_status_stream(request, **options):
                self.updates.append(update)
        except Exception as exc:  # for the test to look at
            self.error = exc

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def admitted(server: OrderServer, channel: Channel) -> Watcher:
    """Open a stream on ``channel`` and wait until the server counts and registers it."""
    before = server.stream_limits.open, server.feed.watcher_count
    watcher = Watcher(channel)
    await eventually(
        lambda: watcher.task.done()
        or (server.stream_limits.open > before[0] and server.feed.watcher_count > before[1]),
        "the stream to be admitted",
    )
    assert not watcher.task.done(), f"the stream ended: {watcher.error!r}"
    assert server.stream_limits.open == before[0] + 1 and server.feed.watcher_count == before[1] + 1
    return watcher


async def refused(channel: Channel, *fragments: str) -> None:
    """Open a stream on ``channel``; it must fail at once with RESOURCE_EXHAUSTED naming every fragment."""

    async def first() -> None:
        async for _ in OrderServiceStub(channel).order_status_stream(OrderStatusStreamRequest()):
            raise AssertionError("a stream beyond the limit sent an update")

    with pytest.raises(GRPCError) as caught:
        await asyncio.wait_for(first(), TIMEOUT)
    assert caught.value.status is Status.RESOURCE_EXHAUSTED, caught.value
    for fragment in fragments:
        assert fragment in (caught.value.message or ""), (fragment, caught.value.message)


@pytest.fixture
async def channels(server: OrderServer) -> AsyncIterator[list[Channel]]:
    """Three clients, each its own HTTP/2 connection."""
    opened = [Channel("127.0.0.1", server.port) for _ in range(3)]
    yield opened
    for channel in opened:
        channel.close()


# --- configuration -------------------------------------------------------------------------------------------------


async def test_the_flags_and_their_environment_twins_set_the_limits(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDERS_MAX_STREAMS_PER_CONNECTION", "4")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    config = config_from_args(
        parser.parse_args(
            [
                "--port",
                "0",
                "--db",
                database_url,
                "--max-message-bytes",
                "100",
                "--max-watchers",
                "7",
            ]
        ),
        parser,
    )
    assert (config.max_message_bytes, config.max_watchers, config.max_streams_per_connection) == (100, 7, 4)
    async with OrderServer(config) as server:
        assert (server.stream_limits.max_watchers, server.stream_limits.max_per_connection) == (7, 4)
        assert await raw_call(server.port, "GetOrder", f_bytes(1, "x" * 99)) == (
            "RESOURCE_EXHAUSTED",
            "request message is 101 bytes; the limit is 100 (--max-message-bytes)",
        )


async def test_defaults(server: OrderServer) -> None:
    assert server.config.max_message_bytes == 4 * MIB
    assert (server.stream_limits.max_watchers, server.stream_limits.max_per_connection) == (10_000, 100)


# --- message size --------------------------------------------------------------------------------------------------


async def test_a_5_mib_request_is_refused_by_default(server: OrderServer) -> None:
    code, message = await raw_call(server.port, "CreateOrder", padded(create_message(), 5 * MIB))
    assert code == "RESOURCE_EXHAUSTED"
    assert message == "request message is 5,242,880 bytes; the limit is 4,194,304 (--max-message-bytes)"
    assert await order_count(server) == 0
    await healthy(server)


async def test_the_default_limit_is_exact(server: OrderServer, stub: OrderServiceStub) -> None:
    created = await asyncio.wait_for(
        stub.create_order(CreateOrderRequest(items=[OrderItem(product_name="Widget", quantity=1, price=1.0)])), TIMEOUT
    )
    assert created.order is not None
    # GetOrder with a 4 MiB id, then the real one (protobuf keeps the last): a valid request of exactly 4 MiB
    last = f_bytes(1, created.order.id)
    exact = padded(b"", 4 * MIB - len(last), number=1) + last
    assert len(exact) == 4 * MIB
    assert await raw_call(server.port, "GetOrder", exact) == ("OK", "")
    assert await raw_call(server.port, "GetOrder", exact + f_varint(2, 0)) == (
        "RESOURCE_EXHAUSTED",
        "request message is 4,194,306 bytes; the limit is 4,194,304 (--max-message-bytes)",
    )


async def test_the_largest_valid_order_fits_the_default_limit(server: OrderServer) -> None:
    """1,000 items with 200-character names of 4-byte characters: about 830 KB, accepted."""
    payload = create_message("🧨" * 200, items=1000)
    assert 800_000 < len(payload) < 4 * MIB
    assert await raw_call(server.port, "CreateOrder", payload) == ("OK", "")
    assert await order_count(server) == 1


async def test_a_configured_limit_applies_to_every_method_at_its_boundary() -> None:
    async with running_server(max_message_bytes=1000) as server:
        for method, valid in [
            ("CreateOrder", create_message()),
            ("ListOrders", f_varint(1, 5)),
            ("OrderStatusStream", f_varint(2, 0)),
            ("Health", b""),
        ]:
            path = "/grpc.health.v1.Health/Check" if method == "Health" else None
            fitting, too_big = padded(valid, 1000), padded(valid, 1001)
            if method == "OrderStatusStream":
                code = await _stream_code(server, fitting)
                assert code == "OK", (method, code)
                assert await _stream_code(server, too_big) == "RESOURCE_EXHAUSTED"
                continue
            assert await raw_call(server.port, method, fitting, path) == ("OK", ""), method
            assert await raw_call(server.port, method, too_big, path) == (
                "RESOURCE_EXHAUSTED",
                "request message is 1,001 bytes; the limit is 1,000 (--max-message-bytes)",
            ), method
        assert await order_count(server) == 1  # the fitting CreateOrder only


async def _stream_code(server: OrderServer, payload: bytes) -> str:
    """OK once the stream is registered, else the status it ends with."""
    channel = Channel("127.0.0.1", server.port, codec=RawCodec())
    try:
        async with channel.request(
            SERVICE + "OrderStatusStream", Cardinality.UNARY_STREAM, bytes, bytes, timeout=TIMEOUT
        ) as stream:
            await stream.send_message(payload, end=True)
            first = asyncio.ensure_future(stream.recv_message())
            await eventually(lambda: first.done() or server.feed.watcher_count > 0, "an answer or a watcher")
            if first.done():
                first.result()
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                await stream.cancel()
    except GRPCError as error:
        return error.status.name
    finally:
        channel.close()
    await eventually(lambda: server.feed.watcher_count == 0 and server.stream_limits.open == 0, "the stream to go")
    return "OK"


async def test_an_announced_giant_message_is_refused_before_its_body_arrives(server: OrderServer) -> None:
    """The prefix alone gets the answer, and the server never opens its flow-control window for the body:
    a client can push at most the initial window (4 MiB), not the 4 GiB it announced."""
    raw = await RawH2.open(server.port)
    try:
        stream_id = raw.start("CreateOrder")
        raw.conn.send_data(stream_id, struct.pack(">?I", False, 2**32 - 1))  # no body, no END_STREAM
        await raw.flush()
        answer = await raw.response(stream_id, timeout=2.0)
        assert answer.get("grpc-status") == str(Status.RESOURCE_EXHAUSTED.value), answer
        assert answer.get("grpc-message") == (
            "request message is 4,294,967,295 bytes; the limit is 4,194,304 (--max-message-bytes)"
        ), answer

        # Another stream: announce 1 GiB and push its body as fast as flow control lets us.
        stream_id = raw.start("CreateOrder")
        raw.conn.send_data(stream_id, struct.pack(">?I", False, 2**30))
        sent, ended = 0, False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while not ended and sent < 64 * MIB and loop.time() < deadline:
            window = min(raw.conn.local_flow_control_window(stream_id), raw.conn.max_outbound_frame_size)
            if window > 0:
                try:
                    raw.conn.send_data(stream_id, b"\0" * window)
                except h2.exceptions.StreamClosedError:
                    break
                sent += window
                await raw.flush()
            else:
                await raw._read(0.2)
            ended = any(
                isinstance(e, (h2.events.StreamReset, h2.events.StreamEnded)) and e.stream_id == stream_id
                for e in raw.events
            )
        assert sent <= 4 * MIB + 64 * 1024, f"the server took {sent:,} bytes of a body it had refused"
        assert (await raw.response(stream_id)).get("grpc-status") == str(Status.RESOURCE_EXHAUSTED.value)
    finally:
        raw.close()
    await healthy(server)
    assert await order_count(server) == 0


# --- items, names, and counted repeated fields ----------------------------------------------------------------------

COUNTS = [
    ("CreateOrder", create_message(items=1000), "OK", ""),
    ("CreateOrder", create_message(items=1001), "INVALID_ARGUMENT", "an order may have at most 1,000 items, got 1,001"),
    ("CreateOrder", create_message("n" * 200), "OK", ""),
    ("CreateOrder", create_message("🧨" * 200), "OK", ""),
    ("CreateOrder", create_message("n" * 201), "INVALID_ARGUMENT", "201 characters; at most 200 are allowed"),
    ("CreateOrder", create_message("🧨" * 201), "INVALID_ARGUMENT", "201 characters; at most 200 are allowed"),
    ("ListOrders", f_bytes(3, bytes([1, 2, 3, 4, 5] * 200)), "OK", ""),
    ("ListOrders", f_bytes(3, bytes([1] * 1001)), "INVALID_ARGUMENT", "statuses may list at most 1,000 values"),
    ("ListOrders", f_varint(3, 1) * 1001, "INVALID_ARGUMENT", "at most 1,000 values, got 1,001"),
    ("OrderStatusStream", f_bytes(1, str(uuid.uuid4())) * 10_000, "OK", ""),
    (
        "OrderStatusStream",
        f_bytes(1, str(uuid.uuid4())) * 10_001,
        "INVALID_ARGUMENT",
        "a stream may watch at most 10,000 order_ids, got 10,001",
    ),
    ("OrderStatusStream", f_bytes(1, b"") * 10_001, "INVALID_ARGUMENT", "at most 10,000 order_ids, got 10,001"),
    ("CreateOrder", padded(create_message(), 64 * 1024 + 20), "OK", ""),
    ("CreateOrder", padded(create_message(), 64 * 1024 + 22), "INVALID_ARGUMENT", "65,537 bytes of unknown fields"),
]


@pytest.mark.parametrize(
    ("method", "payload", "code", "message"), COUNTS, ids=[f"{m}-{len(p)}-{c}" for m, p, c, _ in COUNTS]
)
async def test_counted_limits_at_their_boundaries(
    server: OrderServer, method: str, payload: bytes, code: str, message: str
) -> None:
    if method == "OrderStatusStream":
        assert await _stream_code(server, payload) == code
        return
    got_code, got_message = await raw_call(server.port, method, payload)
    assert got_code == code, got_message
    assert message in got_message
    assert await order_count(server) == (1 if method == "CreateOrder" and code == "OK" else 0)


async def test_no_request_within_the_size_limit_stalls_the_server(tmp_path: Path, database_url: str) -> None:
    """The worst messages of 4 MiB, each while another client keeps asking for its health: no answer to that
    client may take long (before the counts and the unknown-field cap: stalls of 13 s to 4 minutes). A server
    process of its own, so that a stalled server cannot stall the test's timeouts too."""
    worst = {
        "CreateOrder": f_bytes(1, b"") * (2 * MIB - 4),  # two million empty items
        "ListOrders": f_bytes(3, b"\x01" * (4 * MIB - 8)),  # four million packed statuses
        "OrderStatusStream": f_bytes(1, b"") * (2 * MIB - 4),  # two million empty order ids
        "GetOrder": f_varint(999, 1) * (4 * MIB // 3 - 2),  # 1.4 million unknown fields
    }
    process = ServerProcess(tmp_path, database_url)
    await process.start()
    channel = Channel("127.0.0.1", process.port)
    loop = asyncio.get_running_loop()
    try:
        for method, payload in worst.items():
            assert len(payload) <= 4 * MIB
            call = asyncio.ensure_future(raw_call(process.port, method, payload))
            slowest = 0.0
            while not call.done():
                started = loop.time()
                try:
                    await asyncio.wait_for(HealthStub(channel).Check(HealthCheckRequest()), TIMEOUT)
                except TimeoutError:
                    raise AssertionError(f"{method}: the server did not answer a health check for {TIMEOUT}s") from None
                slowest = max(slowest, loop.time() - started)
                await asyncio.sleep(0.01)
            code, message = await call
            assert code == "INVALID_ARGUMENT", (method, code, message)
            # Parsing the worst CreateOrder blocks the event loop 0.3-0.6 s here, so the bound leaves room for
            # a machine several times slower and still catches the stalls of many seconds this guards against.
            assert slowest < 3.0, f"{method}: a health check waited {slowest:.1f}s behind it"
    finally:
        channel.close()
        await process.kill()


# --- streams -------------------------------------------------------------------------------------------------------


async def test_max_watchers() -> None:
    async with running_server(max_watchers=3) as server:
        channels = [Channel("127.0.0.1", server.port) for _ in range(3)]
        try:
            a, b, c = channels
            watchers = [await admitted(server, a), await admitted(server, a), await admitted(server, b)]
            await refused(b, "3 OrderStatusStream calls are open on this server", "the limit is 3", "--max-watchers")
            await refused(c, "--max-watchers")
            assert server.stream_limits.open == 3
            # unary calls are not limited, and the admitted streams work
            created = await asyncio.wait_for(
                OrderServiceStub(c).create_order(
                    CreateOrderRequest(items=[OrderItem(product_name="x", quantity=1, price=1.0)])
                ),
                TIMEOUT,
            )
            assert created.order is not None
            order_id = created.order.id
            await eventually(
                lambda: all(any(u.order_id == order_id for u in w.updates) for w in watchers),
                "every watcher to see the new order",
            )
            # closing one frees its slot
            await watchers.pop(0).close()
            await eventually(lambda: server.stream_limits.open == 2, "the slot to be freed")
            watchers.append(await admitted(server, c))
            await refused(a, "--max-watchers")
            for watcher in watchers:
                await watcher.close()
            await eventually(lambda: server.stream_limits.open == 0 and server.feed.watcher_count == 0, "all to go")
        finally:
            for channel in channels:
                channel.close()


async def test_max_streams_per_connection() -> None:
    async with running_server(max_streams_per_connection=2) as server:
        channels = [Channel("127.0.0.1", server.port) for _ in range(2)]
        try:
            a, b = channels
            on_a = [await admitted(server, a), await admitted(server, a)]
            await refused(
                a,
                "2 OrderStatusStream calls are open on this connection",
                "the limit is 2 per connection",
                "--max-streams-per-connection",
            )
            on_b = [await admitted(server, b), await admitted(server, b)]  # another connection: its own count
            await refused(b, "--max-streams-per-connection")
            # unary calls on a full connection are not limited
            stub = OrderServiceStub(a)
            replies = await asyncio.wait_for(
                asyncio.gather(*(stub.list_orders(ListOrdersRequest()) for _ in range(30))), TIMEOUT
            )
            assert len(replies) == 30
            await on_a.pop().close()
            await eventually(lambda: server.stream_limits.open == 3, "the slot to be freed")
            on_a.append(await admitted(server, a))
            for watcher in on_a + on_b:
                await watcher.close()
            await eventually(lambda: server.stream_limits.open == 0, "all to go")
        finally:
            for channel in channels:
                channel.close()


async def test_a_slot_is_freed_however_the_stream_ends() -> None:
    async with running_server(max_watchers=2, max_streams_per_connection=2) as server:
        channel = Channel("127.0.0.1", server.port)
        try:
            # refused by validation or by the log's bounds: 10 of them, on one connection, with a limit of 2
            for request in [
                OrderStatusStreamRequest(after_sequence=-1),
                OrderStatusStreamRequest(order_ids=["x"]),
                OrderStatusStreamRequest(after_sequence=10**9),
            ] * 4:
                watcher = Watcher(channel, request)
                await asyncio.wait_for(watcher.task, TIMEOUT)
                assert isinstance(watcher.error, GRPCError), watcher.error
                assert watcher.error.status in (Status.INVALID_ARGUMENT, Status.OUT_OF_RANGE), watcher.error
            assert server.stream_limits.open == 0
            # the client's deadline ends them
            for _ in range(3):
                watcher = Watcher(channel, timeout=0.2)
                await asyncio.wait_for(watcher.task, TIMEOUT)
                assert isinstance(watcher.error, (GRPCError, asyncio.TimeoutError)), watcher.error
            await eventually(lambda: server.stream_limits.open == 0, "deadline-ended streams to be freed")
            # the client's connection drops with both its streams open
            for _ in range(2):
                raw = await RawH2.open(server.port)
                for _ in range(2):
                    stream_id = raw.start("OrderStatusStream")
                    raw.conn.send_data(stream_id, grpc_message(b""), end_stream=True)
                await raw.flush()
                await eventually(lambda: server.stream_limits.open == 2, "the raw streams to be admitted")
                raw.close()
                await eventually(
                    lambda: server.stream_limits.open == 0 and server.feed.watcher_count == 0,
                    "the dropped connection's streams to be freed",
                )
            # and after all that, the full allowance is there
            watchers = [await admitted(server, channel), await admitted(server, channel)]
            await refused(channel, "--max-")
            for watcher in watchers:
                await watcher.close()
        finally:
            channel.close()
