"""Graceful shutdown of the real server process: SIGTERM (or SIGINT, or SIGHUP) stops accepting connections, ends
every watch with UNAVAILABLE, lets the unary calls already running finish, refuses calls that arrive
after it began with UNAVAILABLE, loses no acknowledged write, and exits 0 -- within ``--grace``: a call
still running when the grace period is over is cancelled and the process exits 0 all the same.

A stop signal that arrives while the server is still starting (waiting for a database that does not answer,
or for another process's write lock) does not wait for the database: the server exits at once, with one line
saying so, killed by the signal as a process without handlers for it is.

Every test runs on SQLite and on PostgreSQL. Calls are kept genuinely in flight by holding the database's
write lock from the test, so the server's writes wait exactly as they would behind another writer: on
SQLite ``BEGIN IMMEDIATE`` on the server's own file (they wait on its busy timeout), on PostgreSQL the
advisory lock every write transaction of the server takes first (``WRITE_LOCK_KEY``, held here at session
level). The load test needs no lock, only many concurrent writers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import os
import random
import signal
import sqlite3
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from server_process import ServerProcess, child_pids, has_open
from test_stream import eventually

from orders import storage
from orders._proto.orders.v1 import (
    CreateOrderRequest,
    GetOrderRequest,
    ListOrdersRequest,
    Order,
    OrderItem,
    OrderServiceStub,
    OrderStatus,
    OrderStatusStreamRequest,
    StatusUpdate,
    UpdateOrderStatusRequest,
)
from orders.server import AFTER_GRACE, LINGER

SIGNALS = [pytest.param(signum, id=signum.name) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)]
T = 20.0  # seconds every call may take
NEXT = {OrderStatus.PENDING: OrderStatus.CONFIRMED, OrderStatus.CONFIRMED: OrderStatus.SHIPPED}


def outcome(exc: BaseException | None) -> str:
    """How a call ended, as one word: OK, a gRPC status name, or the exception type."""
    if exc is None:
        return "OK"
    return exc.status.name if isinstance(exc, GRPCError) else type(exc).__name__


async def call(awaitable: Awaitable[Any]) -> tuple[Any, str]:
    """The reply (or None) and the outcome of a stub call.

    Give the stub call a ``timeout`` (grpclib's deadline) rather than wrapping it in ``asyncio.wait_for``,
    which on Python 3.11 runs it in a new task: awaited directly, the request is on the wire before the
    caller yields, so "started before the signal" means sent before it.
    """
    try:
        return await awaitable, "OK"
    except (GRPCError, StreamTerminatedError, ConnectionError, OSError) as exc:
        return None, outcome(exc)


@contextlib.contextmanager
def write_lock(url: str) -> Iterator[Callable[[], None]]:
    """Hold the write lock of the database at ``url`` (as another writer would) until the block ends or
    the yielded ``release()`` is called: SQLite's (``BEGIN IMMEDIATE``), or on PostgreSQL the advisory lock
    every write transaction takes first, here session-level on a connection of the test's own."""
    if url.startswith("sqlite"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, timeout=5)
        try:
            db.execute("BEGIN IMMEDIATE")
            yield lambda: db.execute("ROLLBACK").close()
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            db.close()
        return
    import psycopg

    libpq_url = urllib.parse.urlsplit(url)._replace(scheme="postgresql").geturl()  # libpq knows no playhouse schemes
    with psycopg.connect(libpq_url, autocommit=True, connect_timeout=5) as pg:
        pg.execute("SELECT pg_advisory_lock(%s)", (storage.WRITE_LOCK_KEY,))
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                unlocked = pg.execute("SELECT pg_advisory_unlock(%s)", (storage.WRITE_LOCK_KEY,)).fetchone()
                assert unlocked == (True,), "the test did not hold the write lock"

        try:
            yield release
        finally:
            release()


def event_count(url: str) -> int:
    """How many events the database holds, read directly (the server stopped)."""
    database = storage.open_database(url)
    try:
        return database.execute_sql("SELECT COUNT(*) FROM status_event").fetchone()[0]
    finally:
        database.close()


@dataclass
class Watch:
    """An open OrderStatusStream: what it received and how it ended."""

    updates: list[StatusUpdate] = field(default_factory=list)
    ended: str | None = None
    ended_at: float = 0.0
    task: asyncio.Task[None] | None = None

    async def run(self, stub: OrderServiceStub, request: OrderStatusStreamRequest) -> None:
        try:
            async for update in stub.order_status_stream(request):
                self.updates.append(update)
            self.ended = "OK"
        except (GRPCError, StreamTerminatedError, ConnectionError, OSError) as exc:
            self.ended = outcome(exc)
        finally:
            self.ended_at = time.monotonic()

    def start(self, stub: OrderServiceStub, request: OrderStatusStreamRequest) -> Watch:
        self.task = asyncio.create_task(self.run(stub, request))
        return self

    async def until(self, sequence: int) -> None:
        async def wait() -> None:
            while not self.updates or self.updates[-1].sequence < sequence:
                assert self.task is not None and not self.task.done(), f"the watch ended: {self.ended}"
                await asyncio.sleep(0.01)

        await asyncio.wait_for(wait(), 10)


def items(name: str) -> list[OrderItem]:
    return [OrderItem(product_name=name, quantity=2, price=12.34), OrderItem(product_name=f"{name} b", quantity=1)]


async def all_orders(stub: OrderServiceStub) -> dict[str, Order]:
    page = await asyncio.wait_for(stub.list_orders(ListOrdersRequest(page_size=1000)), 10)
    assert not page.next_page_token
    return {order.id: order for order in page.orders}


async def replay(stub: OrderServiceStub, count: int) -> list[StatusUpdate]:
    """The first ``count`` events of the log (fewer if there are not that many)."""
    updates: list[StatusUpdate] = []

    async def read() -> None:
        async with contextlib.aclosing(stub.order_status_stream(OrderStatusStreamRequest(after_sequence=0))) as stream:
            async for update in stream:
                updates.append(update)
                if len(updates) == count:
                    return

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(read(), 5)
    return updates


@pytest.mark.parametrize("signum", SIGNALS)
async def test_in_flight_calls_finish_and_late_calls_are_refused(tmp_path, database_url, signum):
    """11 writes held in flight by the lock at the signal: the watches end UNAVAILABLE at once, calls
    arriving while the server drains are refused with UNAVAILABLE (and do nothing), new connections are
    refused, the server waits for the writes, which all succeed once the lock goes, then exits 0."""
    server = ServerProcess(tmp_path, database_url, args=["--grace", "10"])
    channels = [Channel("127.0.0.1", server.port) for _ in range(8)]
    stubs = [OrderServiceStub(channel) for channel in channels]
    try:
        await server.start()
        setup = stubs[0]
        orders = [
            (await setup.create_order(CreateOrderRequest(items=items(f"setup {i}")), timeout=T)).order for i in range(4)
        ]
        ids = [order.id for order in orders]
        watches = [
            Watch().start(stubs[1], OrderStatusStreamRequest(heartbeat_seconds=1)),  # live, every order
            Watch().start(stubs[1], OrderStatusStreamRequest(after_sequence=0)),  # replay, then live
            Watch().start(stubs[2], OrderStatusStreamRequest(order_ids=ids[:2], heartbeat_seconds=1)),
        ]
        for watch in watches:  # registered: the live ones' first heartbeat (at the log's head, 4) proves it
            await watch.until(4)
        await setup.update_order_status(UpdateOrderStatusRequest(id=ids[0], status=OrderStatus.CONFIRMED), timeout=T)
        for watch in watches:
            await watch.until(5)  # every watch is open and live
        for stub in stubs[3:]:  # connected, so that each call below reaches the server well before the signal
            await stub.get_order(GetOrderRequest(id=ids[3]), timeout=T)

        with write_lock(database_url) as release:
            # calls that reach the server and wait for the database: in flight when the signal comes
            creates = [
                asyncio.create_task(
                    call(stubs[3 + i % 5].create_order(CreateOrderRequest(items=items(f"in flight {i}")), timeout=T))
                )
                for i in range(8)
            ]
            changes = [
                asyncio.create_task(
                    call(
                        stubs[3 + i].update_order_status(
                            UpdateOrderStatusRequest(id=order_id, status=status), timeout=T
                        )
                    )
                )
                for i, (order_id, status) in enumerate(
                    [(ids[0], OrderStatus.SHIPPED), (ids[1], OrderStatus.CONFIRMED), (ids[2], OrderStatus.CANCELLED)]
                )
            ]
            in_flight = creates + changes
            await asyncio.sleep(0.5)
            assert not any(task.done() for task in in_flight), [t.result() for t in in_flight if t.done()]

            signalled = time.monotonic()
            server.send_signal(signum)
            # every watch ends with UNAVAILABLE at once, while the unary calls are still waiting
            await asyncio.wait([watch.task for watch in watches], timeout=5)
            assert [watch.ended for watch in watches] == ["UNAVAILABLE"] * 3, "the watches end at once, UNAVAILABLE"
            watch_end = max(watch.ended_at for watch in watches) - signalled

            # calls that arrive now, on connections already open, are refused with UNAVAILABLE ...
            late_create, late_create_code = await call(
                setup.create_order(CreateOrderRequest(items=items("late")), timeout=5)
            )
            _, late_get_code = await call(setup.get_order(GetOrderRequest(id=ids[3]), timeout=5))
            late_watch = Watch()
            await asyncio.wait_for(late_watch.run(stubs[1], OrderStatusStreamRequest()), 5)
            late_watch_code = late_watch.ended
            assert (late_create_code, late_get_code, late_watch_code) == ("UNAVAILABLE",) * 3
            # ... and new connections are not accepted
            fresh = Channel("127.0.0.1", server.port)
            channels.append(fresh)
            _, fresh_code = await call(OrderServiceStub(fresh).get_order(GetOrderRequest(id=ids[3]), timeout=5))
            assert fresh_code == "ConnectionRefusedError"

            assert not any(task.done() for task in in_flight), "the in-flight calls must still be running"
            assert server.running, "the server exited before its in-flight calls finished"
            release()  # let the writes through
            released = time.monotonic()

            results = await asyncio.wait_for(asyncio.gather(*in_flight), 15)
            answered = time.monotonic()
            # a call sent the moment the last of them is answered, as the server stops, is still refused
            last_call = stubs[3].get_order(GetOrderRequest(id=ids[3]), timeout=5)
            held_up = time.monotonic() - answered > LINGER / 2  # this (loaded) process, before it sent the call
            _, last_code = await call(last_call)
        assert [code for _, code in results] == ["OK"] * len(in_flight), results
        # The drained server lingers LINGER (0.2 s) before it closes the connections, so this is UNAVAILABLE,
        # or, should it arrive after the close, refused with the connection. What it must not be is cut off
        # (StreamTerminatedError) -- unless this process was held up so long that it could only be sent as
        # the server closed the connection.
        refused = ("UNAVAILABLE", "ConnectionRefusedError")
        cut_off = ("StreamTerminatedError", "ConnectionResetError") if held_up else ()
        assert last_code in refused + cut_off, f"a call sent as the drain ended got {last_code}"
        assert await server.wait(10) == 0
        exit_after_release = time.monotonic() - released
        assert exit_after_release < 5, "the server exits once its calls are done, not at the end of --grace 10"

        created = [reply.order for reply, _ in results[: len(creates)]]
        changed = [reply.order for reply, _ in results[len(creates) :]]
        await server.start()
        stub = OrderServiceStub(channels[0])
        stored = await all_orders(stub)
        expected = {order.id: order for order in [*orders, *created, *changed]}  # the last reply for each
        assert stored == expected, "every acknowledged write is there, and nothing else (the late create)"
        log = await replay(stub, 4 + 1 + 8 + 3)
        assert [u.sequence for u in log] == list(range(1, 17))
        assert await server.stop() == 0
        print(
            f"\n[shutdown {signum.name}] watches ended {watch_end * 1000:.0f} ms after the signal with "
            f"{[watch.ended for watch in watches]}; late calls: create {late_create_code}, get {late_get_code}, "
            f"watch {late_watch_code}, new connection {fresh_code}; {len(in_flight)} in-flight calls "
            f"{sorted({code for _, code in results})} once the lock was released, then a call {last_code}; exit 0 "
            f"{exit_after_release * 1000:.0f} ms after that"
        )
        assert late_create is None
    finally:
        for channel in channels:
            channel.close()
        await server.kill()


async def test_a_server_started_under_nohup_outlives_its_terminal(tmp_path, database_url):
    """SIGHUP stops a server gracefully (its terminal closed), but not one started with SIGHUP ignored,
    as ``nohup orders serve &`` starts it."""
    server = ServerProcess(tmp_path, database_url, ignored_signals=[signal.SIGHUP])
    channel = Channel("127.0.0.1", server.port)
    try:
        await server.start()
        server.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        reply = await OrderServiceStub(channel).create_order(CreateOrderRequest(items=items("after SIGHUP")), timeout=T)
        assert reply.order.status == OrderStatus.PENDING
        assert server.running
        assert await server.stop() == 0
    finally:
        channel.close()
        await server.kill()


async def test_a_health_watch_ends_at_once_and_does_not_hold_up_the_shutdown(tmp_path, database_url):
    """grpcio's client-side health checking keeps a Health/Watch open on every connection: on SIGTERM it ends
    with UNAVAILABLE at once, as the order streams do, instead of running to the end of --grace."""
    server = ServerProcess(tmp_path, database_url, args=["--grace", "10"])
    channel = Channel("127.0.0.1", server.port)
    try:
        await server.start()
        watch = await HealthStub(channel).Watch.open(timeout=T).__aenter__()
        await watch.send_message(HealthCheckRequest(service="orders.v1.OrderService"), end=True)
        assert (await watch.recv_message()).status == HealthCheckResponse.SERVING
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(watch.recv_message(), 5) is None  # ended ...
        with pytest.raises(GRPCError) as ended:
            await watch.recv_trailing_metadata()  # ... with this status
        assert ended.value.status is Status.UNAVAILABLE and "shutting down" in (ended.value.message or "")
        assert await server.wait(5) == 0
        assert time.monotonic() - signalled < 3, "the shutdown waited for the health watch"
    finally:
        channel.close()
        await server.kill()


@pytest.mark.parametrize("told_twice", [False, True])
async def test_a_call_outlasting_the_grace_period_is_cancelled_and_the_server_still_exits_0(
    tmp_path, database_url, told_twice
):
    """Writes stuck behind a lock held past ``--grace 1``: at the end of the grace period they are cancelled
    with UNAVAILABLE, and the process exits 0 at once rather than when the stuck database call ends (on
    SQLite's busy timeout or PostgreSQL's lock timeout, 10 s); the cancelled writes did nothing. A second
    signal (an operator's second Ctrl-C) ends the grace period at once, however long it was to be."""
    grace = 1.0
    hurry_after = 0.3
    server = ServerProcess(tmp_path, database_url, args=["--grace", str(60 if told_twice else grace)])
    channels = [Channel("127.0.0.1", server.port) for _ in range(4)]
    stubs = [OrderServiceStub(channel) for channel in channels]
    try:
        await server.start()
        setup = (await stubs[0].create_order(CreateOrderRequest(items=items("setup")), timeout=T)).order
        for stub in stubs[1:]:  # connected, so that each call below reaches the server well before the signal
            await stub.get_order(GetOrderRequest(id=setup.id), timeout=T)
        with write_lock(database_url):  # held well past the grace period
            in_flight = [
                asyncio.create_task(call(stub.create_order(CreateOrderRequest(items=items(f"stuck {i}")), timeout=T)))
                for i, stub in enumerate(stubs[1:])
            ]
            in_flight.append(
                asyncio.create_task(
                    call(
                        stubs[0].update_order_status(
                            UpdateOrderStatusRequest(id=setup.id, status=OrderStatus.CONFIRMED), timeout=T
                        )
                    )
                )
            )
            await asyncio.sleep(0.5)
            assert not any(task.done() for task in in_flight)
            signalled = time.monotonic()
            server.send_signal(signal.SIGTERM)
            if told_twice:
                await asyncio.sleep(hurry_after)
                server.send_signal(signal.SIGINT)
            exit_code = await server.wait(grace + 10)
            took = time.monotonic() - signalled
            results = await asyncio.wait_for(asyncio.gather(*in_flight), 5)
        codes = [code for _, code in results]
        print(f"\n[shutdown grace={grace}s] exit {exit_code} {took:.2f}s after SIGTERM; the stuck calls saw {codes}")
        assert exit_code == 0
        # the grace period, then at most AFTER_GRACE for each of the three steps after it (the cancelled
        # calls, the connections, the storage threads), then the exit: well before the stuck call would end
        grace_taken = hurry_after if told_twice else grace
        assert grace_taken <= took < grace_taken + 3 * AFTER_GRACE + 1.5, f"exit {took:.2f}s after SIGTERM"
        assert codes == ["UNAVAILABLE"] * len(in_flight), "cut off by the shutdown: UNAVAILABLE, not a reset"

        await server.start()
        stored = await all_orders(stubs[0])
        assert stored == {setup.id: setup}, "a cancelled call wrote nothing"
        assert [u.sequence for u in await replay(stubs[0], 1)] == [1]
        assert await server.stop() == 0
        assert event_count(database_url) == 1
    finally:
        for channel in channels:
            channel.close()
        await server.kill()


@pytest.mark.parametrize("signum", SIGNALS)
async def test_signal_under_load_loses_no_acknowledged_write(tmp_path, database_url, signum):
    """16 writers flat out plus watchers, and the signal at a random moment: every call ends OK or
    UNAVAILABLE (or finds the port closed, if it starts once the server is gone), every watch ends
    UNAVAILABLE, and after a restart the database holds exactly what was acknowledged: an UNAVAILABLE
    call did nothing, so it is safe to retry."""
    writers = 16
    rng = random.Random()
    server = ServerProcess(tmp_path, database_url)
    channels = [Channel("127.0.0.1", server.port) for _ in range(writers + 1)]
    acked: dict[str, Order] = {}  # order id -> last acknowledged reply
    refused: list[str] = []  # product names of creates answered UNAVAILABLE
    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()  # (before/after the signal, outcome)
    signalled: float | None = None
    in_flight_at_signal = 0

    async def writer(number: int, stub: OrderServiceStub) -> None:
        nonlocal in_flight_at_signal
        mine: list[str] = []
        for n in itertools.count():
            changeable = [order_id for order_id in mine if acked[order_id].status in NEXT]
            started_before = signalled is None
            if changeable and rng.random() < 0.4:
                order = acked[rng.choice(changeable)]
                request = UpdateOrderStatusRequest(id=order.id, status=NEXT[order.status])
                reply, code = await call(stub.update_order_status(request, timeout=T))
            else:
                name = f"writer {number} order {n}"
                reply, code = await call(stub.create_order(CreateOrderRequest(items=items(name)), timeout=T))
                if code == "UNAVAILABLE":
                    refused.append(name)
            outcomes["before" if started_before else "after", code] += 1
            if started_before and signalled is not None and code == "OK":
                in_flight_at_signal += 1
            if reply is None:
                return
            acked[reply.order.id] = reply.order
            if reply.order.id not in mine:
                mine.append(reply.order.id)

    try:
        await server.start()
        watches = [
            Watch().start(OrderServiceStub(channels[writers]), OrderStatusStreamRequest()),
            Watch().start(OrderServiceStub(channels[writers]), OrderStatusStreamRequest(after_sequence=0)),
        ]
        tasks = [asyncio.create_task(writer(n, OrderServiceStub(channels[n]))) for n in range(writers)]
        await asyncio.sleep(rng.uniform(0.2, 0.6))
        assert not any(task.done() for task in tasks), [task for task in tasks if task.done()]
        signalled = time.monotonic()
        server.send_signal(signum)
        exit_code = await server.wait(15)
        took = time.monotonic() - signalled
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        await asyncio.wait_for(asyncio.gather(*(watch.task for watch in watches)), 5)

        figures = (
            f"exit {exit_code} after {took * 1000:.0f} ms; {in_flight_at_signal} calls in flight at the signal "
            f"finished OK; calls by (start vs signal, outcome): {dict(outcomes)}"
        )
        print(f"\n[shutdown under load, {signum.name}] {figures}; watches {[w.ended for w in watches]}")
        assert exit_code == 0
        assert took < 5, "the server exits once its calls are done, not at the end of the 10 s grace period"
        assert [watch.ended for watch in watches] == ["UNAVAILABLE"] * len(watches)
        assert {code for start, code in outcomes if start == "before"} <= {"OK", "UNAVAILABLE"}, figures
        # A call sent after the server's 0.2 s linger finds it gone: no listener (refused), or, if it crossed
        # the closing of its connection, cut off (terminated; rare, and no HTTP/2 GOAWAY would help: grpclib
        # clients drop the connection on one). Either way it was not executed (checked below).
        assert {code for start, code in outcomes if start == "after"} <= {
            "OK",
            "UNAVAILABLE",
            "ConnectionRefusedError",
            "StreamTerminatedError",
        }, figures
        assert in_flight_at_signal > 0, "no call running at the signal finished OK: cut off, or none was running"
        assert acked, "nothing was acknowledged; the test proves nothing"

        await server.start()
        stub = OrderServiceStub(channels[0])
        stored = await all_orders(stub)
        assert stored == acked, "the database holds exactly the acknowledged writes"
        head = sum(order.version for order in stored.values())
        assert [u.sequence for u in await replay(stub, head)] == list(range(1, head + 1))
        assert await server.stop() == 0
    finally:
        for channel in channels:
            channel.close()
        await server.kill()


# --- a stop signal during start-up ----------------------------------------------------------------------------

START_UP_STOP_BOUND = 3.0  # seconds from the signal to the exit; the database is waited for 10 s or more


def stopped_while_starting(signum: signal.Signals) -> str:
    """What the server says on stderr when a stop signal ends it while it starts."""
    return f"orders serve: stopped by {signum.name} while starting, before serving\n"


def tell(server: ServerProcess, signum: signal.Signals) -> None:
    """Send ``signum`` as it comes in real life: SIGTERM from a supervisor to the server process alone,
    SIGINT (Ctrl-C) and SIGHUP (its terminal closed) from its terminal to its whole process group."""
    if signum == signal.SIGTERM:
        server.send_signal(signum)
    else:
        server.signal_group(signum)


@dataclass
class UnansweringDatabase:
    """A database that a starting server waits for far longer than the test, and how to tell that process
    ``pid`` waits for it now."""

    url: str
    waited_for_by: Callable[[int], bool]


@pytest.fixture
async def unanswering_database(backend: str, tmp_path: Path) -> AsyncIterator[UnansweringDatabase]:
    """On SQLite, a file whose writer lock this process holds, as a sibling server would (waited for 10 s,
    the busy timeout); on PostgreSQL, a server that accepts connections and never says a word (waited for
    30 s, the URL's connect_timeout)."""
    if backend == "sqlite":
        path = tmp_path / "orders.db"
        lock = tmp_path / "orders.db-writer.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield UnansweringDatabase(f"sqlite:///{path}", lambda pid: has_open(pid, lock))
        finally:
            os.close(fd)
        return
    connections: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)  # held open, never answered

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield UnansweringDatabase(
            f"postgresql://postgres@127.0.0.1:{port}/orders?connect_timeout=30", lambda _: bool(connections)
        )
    finally:
        listener.close()
        for writer in connections:
            writer.close()


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("signum", SIGNALS)
async def test_a_stop_signal_while_the_database_does_not_answer_at_start_up_ends_the_server_at_once(
    tmp_path, unanswering_database, signum, workers
):
    """Told to stop while it waits for its database at start-up (with ``--workers 2``, the supervisor, which
    prepares the database before it starts any worker), the server does not wait on: it exits at once, with
    one line and no traceback, killed by the signal (a shell's ``$?`` is 128 + its number)."""
    server = ServerProcess(tmp_path, unanswering_database.url, args=["--workers", workers])
    try:
        await server.launch()
        assert server.process is not None and server.process.stdout is not None
        await eventually(lambda: unanswering_database.waited_for_by(server.process.pid), "the wait for the database")
        await assert_stopped_at_once(server, signum, f"stop while starting, {signum.name}, --workers {workers}")
    finally:
        await server.kill_group()


async def assert_stopped_at_once(server: ServerProcess, signum: signal.Signals, label: str) -> None:
    """Send ``signum`` to a server still starting: it must end within START_UP_STOP_BOUND, killed by the signal,
    having printed nothing on stdout and exactly the one line on stderr."""
    assert server.process is not None and server.process.stdout is not None
    signalled = time.monotonic()
    tell(server, signum)
    exit_code = await server.wait()
    took = time.monotonic() - signalled
    print(f"\n[{label}] exit {exit_code} after {took:.2f}s")
    assert exit_code == -signum, server.log.read_text()
    assert took < START_UP_STOP_BOUND
    assert await server.process.stdout.read() == b""
    assert server.log.read_text() == stopped_while_starting(signum)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_server_started_under_nohup_ignores_sighup_while_starting_too(tmp_path, unanswering_database, workers):
    """SIGHUP ignored, as ``nohup`` starts the server, stays ignored during start-up; SIGTERM still stops it."""
    server = ServerProcess(
        tmp_path, unanswering_database.url, args=["--workers", workers], ignored_signals=[signal.SIGHUP]
    )
    try:
        await server.launch()
        assert server.process is not None
        await eventually(lambda: unanswering_database.waited_for_by(server.process.pid), "the wait for the database")
        server.signal_group(signal.SIGHUP)
        await asyncio.sleep(1)
        assert server.running, server.log.read_text()
        signalled = time.monotonic()
        assert await server.stop() == -signal.SIGTERM, server.log.read_text()
        assert time.monotonic() - signalled < START_UP_STOP_BOUND
        assert server.log.read_text() == stopped_while_starting(signal.SIGTERM)
    finally:
        await server.kill_group()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
async def test_a_ctrl_c_as_the_workers_are_spawned_is_one_line_not_their_import_tracebacks(
    tmp_path, database_url, signum
):
    """A Ctrl-C (or the terminal's hang-up) reaches every process of the group, workers still importing the
    server included: they hold it back from their first instruction and then drop it, and the supervisor
    alone speaks."""
    server = ServerProcess(tmp_path, database_url, args=["--workers", "2"])
    try:
        await server.launch()
        assert server.process is not None
        supervisor = server.process.pid
        await eventually(lambda: len(child_pids(supervisor)) >= 2, "the workers spawned", 15)
        tell(server, signum)
        assert await server.wait() == -signum, server.log.read_text()
        said = [line for line in server.log.read_text().splitlines() if " INFO " not in line]  # a worker that
        assert said == [stopped_while_starting(signum).strip()]  # listened already drains, and may say so
    finally:
        await server.kill_group()


@contextlib.contextmanager
def write_lock_waiters(url: str) -> Iterator[Callable[[list[int]], int]]:
    """A function counting how many of the processes it is given wait for the write lock of the database at
    ``url`` (held by the test): on SQLite those with its lock file open (the holder, stuck in SQLite's busy
    wait, and the others), on PostgreSQL the sessions waiting for its advisory lock (whichever processes)."""
    if url.startswith("sqlite"):
        lock = Path(url.removeprefix("sqlite:///") + "-writer.lock")
        yield lambda pids: sum(has_open(pid, lock) for pid in pids)
        return
    import psycopg

    libpq_url = urllib.parse.urlsplit(url)._replace(scheme="postgresql").geturl()
    with psycopg.connect(libpq_url, autocommit=True, connect_timeout=5) as pg:
        query = (  # in this database: pg_locks shows every database's, and other tests run beside this one
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        yield lambda _: pg.execute(query).fetchone()[0]


@pytest.mark.parametrize(
    "signum", [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]
)
async def test_a_stop_signal_while_the_workers_wait_for_the_database_ends_them_and_the_supervisor_at_once(
    tmp_path, database_url, signum
):
    """With ``--workers 2``, the database prepared, the workers start, and wait for the write lock another
    process holds: a stop signal to the supervisor (or a Ctrl-C to all) ends the workers and the supervisor at
    once, with one line, rather than once the workers' wait for the lock has run out."""
    server = ServerProcess(tmp_path, database_url, args=["--workers", "2"])
    try:
        await server.launch()
        assert server.process is not None and server.process.stdout is not None
        supervisor = server.process.pid
        await eventually(lambda: bool(child_pids(supervisor)), "a child process: the database is prepared")
        with write_lock(database_url), write_lock_waiters(database_url) as waiters:
            await eventually(lambda: waiters(child_pids(supervisor)) == 2, "both workers waiting for the lock", 15)
            await assert_stopped_at_once(server, signum, f"stop while the workers start, {signum.name}")
    finally:
        await server.kill_group()
