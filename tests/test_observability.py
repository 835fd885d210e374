"""Observability for operators: Prometheus metrics and the structured (JSON) access and server log.

Metrics are checked on an in-process server by scraping its real HTTP endpoint; logs on a real
``python -m orders.server`` process by reading its stderr after it exits. Every test that runs a server
runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from prometheus_client.parser import text_string_to_metric_families
from test_hostile import RawH2, grpc_message

from orders._proto.orders.v1 import (
    CancelOrderRequest,
    CreateOrderRequest,
    GetOrderRequest,
    GetOrderResponse,
    OrderItem,
    OrderServiceStub,
    OrderStatus,
    OrderStatusStreamRequest,
    StatusUpdate,
    UpdateOrderStatusRequest,
)
from orders.calls import CallRecord
from orders.observability import DURATION_BUCKETS, JsonFormatter, Metrics
from orders.storage import open_database
from orders.testing import running_server

TIMEOUT = 10.0
SERVICE = "/orders.v1.OrderService/"
CREATE, GET, UPDATE, CANCEL, WATCH = (
    SERVICE + name for name in ("CreateOrder", "GetOrder", "UpdateOrderStatus", "CancelOrder", "OrderStatusStream")
)
R = TypeVar("R")
ITEMS = [OrderItem(product_name="Widget", quantity=2, price=3.5)]


# --- helpers --------------------------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        assert response.status == 200
        return response.read().decode()


async def scrape(port: int) -> Samples:
    """Every sample the metrics endpoint serves, keyed by (sample name, labels)."""
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def calls_by_method_and_code(samples: Samples) -> dict[tuple[str, str], float]:
    """The non-zero ``orders_calls_total`` counters, keyed by (method, code)."""
    counts = {}
    for (name, labels), value in samples.items():
        if name == "orders_calls_total" and value:
            label = dict(labels)
            counts[(label["method"], label["code"])] = value
    return counts


def gauge(samples: Samples, name: str) -> float:
    return samples[(name, frozenset())]


async def eventually(port: int, check: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until ``check`` holds, failing after TIMEOUT with the last scrape."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        samples = await scrape(port)
        if check(samples):
            return samples
        if asyncio.get_running_loop().time() > deadline:
            gauges = {
                name: value for (name, labels), value in samples.items() if name.startswith("orders_") and not labels
            }
            raise AssertionError(f"never saw {what}; last scrape: {calls_by_method_and_code(samples)} {gauges}")
        await asyncio.sleep(0.02)


async def expect_error(call: object, code: Status) -> GRPCError:
    with pytest.raises(GRPCError) as caught:
        await asyncio.wait_for(call, TIMEOUT)  # type: ignore[arg-type]
    assert caught.value.status is code, caught.value
    return caught.value


@asynccontextmanager
async def channel_to(port: int) -> AsyncIterator[Channel]:
    channel = Channel("127.0.0.1", port)
    try:
        yield channel
    finally:
        channel.close()


def watch(channel: Channel, **metadata: str):  # type: ignore[no-untyped-def]  # grpclib's stream context
    return channel.request(
        WATCH,
        Cardinality.UNARY_STREAM,
        OrderStatusStreamRequest,
        StatusUpdate,
        timeout=TIMEOUT,
        metadata=metadata or None,
    )


# --- metrics ----------------------------------------------------------------------------------------------


async def test_metrics_count_every_call_by_method_and_code_and_track_watchers_and_the_log_head() -> None:
    async with running_server(metrics_port=0) as server, channel_to(server.port) as channel:
        assert server.metrics_port is not None and server.metrics_port not in (0, server.port)
        stub = OrderServiceStub(channel)
        before = await scrape(server.metrics_port)
        assert calls_by_method_and_code(before) == {}
        assert gauge(before, "orders_active_watchers") == 0
        assert gauge(before, "orders_event_log_head") == 0

        orders = [(await stub.create_order(CreateOrderRequest(items=ITEMS), timeout=TIMEOUT)).order for _ in range(3)]
        await stub.get_order(GetOrderRequest(id=orders[0].id), timeout=TIMEOUT)
        for _ in range(2):
            await expect_error(
                stub.get_order(GetOrderRequest(id="not-a-uuid"), timeout=TIMEOUT), Status.INVALID_ARGUMENT
            )
        await expect_error(stub.get_order(GetOrderRequest(id=str(uuid.uuid4())), timeout=TIMEOUT), Status.NOT_FOUND)
        await expect_error(
            stub.update_order_status(
                UpdateOrderStatusRequest(id=orders[0].id, status=OrderStatus.DELIVERED), timeout=TIMEOUT
            ),
            Status.FAILED_PRECONDITION,
        )
        await stub.update_order_status(
            UpdateOrderStatusRequest(id=orders[0].id, status=OrderStatus.CONFIRMED), timeout=TIMEOUT
        )
        await expect_error(
            stub.update_order_status(
                UpdateOrderStatusRequest(id=orders[0].id, status=OrderStatus.SHIPPED, expected_version=1),
                timeout=TIMEOUT,
            ),
            Status.ABORTED,
        )
        await stub.cancel_order(CancelOrderRequest(id=orders[1].id), timeout=TIMEOUT)
        events = 3 + 1 + 1  # three creations, one confirmation, one cancellation

        await eventually(server.metrics_port, lambda s: gauge(s, "orders_event_log_head") == events, "the head")
        async with watch(channel) as stream:
            await stream.send_message(OrderStatusStreamRequest(after_sequence=events), end=True)
            await eventually(server.metrics_port, lambda s: gauge(s, "orders_active_watchers") == 1, "one watcher")
            created = (await stub.create_order(CreateOrderRequest(items=ITEMS), timeout=TIMEOUT)).order
            events += 1
            update = await asyncio.wait_for(stream.recv_message(), TIMEOUT)
            assert update is not None and (update.order_id, update.sequence) == (created.id, events)
            await stream.cancel()
        samples = await eventually(
            server.metrics_port,
            lambda s: gauge(s, "orders_active_watchers") == 0 and (WATCH, "CANCELLED") in calls_by_method_and_code(s),
            "the watcher gone and its call counted",
        )

        assert gauge(samples, "orders_event_log_head") == events
        expected = {
            (CREATE, "OK"): 4,
            (GET, "OK"): 1,
            (GET, "INVALID_ARGUMENT"): 2,
            (GET, "NOT_FOUND"): 1,
            (UPDATE, "FAILED_PRECONDITION"): 1,
            (UPDATE, "OK"): 1,
            (UPDATE, "ABORTED"): 1,
            (CANCEL, "OK"): 1,
            (WATCH, "CANCELLED"): 1,
        }
        assert calls_by_method_and_code(samples) == expected

        per_method: dict[str, float] = {}
        for (method, _), count in expected.items():
            per_method[method] = per_method.get(method, 0) + count
        for method, count in per_method.items():
            labels = frozenset({("method", method)})
            assert samples[("orders_call_duration_seconds_count", labels)] == count, method
            assert samples[("orders_call_duration_seconds_sum", labels)] > 0, method
            buckets = [
                samples[("orders_call_duration_seconds_bucket", labels | {("le", str(b))})] for b in DURATION_BUCKETS
            ]
            inf = samples[("orders_call_duration_seconds_bucket", labels | {("le", "+Inf")})]
            assert buckets == sorted(buckets) and buckets[-1] <= inf == count, (method, buckets, inf)
        # A unary call on a local database (SQLite or PostgreSQL) finishes well inside the histogram's range.
        get = frozenset({("method", GET)})
        assert samples[("orders_call_duration_seconds_bucket", get | {("le", "5.0")})] == per_method[GET]


async def test_histogram_buckets_span_half_a_millisecond_to_five_seconds() -> None:
    async with running_server(metrics_port=0) as server:
        assert server.metrics_port is not None
        samples = await scrape(server.metrics_port)
    bounds = {
        dict(labels)["le"]
        for (name, labels), _ in samples.items()
        if name == "orders_call_duration_seconds_bucket" and dict(labels)["method"] == CREATE
    }
    assert bounds == {*map(str, DURATION_BUCKETS), "+Inf"}
    assert min(DURATION_BUCKETS) == 0.0005 and max(DURATION_BUCKETS) == 5.0


async def test_each_server_has_its_own_registry_and_releases_its_port_on_stop() -> None:
    async with running_server(metrics_port=0) as first, running_server(metrics_port=0) as second:
        assert first.metrics_port is not None and second.metrics_port is not None
        assert first.metrics_port != second.metrics_port
        async with channel_to(first.port) as channel:
            await OrderServiceStub(channel).create_order(CreateOrderRequest(items=ITEMS), timeout=TIMEOUT)
        await eventually(first.metrics_port, lambda s: gauge(s, "orders_event_log_head") == 1, "the first's head")
        assert calls_by_method_and_code(await scrape(first.metrics_port)) == {(CREATE, "OK"): 1}
        second_samples = await scrape(second.metrics_port)
        assert calls_by_method_and_code(second_samples) == {}
        assert gauge(second_samples, "orders_event_log_head") == 0
        port = first.metrics_port
    with pytest.raises(urllib.error.URLError):
        await scrape(port)


async def test_metrics_are_off_unless_a_port_is_given() -> None:
    async with running_server() as server:
        assert server.metrics_port is None and server.metrics is None


async def test_an_unknown_method_is_unimplemented_logged_and_counted_without_a_label_value_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="orders.access")
    async with running_server(metrics_port=0) as server, channel_to(server.port) as channel:
        assert server.metrics_port is not None
        for path in (SERVICE + "NoSuchMethod", "/no.such.Service/Method"):
            request = channel.request(path, Cardinality.UNARY_UNARY, GetOrderRequest, GetOrderResponse, timeout=TIMEOUT)
            async with request as call:
                await call.send_message(GetOrderRequest(id=str(uuid.uuid4())), end=True)
                with pytest.raises(GRPCError) as refused:
                    await call.recv_message()
            assert refused.value.status is Status.UNIMPLEMENTED, refused.value
            assert refused.value.message == f"this server has no method {path}; reflection lists its methods"
        samples = await scrape(server.metrics_port)
    assert calls_by_method_and_code(samples)[("unknown", "UNIMPLEMENTED")] == 2
    methods = {dict(labels)["method"] for (name, labels) in samples if name.startswith("orders_call")}
    # Only the methods the server serves (each series created up front) and "unknown", whatever clients ask for.
    assert methods == set(server._server._mapping) | {"unknown"}
    assert all(method.startswith(("/orders.v1.", "/grpc.")) for method in methods - {"unknown"}), methods
    logged = [r.getMessage() for r in caplog.records if r.name == "orders.access"]
    assert [line.split(" peer=")[0] for line in logged] == [
        f"{SERVICE}NoSuchMethod UNIMPLEMENTED",
        "/no.such.Service/Method UNIMPLEMENTED",
    ], logged


def test_a_method_the_server_does_not_serve_is_counted_as_unknown() -> None:
    class NoFeed:
        watcher_count = 0
        head = 0

    metrics = Metrics(NoFeed(), [GET])
    metrics.observe(CallRecord("/evil/" + "x" * 50, "UNIMPLEMENTED", None, "r1", 0.001))
    metrics.observe(CallRecord("/evil/other", "UNIMPLEMENTED", None, "r2", 0.001))
    metrics.observe(CallRecord(GET, "OK", None, "r3", 0.001))
    assert metrics.registry.get_sample_value("orders_calls_total", {"method": "unknown", "code": "UNIMPLEMENTED"}) == 2
    assert metrics.registry.get_sample_value("orders_calls_total", {"method": GET, "code": "OK"}) == 1
    methods = {
        sample.labels["method"]
        for family in metrics.registry.collect()
        for sample in family.samples
        if "method" in sample.labels
    }
    assert methods == {GET, "unknown"}


# --- logs ---------------------------------------------------------------------------------------------------


@dataclass
class ServerRun:
    """A ``python -m orders.server`` process; ``stderr`` is read once it has exited."""

    process: asyncio.subprocess.Process
    port: int
    log: Path
    db: str  # the database URL

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()


@asynccontextmanager
async def server_process(tmp_path: Path, db: str, *args: str) -> AsyncIterator[ServerRun]:
    """Run the server on the database ``db`` with ``args``; on exit, SIGTERM it and assert it exited 0."""
    log = tmp_path / "server.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orders.server",
            "--port",
            "0",
            "--db",
            db,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert line.startswith("Server started on port "), (line, log.read_text())
        yield ServerRun(process, int(line.split()[-1]), log, db)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0, log.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def freeze(url: str) -> None:
    """What an operator might do to the running server's database: a trigger that makes every insert into
    "order" fail with "frozen by ops" (SQLite, or a PL/pgSQL trigger function on PostgreSQL)."""
    database = open_database(url)
    try:
        with database.atomic():
            if url.startswith("sqlite"):
                database.execute_sql(
                    "CREATE TRIGGER freeze BEFORE INSERT ON \"order\" BEGIN SELECT RAISE(ABORT, 'frozen by ops'); END"
                )
            else:
                database.execute_sql(
                    "CREATE FUNCTION ops_freeze() RETURNS trigger LANGUAGE plpgsql "
                    "AS $$ BEGIN RAISE EXCEPTION 'frozen by ops'; END $$"
                )
                database.execute_sql(
                    'CREATE TRIGGER ops_freeze BEFORE INSERT ON "order" FOR EACH ROW EXECUTE FUNCTION ops_freeze()'
                )
    finally:
        database.close()


def parse_json_lines(lines: list[str]) -> list[dict]:
    entries = []
    for line in lines:
        entry = json.loads(line)  # every line, not only the access log
        assert isinstance(entry, dict), line
        assert entry["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}, line
        assert isinstance(entry["logger"], str) and entry["logger"], line
        time = datetime.fromisoformat(entry["time"])
        assert time.utcoffset() == timedelta(0), line
        assert abs(datetime.now(time.tzinfo) - time) < timedelta(minutes=5), line
        entries.append(entry)
    return entries


async def test_json_log_has_one_access_line_per_call_with_method_code_peer_and_request_id(
    tmp_path: Path, database_url: str
) -> None:
    async with server_process(tmp_path, database_url, "--log-format", "json", "--metrics-port", "0") as run:
        async with channel_to(run.port) as channel:
            stub = OrderServiceStub(channel)
            calls: dict[str, tuple[str, str]] = {}  # x-request-id sent -> (method, code) the client saw

            async def made(method: str, code: Status, rpc: Callable[[dict[str, str]], Awaitable[R]]) -> R | None:
                """Make one call with a fresh x-request-id and remember what its access line must say."""
                request_id = f"{method.rsplit('/', 1)[1]}-{code.name}-{uuid.uuid4().hex[:8]}"
                calls[request_id] = (method, code.name)
                if code is Status.OK:
                    return await asyncio.wait_for(rpc({"x-request-id": request_id}), TIMEOUT)
                await expect_error(rpc({"x-request-id": request_id}), code)
                return None

            created = await made(
                CREATE, Status.OK, lambda md: stub.create_order(CreateOrderRequest(items=ITEMS), metadata=md)
            )
            assert created is not None and created.order is not None
            created_id = created.order.id
            await made(GET, Status.OK, lambda md: stub.get_order(GetOrderRequest(id=created_id), metadata=md))
            await made(
                GET, Status.NOT_FOUND, lambda md: stub.get_order(GetOrderRequest(id=str(uuid.uuid4())), metadata=md)
            )
            await made(GET, Status.INVALID_ARGUMENT, lambda md: stub.get_order(GetOrderRequest(id="x"), metadata=md))
            await made(
                UPDATE,
                Status.FAILED_PRECONDITION,
                lambda md: stub.update_order_status(
                    UpdateOrderStatusRequest(id=created_id, status=OrderStatus.DELIVERED), metadata=md
                ),
            )
            # A stream the client cancels after one update.
            metadata = {"x-request-id": f"watch-{uuid.uuid4().hex[:8]}"}
            calls[metadata["x-request-id"]] = (WATCH, "CANCELLED")
            async with watch(channel, **metadata) as stream:
                await stream.send_message(OrderStatusStreamRequest(after_sequence=0), end=True)
                first = await asyncio.wait_for(stream.recv_message(), TIMEOUT)
                assert first is not None and first.order_id == created_id
                await stream.cancel()
            # A stream whose deadline passes: a raw client, which does not cancel the call at its own deadline
            # first (as grpclib's would), so the server ends it, with DEADLINE_EXCEEDED, and says so.
            deadline_id = f"deadline-{uuid.uuid4().hex[:8]}"
            calls[deadline_id] = (WATCH, "DEADLINE_EXCEEDED")
            raw = await RawH2.open(run.port)
            try:
                stream_id = raw.start(
                    WATCH.rsplit("/", 1)[1], extra_headers=[("grpc-timeout", "200m"), ("x-request-id", deadline_id)]
                )
                raw.conn.send_data(stream_id, grpc_message(b""), end_stream=True)
                await raw.flush()
                answer = await raw.response(stream_id)
            finally:
                raw.close()
            assert answer.get("grpc-status") == str(Status.DEADLINE_EXCEEDED.value), answer

            # An operator's trigger makes every insert fail: a fault the server cannot classify, so INTERNAL,
            # and the error message names the request id under which the log has the details.
            freeze(run.db)
            internal_id = f"internal-{uuid.uuid4().hex[:8]}"
            calls[internal_id] = (CREATE, "INTERNAL")
            error = await expect_error(
                stub.create_order(
                    CreateOrderRequest(items=ITEMS), metadata={"x-request-id": internal_id}, timeout=TIMEOUT
                ),
                Status.INTERNAL,
            )
            assert internal_id in (error.message or ""), error.message
            assert "frozen by ops" not in (error.message or "") and "Traceback" not in (error.message or "")

        entries = parse_json_lines(run.lines())
        # The metrics endpoint was up, announced in the log, and counted the same calls.
        [announcement] = [e for e in entries if re.fullmatch(r"metrics on port \d+", e.get("message", ""))]
        metrics_port = int(announcement["message"].split()[-1])
        counted = {(method, code): 1.0 for method, code in calls.values()}
        await eventually(
            metrics_port, lambda s: calls_by_method_and_code(s) == counted, f"the calls counted: {counted}"
        )

    entries = parse_json_lines(run.lines())  # again, now that the process has exited and flushed everything
    access = [e for e in entries if e["logger"] == "orders.access"]
    for entry in access:
        assert set(entry) == {"time", "level", "logger", "method", "peer", "code", "duration_ms", "request_id"}, entry
        assert entry["level"] == "INFO"
        assert re.fullmatch(r"127\.0\.0\.1:\d+", entry["peer"]), entry
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] >= 0, entry
    assert sorted(e["request_id"] for e in access) == sorted(calls), "exactly one access line per call"
    assert [e for e in entries if e["logger"].startswith("grpclib")] == []  # nor grpclib's own on the cancelled one
    for entry in access:
        assert (entry["method"], entry["code"]) == calls[entry["request_id"]], entry
    for entry in entries:
        if entry["logger"] != "orders.access":
            assert set(entry) <= {"time", "level", "logger", "message", "exc_info"} and "message" in entry, entry
    assert any(e.get("message") == "shutting down" for e in entries)

    # The error's details are in the log under the same request id, as one JSON line with the traceback.
    [failure] = [e for e in entries if e["level"] == "ERROR"]
    assert internal_id in failure["message"]
    assert "Traceback" in failure["exc_info"] and "frozen by ops" in failure["exc_info"]


@pytest.mark.database_free
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_startup_error_in_the_json_log_format_is_one_json_record(tmp_path: Path, workers: str) -> None:
    """What a text log says as one plain line (here: the port is taken) is a JSON record like every other
    line, so that a log shipper parsing stderr as JSON gets the one line that matters most."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "orders.server", "--port", str(port), "--db", f"sqlite:///{tmp_path}/o.db"]
        result = subprocess.run(
            [*command, "--log-format", "json", "--workers", workers], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1, result.stderr
    [entry] = parse_json_lines(result.stderr.splitlines())
    assert entry["level"] == "ERROR" and entry["logger"] == "orders.server", entry
    assert re.fullmatch(r"orders serve: cannot listen: .*[Aa]ddress already in use.*", entry["message"]), entry


async def test_the_text_access_log_line(tmp_path: Path, database_url: str) -> None:
    async with server_process(tmp_path, database_url) as run, channel_to(run.port) as channel:
        await expect_error(
            OrderServiceStub(channel).get_order(
                GetOrderRequest(id=str(uuid.uuid4())), metadata={"x-request-id": "text-1"}, timeout=TIMEOUT
            ),
            Status.NOT_FOUND,
        )
    [line] = [line for line in run.lines() if " orders.access " in line]
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO orders\.access /orders\.v1\.OrderService/GetOrder NOT_FOUND "
        r"peer=127\.0\.0\.1:\d+ request_id=text-1 \d+\.\dms",
        line,
    ), line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_json_formatter_keeps_a_record_with_newlines_and_a_traceback_on_one_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.getLogger("orders.test").makeRecord(
            "orders.test", logging.ERROR, __file__, 1, "two\nlines %s", ("here",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "two\nlines here"
    assert entry["level"] == "ERROR" and entry["logger"] == "orders.test"
    assert entry["exc_info"].startswith("Traceback") and "ValueError: bad\nthing" in entry["exc_info"]
    assert datetime.fromisoformat(entry["time"]).utcoffset() == timedelta(0)
