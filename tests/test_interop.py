"""Interop: the official grpcio client, health checker and reflection client against our grpclib server.

The server runs as a real process (``python -m orders.server --port 0``), on SQLite and on PostgreSQL. The client
stubs are generated from the repo's ``order.proto`` with grpcio-tools at test time, so these tests see the wire
contract the way any other gRPC implementation does, not through our own generated code.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.resources
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import grpc
import pytest
from descriptor_shapes import field_shapes
from grpc_tools import protoc

from orders.testing import temporary_database

ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "grpcio_probe.py"
SERVICE = "orders.v1.OrderService"
DEADLINE = 10.0  # seconds; every call has one, so a broken server fails a test instead of hanging it
STARTED = re.compile(rb"Server started on port (\d+)")
UTC = datetime.UTC


# --- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pb(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``order_pb2`` and ``order_pb2_grpc`` generated from order.proto by grpc_tools.protoc into a temp dir."""
    out = tmp_path_factory.mktemp("grpcio-stubs")
    well_known = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/timestamp.proto
    args = [
        "grpc_tools.protoc",
        f"--proto_path={ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / "order.proto"),
    ]
    assert protoc.main(args) == 0, f"grpc_tools.protoc failed: {args}"
    # order_pb2_grpc does `import order_pb2`: make exactly our files importable under those names for the
    # import only, and leave sys.path and sys.modules as they were.
    names = ("order_pb2", "order_pb2_grpc")
    shadowed = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path.insert(0, str(out))
    try:
        modules: dict[str, ModuleType] = {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(out))
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(shadowed)
    for module in modules.values():
        assert Path(module.__file__ or "").parent == out, f"imported {module.__name__} from the wrong place"
    return SimpleNamespace(pb2=modules["order_pb2"], grpc=modules["order_pb2_grpc"])


def start_server(workdir: Path, db: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start ``python -m orders.server --port 0`` on the fresh database ``db``; return it, its port and its log
    file."""
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "orders.server", "--port", "0", "--db", db],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert process.stdout is not None
    output = b""
    deadline = time.monotonic() + 30
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while (match := STARTED.search(output)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or process.poll() is not None or not selector.select(remaining):
                process.kill()
                process.wait()
                pytest.fail(f"no startup line; stdout={output!r}; log:\n{log_path.read_text(errors='replace')}")
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                continue  # EOF: the poll() above sees the exit next round
            output += chunk
    return process, int(match.group(1)), log_path


def stop_server(process: subprocess.Popen[bytes], log_path: Path) -> None:
    """SIGTERM, and require the graceful exit 0 that DESIGN.md promises."""
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"server ignored SIGTERM for 30 s; log:\n{log_path.read_text(errors='replace')}")
    finally:
        assert process.stdout is not None
        process.stdout.close()
    assert code == 0, f"server exited {code} on SIGTERM; log:\n{log_path.read_text(errors='replace')}"


@pytest.fixture(scope="module")
def port(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of a real server process on a fresh temporary database of the backend."""
    with temporary_database() as db:
        process, bound, log_path = start_server(tmp_path_factory.mktemp("interop-server"), db)
        try:
            yield bound
        finally:
            stop_server(process, log_path)


@pytest.fixture(scope="module")
def channel(port: int) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as opened:
        grpc.channel_ready_future(opened).result(timeout=DEADLINE)
        yield opened


@pytest.fixture
def stub(channel: grpc.Channel, pb: SimpleNamespace) -> Any:
    return pb.grpc.OrderServiceStub(channel)


# --- helpers --------------------------------------------------------------------------------------------------


def create(stub: Any, pb: SimpleNamespace, *items: tuple[str, int, float], **fields: Any) -> Any:
    """CreateOrder with ``items`` (default one cheap item); return the order."""
    items = items or (("Widget", 1, 2.5),)
    request = pb.pb2.CreateOrderRequest(
        items=[pb.pb2.OrderItem(product_name=n, quantity=q, price=p) for n, q, p in items], **fields
    )
    return stub.CreateOrder(request, timeout=DEADLINE).order


def rpc_error(call: Any, request: Any) -> grpc.RpcError:
    """The error a unary call fails with; fails the test if it succeeds."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=DEADLINE)
    return caught.value


def stream_error(stub: Any, request: Any) -> grpc.RpcError:
    """The error OrderStatusStream fails with before its first message."""
    with pytest.raises(grpc.RpcError) as caught:
        next(stub.OrderStatusStream(request, timeout=DEADLINE))
    return caught.value


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def utc(timestamp: Any) -> datetime.datetime:
    return timestamp.ToDatetime(tzinfo=UTC)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def unknown_fields() -> bytes:
    """Field 99 as a varint and field 100 as bytes: numbers order.proto does not use."""
    return varint(99 << 3 | 0) + varint(7) + varint(100 << 3 | 2) + varint(3) + b"abc"


# --- every RPC ------------------------------------------------------------------------------------------------


def test_create_order(stub: Any, pb: SimpleNamespace) -> None:
    before = datetime.datetime.now(UTC)
    request = pb.pb2.CreateOrderRequest(
        items=[
            pb.pb2.OrderItem(id="client-chosen", product_name="Laptop", quantity=1, price=1000.0),
            pb.pb2.OrderItem(product_name="Mouse", quantity=2, price=25.0),
            pb.pb2.OrderItem(product_name="Cable", quantity=3, price=0.1),
        ]
    )
    order = stub.CreateOrder(request, timeout=DEADLINE).order
    after = datetime.datetime.now(UTC)

    assert is_uuid(order.id)
    assert [(i.product_name, i.quantity, i.price) for i in order.items] == [
        ("Laptop", 1, 1000.0),
        ("Mouse", 2, 25.0),
        ("Cable", 3, 0.1),
    ]
    item_ids = [i.id for i in order.items]
    assert all(is_uuid(i) for i in item_ids), item_ids  # the client's "client-chosen" is ignored
    assert len(set(item_ids + [order.id])) == 4
    assert order.total_amount == 1050.3
    assert order.status == pb.pb2.ORDER_STATUS_PENDING
    assert order.version == 1
    assert order.currency_code == "USD"
    assert order.HasField("create_time") and order.HasField("update_time")
    assert order.update_time == order.create_time
    assert before - datetime.timedelta(seconds=1) <= utc(order.create_time) <= after + datetime.timedelta(seconds=1)

    euros = create(stub, pb, ("Book", 2, 12.34), total_amount=24.68, currency_code="EUR")
    assert (euros.total_amount, euros.currency_code) == (24.68, "EUR")


def test_get_order_returns_what_create_returned(stub: Any, pb: SimpleNamespace) -> None:
    created = create(stub, pb, ("Laptop", 1, 1000.0), ("Mouse", 2, 25.0))
    got = stub.GetOrder(pb.pb2.GetOrderRequest(id=created.id), timeout=DEADLINE).order
    assert got == created
    assert got.SerializeToString(deterministic=True) == created.SerializeToString(deterministic=True)


def test_update_order_status(stub: Any, pb: SimpleNamespace) -> None:
    created = create(stub, pb)
    update = stub.UpdateOrderStatus
    confirmed = update(
        pb.pb2.UpdateOrderStatusRequest(id=created.id, status=pb.pb2.ORDER_STATUS_CONFIRMED), timeout=DEADLINE
    ).order
    assert confirmed.status == pb.pb2.ORDER_STATUS_CONFIRMED
    assert confirmed.version == 2
    assert confirmed.create_time == created.create_time
    assert utc(confirmed.update_time) >= utc(created.update_time)
    assert list(confirmed.items) == list(created.items)
    assert stub.GetOrder(pb.pb2.GetOrderRequest(id=created.id), timeout=DEADLINE).order == confirmed

    # The status it already has: a no-op that succeeds and changes nothing, not even update_time.
    again = update(
        pb.pb2.UpdateOrderStatusRequest(id=created.id, status=pb.pb2.ORDER_STATUS_CONFIRMED), timeout=DEADLINE
    ).order
    assert again == confirmed

    shipped = update(
        pb.pb2.UpdateOrderStatusRequest(id=created.id, status=pb.pb2.ORDER_STATUS_SHIPPED, expected_version=2),
        timeout=DEADLINE,
    ).order
    assert (shipped.status, shipped.version) == (pb.pb2.ORDER_STATUS_SHIPPED, 3)


def test_cancel_order(stub: Any, pb: SimpleNamespace) -> None:
    created = create(stub, pb)
    cancelled = stub.CancelOrder(pb.pb2.CancelOrderRequest(id=created.id, expected_version=1), timeout=DEADLINE).order
    assert (cancelled.status, cancelled.version) == (pb.pb2.ORDER_STATUS_CANCELLED, 2)
    assert cancelled.create_time == created.create_time
    # Cancelling a cancelled order is the same-status no-op.
    again = stub.CancelOrder(pb.pb2.CancelOrderRequest(id=created.id), timeout=DEADLINE).order
    assert again == cancelled
    assert stub.GetOrder(pb.pb2.GetOrderRequest(id=created.id), timeout=DEADLINE).order == cancelled


def list_all(stub: Any, pb: SimpleNamespace, page_size: int, statuses: tuple[int, ...] = ()) -> list[Any]:
    """Every order, following next_page_token; checks each page's size on the way."""
    orders: list[Any] = []
    token = ""
    for _ in range(10_000):
        page = stub.ListOrders(
            pb.pb2.ListOrdersRequest(page_size=page_size, page_token=token, statuses=statuses), timeout=DEADLINE
        )
        assert len(page.orders) <= page_size
        orders.extend(page.orders)
        token = page.next_page_token
        if not token:
            return orders
        assert page.orders, "a page with a next_page_token must not be empty"
    raise AssertionError("ListOrders never returned an empty next_page_token")


def test_list_orders_pages_with_a_token(stub: Any, pb: SimpleNamespace) -> None:
    mine = [create(stub, pb, (f"Paged {n}", n + 1, 1.0)) for n in range(5)]
    stub.CancelOrder(pb.pb2.CancelOrderRequest(id=mine[1].id), timeout=DEADLINE)
    stub.CancelOrder(pb.pb2.CancelOrderRequest(id=mine[3].id), timeout=DEADLINE)

    first = stub.ListOrders(pb.pb2.ListOrdersRequest(page_size=2), timeout=DEADLINE)
    assert len(first.orders) == 2 and first.next_page_token

    paged = list_all(stub, pb, page_size=2)
    ids = [o.id for o in paged]
    assert len(ids) == len(set(ids)), "an order was repeated across pages"
    assert ids == [o.id for o in list_all(stub, pb, page_size=1000)]
    assert ids[-5:] == [o.id for o in mine], "oldest first: the newest orders come last, in creation order"
    by_id = {o.id: o for o in paged}
    assert by_id[mine[0].id] == stub.GetOrder(pb.pb2.GetOrderRequest(id=mine[0].id), timeout=DEADLINE).order

    cancelled = list_all(stub, pb, page_size=1, statuses=(pb.pb2.ORDER_STATUS_CANCELLED,))
    assert {o.status for o in cancelled} == {pb.pb2.ORDER_STATUS_CANCELLED}
    cancelled_ids = [o.id for o in cancelled]
    assert cancelled_ids[-2:] == [mine[1].id, mine[3].id]
    assert cancelled_ids == [i for i in ids if by_id[i].status == pb.pb2.ORDER_STATUS_CANCELLED]


def test_stream_replays_from_after_sequence_zero_then_goes_live(stub: Any, pb: SimpleNamespace) -> None:
    order = create(stub, pb)
    stub.UpdateOrderStatus(
        pb.pb2.UpdateOrderStatusRequest(id=order.id, status=pb.pb2.ORDER_STATUS_CONFIRMED), timeout=DEADLINE
    )
    request = pb.pb2.OrderStatusStreamRequest(order_ids=[order.id], after_sequence=0)
    assert request.HasField("after_sequence")  # 0 is sent on the wire: "from the start of the log"
    call = stub.OrderStatusStream(request, timeout=DEADLINE)
    try:
        created, confirmed = next(call), next(call)
        assert (created.order_id, created.previous_status, created.status) == (
            order.id,
            pb.pb2.ORDER_STATUS_UNSPECIFIED,
            pb.pb2.ORDER_STATUS_PENDING,
        )
        assert (confirmed.order_id, confirmed.previous_status, confirmed.status) == (
            order.id,
            pb.pb2.ORDER_STATUS_PENDING,
            pb.pb2.ORDER_STATUS_CONFIRMED,
        )
        assert 1 <= created.sequence < confirmed.sequence
        assert created.timestamp == order.create_time

        stub.UpdateOrderStatus(
            pb.pb2.UpdateOrderStatusRequest(id=order.id, status=pb.pb2.ORDER_STATUS_SHIPPED), timeout=DEADLINE
        )
        live = next(call)
        assert (live.order_id, live.previous_status, live.status) == (
            order.id,
            pb.pb2.ORDER_STATUS_CONFIRMED,
            pb.pb2.ORDER_STATUS_SHIPPED,
        )
        assert live.sequence > confirmed.sequence
    finally:
        call.cancel()

    # Resuming after the creation's sequence replays only what came after it.
    resumed = stub.OrderStatusStream(
        pb.pb2.OrderStatusStreamRequest(order_ids=[order.id], after_sequence=created.sequence), timeout=DEADLINE
    )
    try:
        assert [next(resumed).sequence, next(resumed).sequence] == [confirmed.sequence, live.sequence]
    finally:
        resumed.cancel()


def test_a_stream_whose_client_stopped_reading_ends_at_once_on_shutdown_and_says_how_to_resume(
    pb: SimpleNamespace, backend: str, tmp_path: Path
) -> None:
    """Stuck on HTTP/2 flow control (a 1 KiB window, never read), it cannot end as told like the others: the
    server ends it after a moment instead of holding SIGTERM up for all of --grace (10 s), and the client
    reads what it was sent, without a gap, then UNAVAILABLE saying how to resume."""
    with temporary_database() as db:
        process, port, log_path = start_server(tmp_path, db)
        small_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=small_window) as channel:
            stub = pb.grpc.OrderServiceStub(channel)
            for _ in range(300):
                create(stub, pb)
            updates = stub.OrderStatusStream(pb.pb2.OrderStatusStreamRequest(after_sequence=0), timeout=60)
            received = [next(updates).sequence]  # and then nothing more is read until the server has gone
            time.sleep(0.5)
            signalled = time.monotonic()
            stop_server(process, log_path)
            assert time.monotonic() - signalled < 5, "the stream held the shutdown up"
            with pytest.raises(grpc.RpcError) as ended:
                received += [update.sequence for update in updates]
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "reconnect" in ended.value.details() and "after_sequence = the last sequence received" in (
        ended.value.details()
    ), ended.value.details()
    assert received == list(range(1, len(received) + 1)) and len(received) < 300, received


def test_stream_without_after_sequence_is_live_only(stub: Any, pb: SimpleNamespace) -> None:
    order = create(stub, pb)
    request = pb.pb2.OrderStatusStreamRequest(order_ids=[order.id], heartbeat_seconds=1)
    assert not request.HasField("after_sequence")
    call = stub.OrderStatusStream(request, timeout=DEADLINE)
    try:
        # A heartbeat first: the stream is running, and it did not replay the order's creation.
        heartbeat = next(call)
        assert heartbeat.order_id == ""
        assert heartbeat.sequence >= 1
        stub.UpdateOrderStatus(
            pb.pb2.UpdateOrderStatusRequest(id=order.id, status=pb.pb2.ORDER_STATUS_CONFIRMED), timeout=DEADLINE
        )
        update = next(call)
        while update.order_id == "":  # more heartbeats may come first on a slow machine
            update = next(call)
        assert (update.order_id, update.previous_status, update.status) == (
            order.id,
            pb.pb2.ORDER_STATUS_PENDING,
            pb.pb2.ORDER_STATUS_CONFIRMED,
        )
        assert update.sequence > heartbeat.sequence
    finally:
        call.cancel()


def test_a_quiet_live_stream_sends_its_headers_once_registered(stub: Any, pb: SimpleNamespace) -> None:
    """A client that waits for the response headers (as gRPC Go's ``Header()`` does) gets them without an
    update to wait for, and once it has them the watch is registered: a change made then reaches it."""
    call = stub.OrderStatusStream(pb.pb2.OrderStatusStreamRequest(), timeout=DEADLINE)  # live, no heartbeats
    try:
        started = time.monotonic()
        call.initial_metadata()
        assert time.monotonic() - started < DEADLINE / 2
        order = create(stub, pb)
        update = next(call)
        assert (update.order_id, update.status) == (order.id, pb.pb2.ORDER_STATUS_PENDING)
    finally:
        call.cancel()


def test_a_connection_full_of_watches_is_refused_more_and_still_serves_unary_calls(
    port: int, pb: SimpleNamespace
) -> None:
    """100 watches (the default limit per connection) on one grpcio connection: the 101st gets the documented
    RESOURCE_EXHAUSTED, and a unary call is answered at once. With HTTP/2's MAX_CONCURRENT_STREAMS at 100
    too, grpcio queued both itself, and they ended in DEADLINE_EXCEEDED."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, not the module channel's
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as own:
        stub = pb.grpc.OrderServiceStub(own)
        live = pb.pb2.OrderStatusStreamRequest(heartbeat_seconds=1)
        watches = [stub.OrderStatusStream(live, timeout=DEADLINE) for _ in range(100)]
        try:
            assert all(next(watch).order_id == "" for watch in watches)  # each is open: its first heartbeat
            error = stream_error(stub, live)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            assert "--max-streams-per-connection" in error.details()
            started = time.monotonic()
            stub.ListOrders(pb.pb2.ListOrdersRequest(page_size=1), timeout=DEADLINE)
            assert time.monotonic() - started < DEADLINE / 2
        finally:
            for watch in watches:
                watch.cancel()


# --- error statuses as grpcio sees them -----------------------------------------------------------------------


def test_invalid_argument(stub: Any, pb: SimpleNamespace) -> None:
    error = rpc_error(stub.CreateOrder, pb.pb2.CreateOrderRequest())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least one item" in error.details()

    error = rpc_error(stub.GetOrder, pb.pb2.GetOrderRequest(id="not-a-uuid"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UUID" in error.details() and "not-a-uuid" in error.details()

    order = create(stub, pb)
    error = rpc_error(stub.UpdateOrderStatus, pb.pb2.UpdateOrderStatusRequest(id=order.id))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "status" in error.details()

    error = rpc_error(stub.ListOrders, pb.pb2.ListOrdersRequest(page_size=-1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in error.details()

    error = rpc_error(stub.ListOrders, pb.pb2.ListOrdersRequest(page_token="garbage!"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in error.details()

    error = stream_error(stub, pb.pb2.OrderStatusStreamRequest(after_sequence=-1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "after_sequence" in error.details()


def test_not_found(stub: Any, pb: SimpleNamespace) -> None:
    missing = str(uuid.uuid4())
    for call, request in [
        (stub.GetOrder, pb.pb2.GetOrderRequest(id=missing)),
        (stub.UpdateOrderStatus, pb.pb2.UpdateOrderStatusRequest(id=missing, status=pb.pb2.ORDER_STATUS_CONFIRMED)),
        (stub.CancelOrder, pb.pb2.CancelOrderRequest(id=missing)),
    ]:
        error = rpc_error(call, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert missing in error.details()


def test_failed_precondition(stub: Any, pb: SimpleNamespace) -> None:
    order = create(stub, pb)
    error = rpc_error(
        stub.UpdateOrderStatus, pb.pb2.UpdateOrderStatusRequest(id=order.id, status=pb.pb2.ORDER_STATUS_SHIPPED)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "PENDING" in error.details() and "SHIPPED" in error.details()

    stub.CancelOrder(pb.pb2.CancelOrderRequest(id=order.id), timeout=DEADLINE)
    error = rpc_error(
        stub.UpdateOrderStatus, pb.pb2.UpdateOrderStatusRequest(id=order.id, status=pb.pb2.ORDER_STATUS_CONFIRMED)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CANCELLED" in error.details() and "CONFIRMED" in error.details()


def test_aborted(stub: Any, pb: SimpleNamespace) -> None:
    order = create(stub, pb)
    for call, request in [
        (
            stub.UpdateOrderStatus,
            pb.pb2.UpdateOrderStatusRequest(id=order.id, status=pb.pb2.ORDER_STATUS_CONFIRMED, expected_version=7),
        ),
        (stub.CancelOrder, pb.pb2.CancelOrderRequest(id=order.id, expected_version=2)),
    ]:
        error = rpc_error(call, request)
        assert error.code() == grpc.StatusCode.ABORTED
        assert "version 1" in error.details()
    assert stub.GetOrder(pb.pb2.GetOrderRequest(id=order.id), timeout=DEADLINE).order == order


def test_already_exists_and_idempotent_retry(stub: Any, pb: SimpleNamespace) -> None:
    request_id = f"interop-{uuid.uuid4()}"
    first = create(stub, pb, ("Laptop", 1, 1000.0), request_id=request_id)
    retry = create(stub, pb, ("Laptop", 1, 1000.0), request_id=request_id)
    assert retry == first

    different = pb.pb2.CreateOrderRequest(
        items=[pb.pb2.OrderItem(product_name="Laptop", quantity=2, price=1000.0)], request_id=request_id
    )
    error = rpc_error(stub.CreateOrder, different)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert request_id in error.details()


def test_out_of_range(stub: Any, pb: SimpleNamespace) -> None:
    error = stream_error(stub, pb.pb2.OrderStatusStreamRequest(after_sequence=10**15))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "after_sequence" in error.details() and str(10**15) in error.details()


# --- bytes no generated client would send ---------------------------------------------------------------------


def raw_unary(channel: grpc.Channel, method: str, response_type: Any) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=lambda raw: raw, response_deserializer=response_type.FromString
    )


def test_unknown_fields_are_ignored(channel: grpc.Channel, stub: Any, pb: SimpleNamespace) -> None:
    order = create(stub, pb)
    request = pb.pb2.GetOrderRequest(id=order.id).SerializeToString() + unknown_fields()
    reply = raw_unary(channel, "GetOrder", pb.pb2.GetOrderResponse)(request, timeout=DEADLINE)
    assert reply.order == order

    # Nested: grpcio keeps unknown fields it parsed, so an item carrying them goes out with them.
    item = pb.pb2.OrderItem.FromString(
        pb.pb2.OrderItem(product_name="Lamp", quantity=2, price=9.99).SerializeToString() + unknown_fields()
    )
    request = pb.pb2.CreateOrderRequest(items=[item])
    assert unknown_fields() in request.SerializeToString()
    created = stub.CreateOrder(request, timeout=DEADLINE).order
    assert [(i.product_name, i.quantity, i.price) for i in created.items] == [("Lamp", 2, 9.99)]
    assert created.total_amount == 19.98


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate], ids=["gzip", "deflate"])
def test_compressed_requests_are_served(stub: Any, pb: SimpleNamespace, compression: grpc.Compression) -> None:
    """A client told to compress (here per call; also a channel option) sends its messages gzip or deflate."""
    items = [(f"Spare part {n:03d}, {'very ' * 30}long name", n + 1, 0.25) for n in range(300)]
    request = pb.pb2.CreateOrderRequest(
        items=[pb.pb2.OrderItem(product_name=name, quantity=q, price=p) for name, q, p in items]
    )
    assert request.ByteSize() > 50_000  # compressed by any client that compresses
    order = stub.CreateOrder(request, timeout=DEADLINE, compression=compression).order
    assert [(i.product_name, i.quantity, i.price) for i in order.items] == items
    assert stub.GetOrder(pb.pb2.GetOrderRequest(id=order.id), timeout=DEADLINE, compression=compression).order == order

    watch = pb.pb2.OrderStatusStreamRequest(order_ids=[order.id] * 2_000, after_sequence=0)
    call = stub.OrderStatusStream(watch, timeout=DEADLINE, compression=compression)
    try:
        created = next(call)
        assert (created.order_id, created.status) == (order.id, pb.pb2.ORDER_STATUS_PENDING)
    finally:
        call.cancel()


GARBAGE = {
    "truncated varint": b"\xff\xff\xff\xff",
    "length past the end": b"\x0a\x10abc",
    "invalid UTF-8 in a string": b"\x0a\x02\xff\xfe",
    "field number 0": b"\x00\x01",
}


@pytest.mark.parametrize("payload", GARBAGE.values(), ids=GARBAGE.keys())
@pytest.mark.parametrize("method", ["GetOrder", "CreateOrder", "UpdateOrderStatus", "CancelOrder", "ListOrders"])
def test_undecodable_request_is_invalid_argument(
    channel: grpc.Channel, pb: SimpleNamespace, method: str, payload: bytes
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        raw_unary(channel, method, getattr(pb.pb2, f"{method}Response"))(payload, timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    # Rejected as a message, not by a validation rule that whatever got decoded happens to break.
    assert f"{method}Request" in caught.value.details()


@pytest.mark.parametrize("payload", GARBAGE.values(), ids=GARBAGE.keys())
def test_undecodable_stream_request_is_invalid_argument(
    channel: grpc.Channel, pb: SimpleNamespace, payload: bytes
) -> None:
    call = channel.unary_stream(
        f"/{SERVICE}/OrderStatusStream",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.pb2.StatusUpdate.FromString,
    )(payload, timeout=DEADLINE)
    with pytest.raises(grpc.RpcError) as caught:
        next(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "OrderStatusStreamRequest" in caught.value.details()


# --- health and reflection, as grpcurl uses them --------------------------------------------------------------


@pytest.fixture(scope="module")
def probe(port: int) -> dict[str, Any]:
    """What grpcio-health-checking and grpcio-reflection report about the server (see tests/grpcio_probe.py)."""
    done = subprocess.run(
        [sys.executable, str(PROBE), str(port)], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_health(probe: dict[str, Any]) -> None:
    assert probe["health"] == {"": "SERVING", SERVICE: "SERVING", "no.such.Service": "NOT_FOUND"}


def test_reflection_lists_and_describes_services(probe: dict[str, Any]) -> None:
    services = set(probe["services"])
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services, services
    assert probe["described"]["grpc.health.v1.Health"] == ["Check", "Watch"]
    assert probe["described"]["grpc.reflection.v1alpha.ServerReflection"] == ["ServerReflectionInfo"]
    assert len(probe["described"][SERVICE]) == 6


def test_reflection_describes_the_service_and_messages(probe: dict[str, Any], pb: SimpleNamespace) -> None:
    file = pb.pb2.DESCRIPTOR
    assert probe["service_file"] == file.name
    service = file.services_by_name["OrderService"]
    assert probe["methods"] == [
        {
            "name": m.name,
            "input": m.input_type.full_name,
            "output": m.output_type.full_name,
            "client_streaming": m.client_streaming,
            "server_streaming": m.server_streaming,
        }
        for m in service.methods
    ]
    assert len(probe["methods"]) == 6
    for name, fields in probe["messages"].items():
        assert fields == field_shapes(file.message_types_by_name[name.removeprefix("orders.v1.")]), name
    stream_request = {f["name"]: f for f in probe["messages"]["orders.v1.OrderStatusStreamRequest"]}
    assert stream_request["after_sequence"]["presence"], "after_sequence must keep proto3 `optional` presence"
    enum = file.enum_types_by_name["OrderStatus"]
    assert [tuple(v) for v in probe["enum"]] == [(v.name, v.number) for v in enum.values]


def test_call_built_from_reflection_alone(probe: dict[str, Any]) -> None:
    order = probe["created"]["order"]
    assert order["items"][0]["product_name"] == "A"
    assert is_uuid(order["items"][0]["id"]) and is_uuid(order["id"])
    assert order["total_amount"] == 2.5
    assert order["status"] == "ORDER_STATUS_PENDING"
    assert order["version"] == "1"  # int64 is a string in protobuf JSON
