"""The client library (orders.client.OrderClient) against real servers: lazy paging, the error family,
retries when nothing listens, and idempotent creates and gap-free watches across a server restart."""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from server_process import ServerProcess, free_port
from test_shutdown import write_lock
from test_stream import eventually

from orders import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Item,
    NotFound,
    OrderClient,
    OrderError,
    OrderStatus,
    OutOfRange,
    RetryPolicy,
    StatusUpdate,
    Unavailable,
)
from orders.errors import DeadlineExceeded
from orders.storage import open_database
from orders.testing import running_server

# retries every 0.2 s at most, until the call's timeout: a restart of the server, however slow, fits
FAST_RETRY = RetryPolicy(attempts=10_000, initial_backoff=0.02, max_backoff=0.2)


# --- a server in a subprocess, restartable on the same port and file ------------------------------


# --- paging ---------------------------------------------------------------------------------------


async def test_list_pages_lazily_through_every_order_in_creation_order(server, client):
    created = []
    for start in range(0, 120, 20):
        created += await asyncio.gather(*(client.create([Item(f"item {i}", 1, 1.0)]) for i in range(start, start + 20)))
    created_ids = [o.id for o in sorted(created, key=lambda o: (o.create_time, o.id))]
    listed_once = [o.id async for o in client.list(page_size=1000)]
    assert sorted(listed_once) == sorted(created_ids)

    pages = 0
    list_page = client.list_page

    async def counting_list_page(**kwargs):
        nonlocal pages
        pages += 1
        assert kwargs["page_size"] == 50
        return await list_page(**kwargs)

    client.list_page = counting_list_page
    orders = client.list(page_size=50)
    seen = []
    async for order in orders:
        seen.append(order.id)
        # a page is fetched only when the previous one is used up
        assert pages == (len(seen) - 1) // 50 + 1, (len(seen), pages)
    assert pages == 3
    assert seen == listed_once, "every order once, in creation order"
    assert len(seen) == 120

    # stopping early fetches nothing more
    pages = 0
    async for order in client.list(page_size=50):
        if order.id == seen[10]:
            break
    assert pages == 1


async def test_list_filters_by_status_across_pages(server, client):
    ids = [(await client.create([Item("x", 1, 1.0)])).id for _ in range(12)]
    for order_id in ids[::3]:
        await client.update_status(order_id, OrderStatus.CONFIRMED)
    confirmed = [o.id async for o in client.list(statuses=[OrderStatus.CONFIRMED], page_size=2)]
    assert confirmed == ids[::3]


# --- request ids ----------------------------------------------------------------------------------


async def test_a_create_without_a_request_id_sends_a_fresh_time_ordered_one(server, client):
    """The default idempotency keys are version-7 UUIDs, one per create, in the order they were made:
    the server's index of keys then grows at its end instead of at a random page per create."""
    before_ms = time.time_ns() // 1_000_000
    orders = [await client.create([Item("Pen", 1, 1.0)]) for _ in range(3)]
    after_ms = time.time_ns() // 1_000_000
    database = open_database(server.config.db)
    try:
        keys = dict(database.execute_sql('SELECT order_id, "key" FROM idempotency_key').fetchall())
    finally:
        database.close()
    sent = [uuid.UUID(keys[order.id]) for order in orders]
    assert [key.version for key in sent] == [7, 7, 7]
    assert len(set(sent)) == 3
    unix_ms = [key.int >> 80 for key in sent]
    assert before_ms <= unix_ms[0] <= unix_ms[1] <= unix_ms[2] <= after_ms


# --- the error family -----------------------------------------------------------------------------


async def test_errors_are_the_orders_error_family_with_the_status_code(server, client):
    order = await client.create([Item("Laptop", 1, 1000.0)], request_id="same-key")

    cases = [
        (NotFound, "NOT_FOUND", client.get(str(uuid.uuid4()))),
        (InvalidArgument, "INVALID_ARGUMENT", client.get("not-a-uuid")),
        (InvalidArgument, "INVALID_ARGUMENT", client.create([])),
        (FailedPrecondition, "FAILED_PRECONDITION", client.update_status(order.id, OrderStatus.DELIVERED)),
        (Aborted, "ABORTED", client.update_status(order.id, OrderStatus.CONFIRMED, expected_version=7)),
        (Aborted, "ABORTED", client.cancel(order.id, expected_version=2)),
        (AlreadyExists, "ALREADY_EXISTS", client.create([Item("Phone", 1, 500.0)], request_id="same-key")),
    ]
    for cls, code, call in cases:
        with pytest.raises(cls) as caught:
            await asyncio.wait_for(call, 10)
        error = caught.value
        assert isinstance(error, OrderError)
        assert error.code == code
        assert error.message and str(error) == error.message

    async def first_update() -> StatusUpdate:
        async for update in client.watch(after_sequence=10**6):
            return update
        raise AssertionError("the watch ended")

    with pytest.raises(OutOfRange) as caught:
        await asyncio.wait_for(first_update(), 10)
    assert caught.value.code == "OUT_OF_RANGE"

    with pytest.raises(InvalidArgument):
        await asyncio.wait_for(first_update_of(client.watch(["nope"])), 10)

    # nothing above changed the order
    assert await client.get(order.id) == order


async def first_update_of(updates: AsyncIterator[StatusUpdate]) -> StatusUpdate:
    async for update in updates:
        return update
    raise AssertionError("the watch ended")


async def test_a_call_past_its_deadline_raises_deadline_exceeded(server, client):
    """A slow server is not an unreachable one: the error says DEADLINE_EXCEEDED, not UNAVAILABLE."""
    release = threading.Event()
    blocked = asyncio.ensure_future(server.storage.write(release.wait, 10))  # hold the writer thread
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            await client.create([Item("x", 1, 1.0)], timeout=0.3)
        assert caught.value.code == "DEADLINE_EXCEEDED"
        assert time.monotonic() - started < 2
    finally:
        release.set()
        await blocked


async def test_nothing_listening_is_unavailable_after_retries_within_the_timeout():
    port = free_port()
    retry = RetryPolicy(attempts=4, initial_backoff=0.05, max_backoff=0.2)
    async with OrderClient(f"127.0.0.1:{port}", timeout=3, retry=retry) as client:
        attempts = 0
        get_order = client._stubs[0].get_order

        async def counting(*args, **kwargs):
            nonlocal attempts
            attempts += 1
            return await get_order(*args, **kwargs)

        client._stubs[0].get_order = counting
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await asyncio.wait_for(client.get(str(uuid.uuid4())), 10)
        elapsed = time.monotonic() - started
        assert caught.value.code == "UNAVAILABLE"
        assert attempts == 4, "reads are retried, up to the policy's attempts"
        assert elapsed < 3

        # a status change with expected_version is not safe to repeat, but a refused connection proves it
        # was never sent: retried as well
        attempts = 0
        update = client._stubs[0].update_order_status

        async def counting_update(*args, **kwargs):
            nonlocal attempts
            attempts += 1
            return await update(*args, **kwargs)

        client._stubs[0].update_order_status = counting_update
        with pytest.raises(Unavailable):
            await asyncio.wait_for(
                client.update_status(str(uuid.uuid4()), OrderStatus.CONFIRMED, expected_version=1), 10
            )
        assert attempts == 4


async def test_retries_stop_at_the_timeout():
    port = free_port()
    retry = RetryPolicy(attempts=1000, initial_backoff=0.05, max_backoff=0.1)
    async with OrderClient(f"127.0.0.1:{port}", timeout=0.8, retry=retry) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(client.get(str(uuid.uuid4())), 10)
        assert 0.5 < time.monotonic() - started < 1.5


async def test_a_retry_pause_overrun_by_a_loaded_machine_ends_with_the_error_not_a_deadline():
    """The pause before a retry fitted in the deadline, but the event loop woke up after it (here blocked by
    a callback for a second): the call ends with why it failed, not with an attempt that had no time."""
    port = free_port()  # nothing listens: every attempt is refused
    retry = RetryPolicy(attempts=1000, initial_backoff=0.1, max_backoff=0.1)
    async with OrderClient(f"127.0.0.1:{port}", timeout=0.5, retry=retry) as client:
        asyncio.get_running_loop().call_later(0.01, time.sleep, 1.0)  # during the first pause
        with pytest.raises(Unavailable, match="cannot reach the server"):
            await asyncio.wait_for(client.get(str(uuid.uuid4())), 10)


# --- across a server restart ----------------------------------------------------------------------


async def test_create_retried_across_a_restart_does_not_duplicate(tmp_path, database_url):
    server = ServerProcess(tmp_path, database_url)
    await server.start()
    retrying: list[asyncio.Task] = []
    try:
        async with OrderClient(server.target, timeout=30, retry=FAST_RETRY) as client:
            items = [Item("Laptop", 1, 1000.0), Item("Mouse", 2, 25.0)]
            first = await client.create(items, request_id="order-1")

            assert await server.stop() == 0
            calls = 0
            create_order = client._stubs[0].create_order

            async def counting(*args, **kwargs):
                nonlocal calls
                calls += 1
                return await create_order(*args, **kwargs)

            client._stubs[0].create_order = counting
            again = asyncio.create_task(client.create(items, request_id="order-1"))
            new = asyncio.create_task(client.create([Item("Desk", 1, 300.0)], request_id="order-2"))
            retrying += [again, new]
            await asyncio.sleep(0.5)
            assert not again.done() and not new.done(), "the creates should be retrying while the server is down"
            assert calls > 2
            await server.start()
            again_order, new_order = await asyncio.wait_for(asyncio.gather(again, new), 20)

            assert again_order == first, "the retry returns the original order, timestamps included"
            assert new_order.id != first.id
            # and once more, now that the server is up: still no new order
            assert (await client.create([Item("Desk", 1, 300.0)], request_id="order-2")) == new_order
            listed = [o async for o in client.list()]
            assert [o.id for o in listed] == [first.id, new_order.id]
    finally:
        for task in retrying:
            task.cancel()
        await asyncio.gather(*retrying, return_exceptions=True)
        await server.kill()


async def test_watch_resumes_across_a_restart_without_gap_or_duplicate(tmp_path, database_url):
    server = ServerProcess(tmp_path, database_url)
    await server.start()
    watcher = OrderClient(server.target, timeout=10, retry=FAST_RETRY)
    writer = OrderClient(server.target, timeout=20, retry=FAST_RETRY)
    received: list[StatusUpdate] = []
    arrived = asyncio.Event()

    async def watch() -> None:
        async for update in watcher.watch(after_sequence=0):
            received.append(update)
            arrived.set()

    async def wait_for_sequence(sequence: int) -> None:
        async def wait() -> None:
            while not received or received[-1].sequence < sequence:
                if watching.done():
                    raise AssertionError(f"the watch ended: {watching!r}; got {[u.sequence for u in received]}")
                arrived.clear()
                waiter = asyncio.ensure_future(arrived.wait())
                try:
                    await asyncio.wait({watching, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()

        try:
            await asyncio.wait_for(wait(), 20)
        except TimeoutError:
            raise AssertionError(f"waited for {sequence}, got {[u.sequence for u in received]}") from None

    async def changes(tag: str) -> None:
        orders = [await writer.create([Item(f"{tag} {i}", 1, 1.0)]) for i in range(4)]
        for order in orders[:3]:
            await writer.update_status(order.id, OrderStatus.CONFIRMED)
        await writer.cancel(orders[0].id)

    watching = asyncio.create_task(watch())
    try:
        await changes("before")  # 8 events
        await wait_for_sequence(8)

        assert await server.stop() == 0
        await asyncio.sleep(0.3)  # the watch is now reconnecting
        assert not watching.done(), f"the watch gave up: {watching}"
        await server.start()
        await changes("after")  # 8 more, some of them before the watch is back
        await wait_for_sequence(16)
        await changes("later")  # and live again
        await wait_for_sequence(24)
        await asyncio.sleep(0.2)

        sequences = [u.sequence for u in received]
        assert sequences == list(range(1, 25)), sequences

        # exactly the log, as replayed by a fresh watch
        replay = []
        async for update in writer.watch(after_sequence=0, reconnect=False):
            replay.append(update)
            if update.sequence == 24:
                break
        assert received == replay
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        watcher.close()
        writer.close()
        await server.kill()


async def test_a_watch_quiet_for_longer_than_give_up_after_still_resumes_after_a_restart(tmp_path, database_url):
    """``give_up_after`` counts failed attempts in a row, not the quiet before them."""
    server = ServerProcess(tmp_path, database_url)
    await server.start()
    try:
        async with OrderClient(server.target, timeout=20, retry=FAST_RETRY) as client:
            first = await client.create([Item("Book", 1, 10.0)])
            # give_up_after: longer than the restart's outage (a new interpreter starting: 1-2 s on a slow
            # machine), shorter than the quiet before it
            updates = client.watch(after_sequence=0, give_up_after=4.0)
            assert (await asyncio.wait_for(updates.__anext__(), 10)).order_id == first.id
            next_update = asyncio.ensure_future(updates.__anext__())
            await asyncio.sleep(4.5)  # quiet for longer than give_up_after
            assert await server.stop() == 0
            await server.start()
            second = await client.create([Item("Pen", 1, 1.0)])
            assert (await asyncio.wait_for(next_update, 10)).order_id == second.id
            await updates.aclose()
    finally:
        await server.kill()


class FreezingProxy:
    """A TCP proxy in front of a server; :meth:`freeze` makes the connections open now carry nothing more
    in either direction while staying open (a peer that lost power, a NAT that dropped the flow).
    ``download_rate``: bytes a second it passes from the server to the client (None: as fast as it can)."""

    def __init__(self, port: int, *, download_rate: int | None = None) -> None:
        self._port = port
        self._download_rate = download_rate
        self._frozen: list[asyncio.Event] = []
        self._connections: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self.drop()

    def freeze(self) -> None:
        for frozen in self._frozen:
            frozen.set()

    async def drop(self) -> None:
        """Close the connections open now, both ways (a proxy or a server that crashed)."""
        for connection in self._connections:
            connection.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        self._connections.clear()

    async def _connect(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._connections.add(asyncio.current_task())  # type: ignore[arg-type]
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._port)
        frozen = asyncio.Event()
        self._frozen.append(frozen)
        pipes = [
            self._pipe(client_reader, server_writer, frozen),
            self._pipe(server_reader, client_writer, frozen, self._download_rate),
        ]
        try:
            await asyncio.gather(*pipes)
        finally:
            client_writer.close()
            server_writer.close()

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frozen: asyncio.Event, rate: int | None = None
    ) -> None:
        chunk = 65536 if rate is None else max(1, rate // 20)
        while data := await reader.read(chunk):
            if frozen.is_set():
                await asyncio.Future()  # never again, and never closed: only the other side's timeout helps
            writer.write(data)
            if rate is not None:
                await writer.drain()
                await asyncio.sleep(len(data) / rate)


async def test_a_watch_with_heartbeats_resumes_when_its_connection_goes_silent(server, client):
    """Three heartbeat intervals without a message: the connection is taken as lost, and the watch resumes
    on a new one after the last sequence it saw."""
    order = await client.create([Item("Book", 1, 10.0)])
    proxy = FreezingProxy(server.port)
    async with proxy as target, OrderClient(target, keepalive=None) as watcher:  # heartbeats alone
        updates = watcher.watch([order.id], after_sequence=0, heartbeat_seconds=1)
        assert (await asyncio.wait_for(updates.__anext__(), 10)).status == OrderStatus.PENDING
        proxy.freeze()
        await client.update_status(order.id, OrderStatus.CONFIRMED)
        started = time.monotonic()
        update = await asyncio.wait_for(updates.__anext__(), 10)
        assert (update.order_id, update.status) == (order.id, OrderStatus.CONFIRMED)
        assert 2.5 < time.monotonic() - started < 8  # after 3 silent heartbeat intervals, not before
        await updates.aclose()


async def test_a_call_to_a_hung_replica_moves_on_to_the_next_within_two_keepalive_intervals(server, no_gc):
    """A replica that keeps its connection open but answers nothing (here a frozen proxy in front of it) is
    noticed by an unanswered ping, not by the call's deadline: the call is retried on the next target."""
    proxy = FreezingProxy(server.port)
    direct = f"127.0.0.1:{server.port}"
    async with proxy as hung, OrderClient([hung, direct], keepalive=0.5, timeout=10) as client:
        order = await client.create([Item("Book", 1, 10.0)])  # connected through the proxy
        assert client.target == hung
        proxy.freeze()
        started = time.monotonic()
        assert (await client.get(order.id)).id == order.id
        assert time.monotonic() - started < 2.5  # a ping's interval and its wait, not the 10 s deadline
        assert client.target == direct


async def test_a_slow_link_is_not_taken_for_a_hung_server_while_bytes_keep_arriving(server, client, no_gc):
    """A watch replaying a backlog over a link too slow for it: the server's answers to the pings wait behind
    seconds of updates, but the updates arriving show that the server is alive."""
    created = await asyncio.gather(*(client.create([Item(f"Book {i}", 1, 10.0)]) for i in range(600)))
    proxy = FreezingProxy(server.port, download_rate=20_000)  # the replay takes 2 s or more
    async with proxy as slow, OrderClient(slow, keepalive=0.5) as watcher:
        updates = watcher.watch(after_sequence=0, reconnect=False)  # a dropped connection would raise
        started = time.monotonic()
        received = []
        async for update in updates:
            received.append(update.order_id)
            if len(received) == len(created):
                break
        await updates.aclose()
        assert time.monotonic() - started > 1.5  # three times the keepalive: the pings' answers waited
    assert sorted(received) == sorted(order.id for order in created)


async def test_a_server_that_hangs_in_the_middle_of_a_long_call_is_noticed_too(database_url, no_gc):
    """Pings go on for as long as a call lasts (grpclib by itself stops after two)."""
    async with running_server(database_url) as server:
        proxy = FreezingProxy(server.port)
        async with proxy as target, OrderClient(target, keepalive=0.5, timeout=10) as client:
            order = await client.create([Item("Book", 1, 10.0)])
            with write_lock(database_url):  # the change waits for the lock: a long call
                changing = asyncio.ensure_future(
                    client.update_status(order.id, OrderStatus.CONFIRMED, expected_version=order.version)
                )
                await asyncio.sleep(1.5)  # many pings answered meanwhile
                assert not changing.done()
                proxy.freeze()
                frozen_at = time.monotonic()
                # the change was under way, and takes effect once the lock is released: the message says it may
                with pytest.raises(
                    Unavailable,
                    match=r"lost mid-call \(nothing arrived for 0.5 s after a keepalive ping.*\); it may or may not",
                ):
                    await asyncio.wait_for(changing, 10)
                assert time.monotonic() - frozen_at < 2.5


async def test_a_call_whose_connection_is_lost_midway_may_have_taken_effect_and_gets_no_tls_hint(database_url):
    """The TLS hint is for a connection dropped before the server said anything (what a TLS server does with
    plaintext); a call lost on a connection that had carried replies may have reached the server."""
    async with running_server(database_url) as server:
        proxy = FreezingProxy(server.port)
        async with proxy as target, OrderClient(target, retry=RetryPolicy(attempts=1)) as client:
            order = await client.create([Item("Book", 1, 10.0)])
            with write_lock(database_url):  # the change waits for the lock: the call is under way
                changing = asyncio.ensure_future(
                    client.update_status(order.id, OrderStatus.CONFIRMED, expected_version=order.version)
                )
                await asyncio.sleep(0.5)
                assert not changing.done()
                await proxy.drop()
                with pytest.raises(Unavailable) as lost:
                    await asyncio.wait_for(changing, 10)
    assert "lost mid-call (Connection lost); it may or may not have had effect" in lost.value.message
    assert "TLS" not in lost.value.message


async def test_a_create_that_failed_carries_its_request_id_so_retrying_it_makes_no_second_order(database_url):
    async with running_server(database_url) as server, OrderClient(f"127.0.0.1:{server.port}") as client:
        with write_lock(database_url) as release:  # the create reaches the server and waits there
            with pytest.raises(DeadlineExceeded) as failed:
                await client.create([Item("Lamp", 1, 9.99)], timeout=0.5)
            release()
        assert failed.value.request_id is not None
        for _ in range(500):  # the first attempt, already under way on the server, commits once the lock is free
            created = [order.id async for order in client.list()]
            if created:
                break
            await asyncio.sleep(0.01)
        assert len(created) == 1
        retried = await client.create([Item("Lamp", 1, 9.99)], request_id=failed.value.request_id)
        assert retried.id == created[0]
        assert [order.id async for order in client.list()] == created


async def test_a_call_that_hears_nothing_before_its_deadline_moves_the_client_to_the_next_replica(server):
    """A deadline shorter than the keepalive ends each call before a ping can tell that the replica is hung
    (here: a socket that accepts connections and never answers, as a paused server's does); a call that
    heard nothing at all from it sends the next calls to the next replica, instead of every later call
    meeting the same end."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        hung, direct = f"127.0.0.1:{silent.getsockname()[1]}", f"127.0.0.1:{server.port}"
        async with OrderClient([hung, direct], timeout=0.3) as client:
            with pytest.raises(DeadlineExceeded):
                await client.create([Item("Book", 1, 10.0)])
            assert client.target == direct
            order = await client.create([Item("Book", 1, 10.0)])
            assert (await client.get(order.id)).id == order.id


async def test_a_call_out_of_time_on_a_replica_that_answers_pings_stays_with_it(database_url, no_gc):
    async with running_server(database_url) as server, running_server(database_url) as other:
        targets = [f"127.0.0.1:{server.port}", f"127.0.0.1:{other.port}"]
        async with OrderClient(targets, keepalive=0.2) as client:
            await client.create([Item("Lamp", 1, 9.99)])  # connected
            with write_lock(database_url) as release:  # the create reaches the server and waits there
                with pytest.raises(DeadlineExceeded):
                    await client.create([Item("Lamp", 1, 9.99)], timeout=0.5)
                release()
            assert client.target == targets[0]


async def test_a_call_not_safe_to_repeat_fails_with_unavailable_naming_the_unanswered_ping(server, no_gc):
    proxy = FreezingProxy(server.port)
    async with proxy as hung, OrderClient(hung, keepalive=0.5, timeout=10) as client:
        order = await client.create([Item("Book", 1, 10.0)])
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(Unavailable, match="nothing arrived for 0.5 s after a keepalive ping"):
            await client.update_status(order.id, OrderStatus.CONFIRMED, expected_version=order.version)
        assert time.monotonic() - started < 2.5


async def test_a_server_slow_but_alive_answers_pings_and_is_waited_for(database_url, no_gc):
    """A change held up for 1.5 s by another writer's lock spans several keepalive intervals; the server
    answers each ping meanwhile, so the connection stays up and the change (sent once: it carries an
    expected version) succeeds."""
    async with running_server(database_url) as server, OrderClient(
        f"127.0.0.1:{server.port}", keepalive=0.5, timeout=10
    ) as client:
        order = await client.create([Item("Book", 1, 10.0)])
        with write_lock(database_url) as release:
            changing = asyncio.ensure_future(
                client.update_status(order.id, OrderStatus.CONFIRMED, expected_version=order.version)
            )
            await asyncio.sleep(1.5)
            assert not changing.done()
            release()
            changed = await asyncio.wait_for(changing, 10)
        assert (changed.status, changed.version) == (OrderStatus.CONFIRMED, order.version + 1)


# --- arguments, deadlines and the client's life ---------------------------------------------------


def refusals(client: OrderClient, order_id: str) -> list[tuple[type[Exception], str, Callable[[], Awaitable]]]:
    """Calls whose arguments betterproto2 would have sent as something else (wrapped integers, None as 0)."""
    return [
        (InvalidArgument, "items[0].quantity", lambda: client.create([Item("Laptop", 2**32 + 1, 1000.0)])),
        (InvalidArgument, "status", lambda: client.update_status(order_id, 2**32 + 2)),
        (InvalidArgument, "expected_version", lambda: client.cancel(order_id, expected_version=2**64 + 1)),
        (InvalidArgument, "page_size", lambda: client.list_page(page_size=2**31)),
        (InvalidArgument, "after_sequence", lambda: first_update_of(client.watch(after_sequence=2**64))),
        (InvalidArgument, "items[0].product_name", lambda: client.create([Item("Lap\ud800top", 1, 1.0)])),
        (TypeError, "items[0].price", lambda: client.create([Item("Mouse", 1, None)])),  # type: ignore[arg-type]
        (TypeError, "items[0].quantity", lambda: client.create([Item("Mouse", 1.5, 1.0)])),  # type: ignore[arg-type]
        (TypeError, "(product_name, quantity, price)", lambda: client.create([("Mouse", 1)])),  # type: ignore[list-item]
        (TypeError, "status", lambda: client.update_status(order_id, "CONFIRMED")),  # type: ignore[arg-type]
        (TypeError, "id", lambda: client.get(uuid.UUID(order_id))),  # type: ignore[arg-type]
        (TypeError, "heartbeat_seconds", lambda: first_update_of(client.watch(heartbeat_seconds=True))),
        (InvalidArgument, "items[0].price", lambda: client.create([Item("Lamp", 1, 10**400)])),  # no double
        (InvalidArgument, "total_amount", lambda: client.create([Item("Lamp", 1, 1.0)], total_amount=-(10**400))),
        (InvalidArgument, "items[0].price", lambda: client.create([Item("Lamp", 1, decimal.Decimal("sNaN"))])),
        (TypeError, "not a str", lambda: first_update_of(client.watch(order_id))),  # not 36 one-character ids
        (TypeError, "give_up_after", lambda: first_update_of(client.watch(give_up_after="60"))),  # type: ignore[arg-type]
        (ValueError, "give_up_after", lambda: first_update_of(client.watch(give_up_after=-1))),
    ]


async def test_arguments_the_wire_would_change_are_refused_before_anything_is_sent(server, client):
    order = await client.create([Item("Book", 1, 10.0)])
    for error, field, call in refusals(client, order.id):
        with pytest.raises(error, match=re.escape(field)):
            await asyncio.wait_for(call(), 10)
    assert [o async for o in client.list()] == [order], "no order was created, changed or cancelled"


@pytest.mark.database_free
async def test_watch_and_list_check_their_arguments_when_called_not_when_first_iterated():
    async with OrderClient(f"127.0.0.1:{free_port()}") as client:  # nothing listens: nothing is sent
        with pytest.raises(TypeError, match="not a str"):
            client.watch(str(uuid.uuid4()))
        with pytest.raises(ValueError, match="give_up_after"):
            client.watch(give_up_after=-1)
        with pytest.raises(InvalidArgument, match="after_sequence"):
            client.watch(after_sequence=2**64)
        with pytest.raises(InvalidArgument, match="page_size"):
            client.list(page_size=2**31)
        with pytest.raises(ValueError, match="timeout"):
            client.list(timeout=-1)
    with pytest.raises(RuntimeError, match="closed"):
        client.watch()
    with pytest.raises(RuntimeError, match="closed"):
        client.list()


async def test_amounts_may_be_decimals(server, client):
    order = await client.create([Item("Book", 3, decimal.Decimal("19.99"))], total_amount=decimal.Decimal("59.97"))
    assert order.total_amount == 59.97


async def test_a_timeout_of_zero_fails_at_once_and_a_meaningless_one_up_front():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        async with OrderClient(f"127.0.0.1:{silent.getsockname()[1]}") as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await asyncio.wait_for(client.get(str(uuid.uuid4()), timeout=0), 10)
            assert time.monotonic() - started < 1
            for timeout in (-1, float("inf"), float("nan")):
                with pytest.raises(ValueError, match="timeout"):
                    await client.get(str(uuid.uuid4()), timeout=timeout)
    with pytest.raises(TypeError, match="timeout"):
        OrderClient("127.0.0.1:1", timeout="10")  # type: ignore[arg-type]
    for keepalive in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="keepalive"):
            OrderClient("127.0.0.1:1", keepalive=keepalive)
    with pytest.raises(TypeError, match="keepalive"):
        OrderClient("127.0.0.1:1", keepalive="2")  # type: ignore[arg-type]


@pytest.mark.database_free
def test_retry_and_tls_options_are_checked_when_the_client_is_made():
    with pytest.raises(TypeError, match="retry must be a RetryPolicy"):
        OrderClient("127.0.0.1:1", retry=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tls must be"):
        OrderClient("127.0.0.1:1", tls="yes")  # type: ignore[arg-type]
    for attempts, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="attempts"):
            RetryPolicy(attempts=attempts)  # type: ignore[arg-type]
    for backoff in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="initial_backoff"):
            RetryPolicy(initial_backoff=backoff)
        with pytest.raises(ValueError, match="max_backoff"):
            RetryPolicy(max_backoff=backoff)


class _SteadyRetry(RetryPolicy):
    """Retries after a fixed pause (RetryPolicy's is random)."""

    def delay(self, attempt: int) -> float:
        return 5.0


@pytest.mark.database_free
async def test_closing_the_client_during_a_retry_pause_fails_the_call_with_unavailable():
    async with OrderClient(f"127.0.0.1:{free_port()}", retry=_SteadyRetry(attempts=3)) as client:  # refused
        call = asyncio.create_task(client.get(str(uuid.uuid4())))
        await asyncio.sleep(0.3)  # the first attempt is refused at once; then the 5 s pause
        assert not call.done()
        client.close()
        with pytest.raises(Unavailable, match="closed"):
            await asyncio.wait_for(call, 2)


async def test_closing_a_watch_frees_its_slot_on_the_server_before_the_close_returns():
    async with (
        running_server(max_streams_per_connection=2) as server,
        OrderClient(f"127.0.0.1:{server.port}") as client,
    ):
        order = await client.create([Item("Lamp", 1, 9.99)])
        watches = [client.watch([order.id], after_sequence=0) for _ in range(2)]  # one connection: its limit
        for watch in watches:
            assert (await anext(watch)).order_id == order.id
        for _ in range(20):
            await watches[0].aclose()
            watches[0] = client.watch([order.id], after_sequence=0)  # at once: no pause for the slot to free up
            assert (await anext(watches[0])).order_id == order.id
        for watch in watches:
            await watch.aclose()


@pytest.mark.database_free
def test_a_client_closed_after_its_event_loop_ended_does_not_raise():
    """A client may be made outside an event loop; closing it after ``asyncio.run`` returned is harmless."""
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        client = OrderClient(f"127.0.0.1:{silent.getsockname()[1]}", keepalive=None)

        async def call() -> None:
            with pytest.raises(DeadlineExceeded):
                await client.get(str(uuid.uuid4()), timeout=0.2)

        asyncio.run(call())  # its connection stays open
        client.close()
        assert client.closed


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
async def test_closing_while_a_call_and_a_watch_are_still_connecting_ends_both_and_their_connection(server, steps):
    """The first call opens the connection; a close ``steps`` event-loop steps later, while that is under way,
    fails the call and ends the watch, rather than leave them running on a connection nobody closes."""
    client = OrderClient(f"127.0.0.1:{server.port}")
    updates: list[StatusUpdate] = []

    async def watch() -> None:
        async for update in client.watch(after_sequence=0, heartbeat_seconds=1, heartbeats=True):
            updates.append(update)

    call = asyncio.create_task(client.get(str(uuid.uuid4())))  # NOT_FOUND, should it reach the server
    watching = asyncio.create_task(watch())
    for _ in range(steps):
        await asyncio.sleep(0)
    client.close()
    with pytest.raises(Unavailable, match="the client was closed while the call was in flight"):
        await asyncio.wait_for(call, 5)
    await asyncio.wait_for(watching, 5)  # ended, without an error
    assert updates == []
    await eventually(lambda: len(server._connections) == 0, "the server to see the connection closed")


async def test_closing_ends_watches_fails_calls_in_flight_and_refuses_new_ones(server):
    client = OrderClient(f"127.0.0.1:{server.port}", timeout=10, retry=FAST_RETRY)
    order = await client.create([Item("Book", 1, 10.0)])
    seen: list[int] = []

    async def watch() -> None:
        async for update in client.watch(after_sequence=0):
            seen.append(update.sequence)

    watching = asyncio.create_task(watch())
    release = threading.Event()
    blocked = asyncio.ensure_future(server.storage.write(release.wait, 10))  # holds the writer
    in_flight = asyncio.create_task(client.update_status(order.id, OrderStatus.CONFIRMED))
    try:
        while not seen:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        client.close()
        await asyncio.wait_for(watching, 5)  # the watch ends, without an error
        with pytest.raises(Unavailable, match="closed"):
            await asyncio.wait_for(in_flight, 5)  # not retried on a new connection
        assert time.monotonic() - started < 1
    finally:
        release.set()
        await blocked
    assert client.closed
    client.close()  # again: nothing happens
    with pytest.raises(RuntimeError, match="closed"):
        await client.get(order.id)
    with pytest.raises(RuntimeError, match="closed"):
        await first_update_of(client.watch())
    with pytest.raises(RuntimeError, match="closed"):
        async with client:
            pass


def test_a_client_made_outside_an_event_loop_works_in_the_first_loop_it_is_used_on(tmp_path, database_url):
    async def serve_and_create(client: OrderClient) -> str:
        server = ServerProcess(tmp_path, database_url, port=int(client.target.rpartition(":")[2]))
        await server.start()
        try:
            return (await client.create([Item("Book", 1, 10.0)])).id
        finally:
            assert await server.stop() == 0

    client = OrderClient(f"127.0.0.1:{free_port()}")  # at import time, say: no loop runs
    assert asyncio.run(serve_and_create(client))
    with pytest.raises(RuntimeError, match="one per event loop"):
        asyncio.run(serve_and_create(client))  # pytest-asyncio gives each test a loop of its own


# --- several targets (replicas): failover ---------------------------------------------------------


class NeverBackOff(RetryPolicy):
    """A backoff longer than any call's deadline: a call that backs off before trying the next target fails."""

    def delay(self, attempt: int) -> float:
        return 3600.0


def count_calls(client: OrderClient, method: str) -> list[int]:
    """How many times each of ``client``'s targets gets a ``method`` call from now on."""
    counts = [0] * len(client.targets)
    for index, stub in enumerate(client._stubs):
        original = getattr(stub, method)

        async def counting(*args, _index=index, _original=original, **kwargs):
            counts[_index] += 1
            return await _original(*args, **kwargs)

        setattr(stub, method, counting)
    return counts


def dead_target() -> str:
    return f"127.0.0.1:{free_port()}"


async def test_a_retryable_call_moves_on_to_the_next_target_at_once(server):
    live = f"127.0.0.1:{server.port}"
    first_dead, second_dead = dead_target(), dead_target()
    async with OrderClient([first_dead, second_dead, live], timeout=10, retry=NeverBackOff()) as client:
        assert client.targets == (first_dead, second_dead, live)
        assert client.target == first_dead
        creates, gets = count_calls(client, "create_order"), count_calls(client, "get_order")

        order = await client.create([Item("Laptop", 1, 1000.0)])
        assert creates == [1, 1, 1], "one attempt per dead target, without backing off, then the live one"
        assert client.target == live
        assert await client.get(order.id) == order
        assert gets == [0, 0, 1], "later calls go straight to the target that answered"
        update = await asyncio.wait_for(first_update_of(client.watch([order.id], after_sequence=0)), 10)
        assert (update.order_id, update.status) == (order.id, OrderStatus.PENDING)

    # every target down: one attempt each, then the backoff would pass the deadline, so UNAVAILABLE at once
    async with OrderClient(f"{first_dead},{second_dead}", timeout=10, retry=NeverBackOff()) as client:
        gets = count_calls(client, "get_order")
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await client.get(str(uuid.uuid4()))
        assert gets == [1, 1]
        assert time.monotonic() - started < 5


@contextlib.asynccontextmanager
async def dropping_target() -> AsyncIterator[str]:
    """A target that accepts connections and drops each once the client has sent something: a request
    that may or may not have reached a server."""

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    listener = await asyncio.start_server(drop, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    finally:
        listener.close()


async def test_a_call_ended_by_a_lost_connection_or_its_deadline_leaves_its_task_uncancelled():
    """grpclib ends such calls by cancelling the waiting task; the cancellation must not outlive the call,
    or asyncio.timeout, TaskGroup and asyncio.run's Ctrl-C handling misjudge the next one."""
    task = asyncio.current_task()
    assert task is not None
    async with dropping_target() as dropping, OrderClient(dropping, retry=RetryPolicy(attempts=1)) as client:
        with pytest.raises(Unavailable, match="Connection lost"):
            await client.get(str(uuid.uuid4()))
    assert task.cancelling() == 0
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        async with OrderClient(f"127.0.0.1:{silent.getsockname()[1]}", keepalive=None) as client:
            with pytest.raises(DeadlineExceeded):
                await client.get(str(uuid.uuid4()), timeout=0.2)
    assert task.cancelling() == 0
    with pytest.raises(TimeoutError):  # so a timeout of the caller's own still works
        async with asyncio.timeout(0.05):
            await asyncio.sleep(1)


async def test_a_target_closing_connections_unheard_without_serving_tls_is_an_outage_the_watch_moves_past(
    server, client
):
    """A connection closed before the server said anything is taken for a TLS server's refusal only once a TLS
    handshake with the target completes; one that speaks no TLS (a proxy whose backend is down) is an outage, and
    the watch moves on to the next target as for any other."""
    order = await client.create([Item("Book", 1, 10.0)])
    live = f"127.0.0.1:{server.port}"
    async with dropping_target() as dropping, OrderClient([dropping, live], timeout=10) as watcher:
        update = await asyncio.wait_for(first_update_of(watcher.watch([order.id], after_sequence=0)), 10)
        assert (update.order_id, update.status) == (order.id, OrderStatus.PENDING)
        assert watcher.target == live


async def test_a_change_with_expected_version_is_resent_only_if_it_never_left(server, client):
    order = await client.create([Item("Laptop", 1, 1000.0)])
    live = f"127.0.0.1:{server.port}"
    async with OrderClient([dead_target(), live], timeout=10, retry=FAST_RETRY) as failover:
        updates = count_calls(failover, "update_order_status")
        confirmed = await failover.update_status(order.id, OrderStatus.CONFIRMED, expected_version=1)
        assert updates == [1, 1], "the first target refused the connection: sent to the next one"
        assert (confirmed.status, confirmed.version) == (OrderStatus.CONFIRMED, 2)
    order = await client.create([Item("Laptop", 1, 1000.0)])
    async with dropping_target() as dropping, OrderClient([dropping, live], timeout=10, retry=FAST_RETRY) as failover:
        updates = count_calls(failover, "update_order_status")
        with pytest.raises(Unavailable):
            await failover.update_status(order.id, OrderStatus.CONFIRMED, expected_version=1)
        assert updates == [1, 0], "not retried, on this target or another"
        assert failover.target == live, "but the next call goes to the next target"
        assert await failover.get(order.id) == order, "nothing changed"
        confirmed = await failover.update_status(order.id, OrderStatus.CONFIRMED, expected_version=1)
        assert (confirmed.status, confirmed.version) == (OrderStatus.CONFIRMED, 2)
        assert updates == [1, 1]

    async with dropping_target() as dropping, OrderClient([dropping, live], timeout=10, retry=FAST_RETRY) as failover:
        cancels = count_calls(failover, "cancel_order")
        with pytest.raises(Unavailable):
            await failover.cancel(order.id, expected_version=2)
        assert cancels == [1, 0]
        assert await failover.get(order.id) == confirmed


@pytest.mark.database_free
@pytest.mark.parametrize(
    "targets",
    [
        "",
        ",",
        "a:1,",
        "a:1,,b:2",
        "a:1;b:2",
        "a:1 b:2",
        "a:1,b",
        "a:1,b:0",
        "a:1,b:65536",
        "a:1,a:1",
        "a:1, a:1",
        [],
        ["a:1", ""],
        ["a:1", "b:2,c:3"],
        "a:\u00b2",  # a digit, not an ASCII one
        "::1:5",  # IPv6 without its brackets: [::1]:5
    ],
)
def test_invalid_target_lists_are_refused_up_front(targets):
    with pytest.raises(ValueError, match="target"):
        OrderClient(targets)


@pytest.mark.database_free
@pytest.mark.parametrize("targets", [["a:1", 2], ("a:1", None), b"a:1"])
def test_targets_of_the_wrong_type_are_a_type_error(targets):
    with pytest.raises(TypeError, match="targets must be a str or a sequence of str"):
        OrderClient(targets)


@pytest.mark.database_free
async def test_target_lists_as_a_string_or_a_sequence():
    for given in ("a:1, b:2,[::1]:3", ["a:1", " b:2", "[::1]:3"], ("a:1", "b:2", "[::1]:3")):
        async with OrderClient(given) as client:
            assert client.targets == ("a:1", "b:2", "[::1]:3")
            assert client.target == "a:1"
    async with OrderClient("localhost:50051") as client:
        assert client.targets == ("localhost:50051",) and client.target == "localhost:50051"


async def test_cli_target_takes_a_comma_separated_list(server, client):
    import json
    import os
    import sys

    order = await client.create([Item("Desk", 1, 300.0)])
    targets = f"{dead_target()},127.0.0.1:{server.port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orders", "get", order.id, "--json", "--target", targets,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    assert json.loads(stdout)["id"] == order.id

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orders", "get", order.id, "--json",
        env={**os.environ, "ORDERS_TARGET": targets}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    assert json.loads(stdout)["id"] == order.id

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orders", "get", order.id, "--target", "127.0.0.1:1,,127.0.0.1:2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "--target" in stderr.decode() and "host:port" in stderr.decode()
