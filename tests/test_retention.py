"""Event-log retention (``--retention-events N``): the log keeps the newest N events, sequence numbers
carry on across restarts, ``after_sequence`` older than the log is OUT_OF_RANGE, and a stream that falls
past the retained log ends with OUT_OF_RANGE instead of skipping events (DESIGN.md "Stream semantics").
Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator

import pytest
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from server_process import ServerProcess
from test_stream import (
    STREAM_METHOD,
    TAILER_TASK,
    as_tuple,
    create,
    event_log,
    event_tuple,
    eventually,
    open_watch,
    set_status,
    stream_error,
)

from orders import Item, OrderClient, OrderStatus, domain, storage
from orders._proto.orders.v1 import OrderServiceStub, OrderStatusStreamRequest, StatusUpdate
from orders.config import add_server_arguments, config_from_args
from orders.errors import OutOfRange
from orders.server import OrderServer
from orders.storage import Repository, open_database
from orders.testing import running_server, temporary_database

RETAINED = 5


@contextlib.asynccontextmanager
async def retaining(
    retention_events: int = RETAINED, db: str | None = None
) -> AsyncIterator[tuple[OrderServer, OrderServiceStub]]:
    async with running_server(db, retention_events=retention_events) as server:
        channel = Channel("127.0.0.1", server.port)
        try:
            yield server, OrderServiceStub(channel)
        finally:
            channel.close()


async def bounds(server: OrderServer) -> tuple[int, int]:
    return await server.storage.read(server.storage.repository.log_bounds)


async def twenty_events(stub: OrderServiceStub) -> list[str]:
    """10 orders, each created and confirmed: sequences 1 to 20."""
    ids = []
    for i in range(10):
        order = await create(stub, f"order {i}")
        await set_status(stub, order.id, OrderStatus.CONFIRMED)
        ids.append(order.id)
    return ids


def numbers_in(message: str | None) -> set[int]:
    return {int(n) for n in re.findall(r"\d+", message or "")}


def gate_the_tailer(server: OrderServer) -> tuple[asyncio.Event, list[int]]:
    """Make the feed's tailer wait at the returned gate before each read; the streams' own reads (catch-ups)
    go through and their ``after`` arguments are recorded in the returned list."""
    gate = asyncio.Event()
    stream_reads: list[int] = []
    read_events = server.feed._read_events

    async def gated(after, order_ids, limit):
        if asyncio.current_task().get_name() == TAILER_TASK:
            await gate.wait()
        else:
            stream_reads.append(after)
        return await read_events(after, order_ids, limit)

    server.feed._read_events = gated
    return gate, stream_reads


# --- what the log keeps --------------------------------------------------------------------------


async def test_the_log_keeps_exactly_the_newest_n_events_after_every_write():
    async with retaining() as (server, stub):
        head = 0
        for i in range(10):
            order = await create(stub, f"order {i}")
            head += 1
            assert await bounds(server) == (max(1, head - RETAINED + 1), head)
            await set_status(stub, order.id, OrderStatus.CONFIRMED)
            head += 1
            assert await bounds(server) == (max(1, head - RETAINED + 1), head)
        assert head == 20
        assert [e.sequence for e in await event_log(server)] == [16, 17, 18, 19, 20]


def _append(repository: Repository, n: int) -> None:
    new = domain.validate_new_order([("widget", 1, 1.0)], 0, "")
    for _ in range(n):
        repository.create_order(new, None)


def _count_and_bounds(repository: Repository) -> tuple[int, int, int]:
    first, head = repository.log_bounds()
    return len(repository.events_after(0, (), 10**9).events), first, head


def test_a_large_retention_prunes_in_batches_within_the_documented_slack(database_url):
    """N = 64: slack 64 // 16 = 4, so the log always holds N to N + 3 events and is pruned every 4th append."""
    repository = Repository(open_database(database_url), retention_events=64)
    repository.migrate()
    assert repository.prune_slack == 4
    sizes = set()
    for _ in range(200):
        _append(repository, 1)
        count, first, head = _count_and_bounds(repository)
        assert count == head - first + 1  # no holes
        if head >= 64:
            assert 64 <= count <= 64 + 3, (count, first, head)
            sizes.add(count)
    assert sizes == {64, 65, 66, 67}, "pruning should happen in batches of 4, not on every append"
    repository.database.close()


def test_a_lower_retention_on_an_existing_log_trims_it_a_batch_per_append(database_url, monkeypatch):
    monkeypatch.setattr(storage, "PRUNE_BATCH_MAX", 10)
    url = database_url
    keep_all = Repository(open_database(url))
    keep_all.migrate()
    _append(keep_all, 40)
    keep_all.database.close()

    repository = Repository(open_database(url), retention_events=3)
    assert _count_and_bounds(repository) == (40, 1, 40), "nothing is pruned before the next write"
    firsts = []
    for _ in range(5):
        _append(repository, 1)
        firsts.append(repository.log_bounds()[0])
    # at most 10 deleted per write, until only the newest 3 are left
    assert firsts == [11, 21, 31, 41, 43], firsts
    assert _count_and_bounds(repository) == (3, 43, 45)
    repository.database.close()


# --- after_sequence against the retained log -----------------------------------------------------


async def test_after_sequence_older_than_the_retained_log_is_out_of_range_and_says_where_it_starts():
    async with retaining() as (server, stub):
        await twenty_events(stub)
        first, head = await bounds(server)
        assert (first, head) == (16, 20)
        for after in (0, 1, first - 2):
            error = await stream_error(stub, OrderStatusStreamRequest(after_sequence=after))
            assert error.status == Status.OUT_OF_RANGE, error
            assert {first, head, first - 1} <= numbers_in(error.message), error.message
        assert server.feed.watcher_count == 0


async def test_after_sequence_first_minus_one_replays_exactly_the_retained_events_then_live():
    async with retaining() as (server, stub):
        await twenty_events(stub)
        first, head = await bounds(server)
        retained = [event_tuple(e) for e in await event_log(server)]
        watch = await open_watch(server, stub, OrderStatusStreamRequest(after_sequence=first - 1))
        try:
            await watch.wait_for_sequence(head)
            live = await create(stub, "live")
            await watch.wait_for_sequence(head + 1)
            await asyncio.sleep(0.1)  # anything extra would arrive now
            assert [u.sequence for u in watch.updates] == list(range(first, head + 2))
            assert [as_tuple(u) for u in watch.updates] == retained + [
                event_tuple(e) for e in await event_log(server, head)
            ]
            assert watch.updates[-1].order_id == live.id
            assert await bounds(server) == (first + 1, head + 1)
        finally:
            await watch.close()


async def test_the_client_library_reports_out_of_range_and_does_not_retry_it():
    async with retaining() as (server, stub):
        await twenty_events(stub)
        async with OrderClient(f"127.0.0.1:{server.port}") as client:

            async def first_update() -> None:
                async for _ in client.watch(after_sequence=3):
                    raise AssertionError("the watch sent an update")

            with pytest.raises(OutOfRange) as caught:
                await asyncio.wait_for(first_update(), 10)
        assert {16, 20} <= numbers_in(caught.value.message), caught.value.message


async def test_a_consumer_that_saves_heartbeat_sequences_resumes_inside_the_log_while_its_order_is_quiet():
    async with retaining() as (server, stub), OrderClient(f"127.0.0.1:{server.port}") as client:
        quiet = await create(stub, "quiet")  # sequence 1
        updates = client.watch([quiet.id], after_sequence=0, heartbeat_seconds=1, heartbeats=True)
        [created] = await take(updates, 1)
        assert (created.sequence, created.order_id) == (1, quiet.id)
        await twenty_events(stub)  # other orders' events 2 to 21: the log keeps 17 to 21

        async def heartbeat_at_the_head() -> StatusUpdate:
            async for update in updates:
                assert update.order_id == "", update  # heartbeats only: nothing else changes the quiet order
                if update.sequence == 21:
                    return update
            raise AssertionError("the watch ended")

        heartbeat = await asyncio.wait_for(heartbeat_at_the_head(), 10)
        await updates.aclose()
        with pytest.raises(OutOfRange):  # the last update's sequence has fallen out of the log ...
            await take(client.watch([quiet.id], after_sequence=created.sequence, reconnect=False), 1)
        resumed = client.watch([quiet.id], after_sequence=heartbeat.sequence)  # ... the heartbeat's has not
        await set_status(stub, quiet.id, OrderStatus.CONFIRMED)
        [confirmed] = await take(resumed, 1)
        assert (confirmed.sequence, confirmed.order_id, confirmed.status) == (22, quiet.id, OrderStatus.CONFIRMED)


# --- restarts: numbering never restarts ----------------------------------------------------------


@pytest.mark.parametrize("retained", [1, RETAINED])
async def test_sequence_numbers_carry_on_across_a_restart(database_url, retained):
    """The head is never pruned, so SQLite (MAX(rowid) + 1) cannot hand out a used sequence again; on
    PostgreSQL the BIGSERIAL's sequence carries on by itself, and must not be reset by the restart."""
    url = database_url
    async with retaining(retained, url) as (server, stub):
        await twenty_events(stub)
        assert await bounds(server) == (21 - retained, 20)
    async with retaining(retained, url) as (server, stub):
        assert await bounds(server) == (21 - retained, 20)
        watch = await open_watch(server, stub, OrderStatusStreamRequest(after_sequence=20))
        try:
            order = await create(stub, "after the restart")
            await watch.wait_for_sequence(21)
            assert [(u.sequence, u.order_id) for u in watch.updates] == [(21, order.id)]
        finally:
            await watch.close()
        assert await bounds(server) == (22 - retained, 21)
        assert [e.sequence for e in await event_log(server)] == list(range(22 - retained, 22))


async def take(updates: AsyncIterator[StatusUpdate], n: int) -> list[StatusUpdate]:
    """The first ``n`` updates of a watch, within 10 s."""

    async def collect() -> list[StatusUpdate]:
        taken: list[StatusUpdate] = []
        async for update in updates:
            taken.append(update)
            if len(taken) == n:
                return taken
        raise AssertionError(f"the watch ended after {taken}")

    return await asyncio.wait_for(collect(), 10)


async def test_the_flag_prunes_in_a_real_server_process_and_numbering_survives_a_restart(tmp_path, database_url):
    server = ServerProcess(tmp_path, database_url, args=["--retention-events", str(RETAINED)])
    await server.start()
    try:
        async with OrderClient(server.target, timeout=10) as client:
            for i in range(6):
                await client.create([Item(f"widget {i}", 1, 1.0)])
            assert await server.stop() == 0
            await server.start()
            order = await client.create([Item("after the restart", 1, 1.0)])
            # 7 events, the newest 5 kept: 3..7
            retained = await take(client.watch(after_sequence=2, reconnect=False), 5)
            assert [u.sequence for u in retained] == [3, 4, 5, 6, 7]
            assert (retained[-1].order_id, retained[-1].status) == (order.id, OrderStatus.PENDING)
            with pytest.raises(OutOfRange):
                await take(client.watch(after_sequence=1, reconnect=False), 1)
    finally:
        if server.running:
            await server.stop()


def test_a_negative_retention_is_refused_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    with pytest.raises(SystemExit) as exited:
        config_from_args(parser.parse_args(["--retention-events", "-1"]), parser)
    assert exited.value.code == 2  # a usage error
    assert "--retention-events must be 0 or more, not -1" in capsys.readouterr().err
    with temporary_database() as url, pytest.raises(ValueError):
        Repository(open_database(url), retention_events=-1)


# --- streams that fall past the retained log -----------------------------------------------------


UPDATES_PAST_A_64_KIB_WINDOW = 1500  # a framed StatusUpdate is about 60 bytes


async def test_a_slow_watcher_that_falls_past_the_retained_log_ends_with_out_of_range_not_a_gap(caplog):
    retained = 200  # far more than the tailer ever lags here: the watcher's own lag is what is tested
    async with retaining(retained) as (server, stub):
        server.feed._queue_capacity = 4
        server.feed._batch_window = 0  # waiting to batch would overflow a 4-entry queue by itself
        writers = [await create(stub, f"writer {i}") for i in range(3)]
        start_head = (await bounds(server))[1]

        # The smallest HTTP/2 windows: a client that does not read stalls the server's generator after
        # ~64 KiB (about a thousand updates), then the feed queue (capacity 4) overflows and the watcher
        # has to catch up later. Writing until the window must be full, not just until the watcher first
        # lags, keeps it from catching up (from a busy machine's slow writes) before the log is pruned.
        config = Configuration(http2_connection_window_size=2**16 - 1, http2_stream_window_size=2**16 - 1)
        channel = Channel("127.0.0.1", server.port, config=config)
        received: list[StatusUpdate] = []
        try:
            async with channel.request(
                STREAM_METHOD, Cardinality.UNARY_STREAM, OrderStatusStreamRequest, StatusUpdate
            ) as stream:
                await stream.send_message(OrderStatusStreamRequest(), end=True)
                await eventually(lambda: server.feed.watcher_count == 1, "the stream to register")
                [watcher] = server.feed._watchers
                rounds = 0
                with caplog.at_level(logging.WARNING, logger="orders.feed"):
                    while not watcher.lagged or rounds * 100 < UPDATES_PAST_A_64_KIB_WINDOW:
                        rounds += 1
                        assert rounds <= 40, "the watcher never fell behind"
                        orders = await asyncio.gather(*(create(stub, f"burst {rounds}.{i}") for i in range(50)))
                        await asyncio.gather(*(set_status(stub, o.id, OrderStatus.CONFIRMED) for o in orders))
                    # now write past the retained log: far more than `retained` events while it is behind
                    for _ in range(4):
                        orders = await asyncio.gather(*(create(stub, f"more {i}") for i in range(50)))
                        await asyncio.gather(*(set_status(stub, o.id, OrderStatus.CONFIRMED) for o in orders))
                    for order in writers:
                        await set_status(stub, order.id, OrderStatus.CANCELLED)
                first, head = await bounds(server)

                async def read_to_the_end() -> None:
                    while True:
                        update = await stream.recv_message()
                        if update is None:
                            await stream.recv_trailing_metadata()
                            raise AssertionError("the stream ended without an error")
                        received.append(update)

                with pytest.raises(GRPCError) as caught:
                    await asyncio.wait_for(read_to_the_end(), 20)
        finally:
            channel.close()
        assert not [r for r in caplog.records if "before this server published" in r.getMessage()], (
            "the tailer fell behind; this test is meant to exercise a lagging watcher"
        )

        error = caught.value
        assert error.status == Status.OUT_OF_RANGE, error
        sequences = [u.sequence for u in received]
        # everything it got is gap-free and correct; it ends where its gap would have begun
        assert sequences == list(range(start_head + 1, start_head + 1 + len(sequences))), sequences[:5]
        assert len(sequences) > 0
        needed = sequences[-1] + 1
        assert needed < first
        message = error.message or ""
        assert "fell behind the retained event log" in message, message
        assert f"needs sequence {needed}" in message, message
        assert f"starts at {first}" in message and f"after_sequence >= {first - 1}" in message, message
        assert "ListOrders" in message
        await eventually(lambda: server.feed.watcher_count == 0, "the server to drop the watcher")

        # the advice in the message works: resume from first - 1, gap-free to the head
        resumed = await open_watch(server, stub, OrderStatusStreamRequest(after_sequence=first - 1))
        try:
            await resumed.wait_for_sequence(head, timeout=10)
            assert [u.sequence for u in resumed.updates] == list(range(first, head + 1))
        finally:
            await resumed.close()


async def test_streams_end_with_out_of_range_when_retention_prunes_events_the_tailer_had_not_published(caplog):
    """The tailer itself can be outrun (retention smaller than a burst): streams that needed the pruned
    events end with OUT_OF_RANGE; a stream opened after them carries on."""
    async with retaining() as (server, stub):
        await create(stub, "before")
        before = await open_watch(server, stub, OrderStatusStreamRequest())
        filtered = await open_watch(server, stub, OrderStatusStreamRequest(order_ids=[domain.new_id()]))
        gate, _ = gate_the_tailer(server)
        try:
            await asyncio.sleep(0.4)  # the tailer's in-flight poll finishes; its next read waits at the gate
            old_head = server.feed.head
            for i in range(4):
                order = await create(stub, f"burst {i}")
                await set_status(stub, order.id, OrderStatus.CONFIRMED)
            first, head = await bounds(server)
            assert (first, head) == (old_head + 4, old_head + 8)
            after = await open_watch(server, stub, OrderStatusStreamRequest())  # live from the new head
            with caplog.at_level(logging.WARNING, logger="orders.feed"):
                gate.set()
                error = await before.ended(timeout=5)
                assert isinstance(error, GRPCError) and error.status == Status.OUT_OF_RANGE, repr(error)
                assert before.updates == [], "nothing may arrive across the gap"
                assert f"needs sequence {old_head + 1}" in (error.message or ""), error.message
                assert f"starts at {first}" in (error.message or ""), error.message
                # a filtered stream cannot know whether its orders had events in the pruned range
                error = await filtered.ended(timeout=5)
                assert isinstance(error, GRPCError) and error.status == Status.OUT_OF_RANGE, repr(error)
            assert any("before this server published" in r.getMessage() for r in caplog.records)

            live = await create(stub, "live")
            await after.wait_for_sequence(head + 1)
            assert [(u.sequence, u.order_id) for u in after.updates] == [(head + 1, live.id)]
            assert after.error is None
        finally:
            gate.set()
            for watch in (before, filtered, after):
                await watch.close()


async def test_a_prune_committed_right_after_a_catch_up_read_takes_nothing_the_stream_needs():
    """The catch-up read got every event after the stream's cursor; a commit that then prunes the oldest of
    them takes nothing the stream still needs, so it carries on: the log's start is judged as of that read."""
    async with retaining() as (server, stub):
        await twenty_events(stub)
        first, head = await bounds(server)
        read_events = server.feed._read_events
        pruned: list[tuple[int, int]] = []

        async def read_then_prune(after, order_ids, limit):
            page = await read_events(after, order_ids, limit)
            if after == first - 1 and not pruned:  # the stream's catch-up read: a commit lands just after it
                await create(stub, "pruning")
                pruned.append(await bounds(server))
            return page

        server.feed._read_events = read_then_prune
        watch = await open_watch(server, stub, OrderStatusStreamRequest(after_sequence=first - 1))
        try:
            await watch.wait_for_sequence(head + 1)
            assert pruned == [(first + 1, head + 1)], "the commit should have pruned the oldest event read"
            assert [u.sequence for u in watch.updates] == list(range(first, head + 2))
            assert watch.error is None
        finally:
            await watch.close()


async def test_a_filtered_watcher_whose_last_event_was_pruned_can_still_lag_and_catch_up():
    """Its last sent event is long gone from the log, but it missed nothing: no false OUT_OF_RANGE."""
    async with retaining() as (server, stub):
        server.feed._queue_capacity = 1
        order = await create(stub, "watched")
        watch = await open_watch(server, stub, OrderStatusStreamRequest(order_ids=[order.id], after_sequence=0))
        try:
            await watch.wait_for_sequence(1)
            for i in range(10):
                await create(stub, f"noise {i}")
            await eventually(lambda: server.feed.head == 11, "the tailer to publish the noise")
            assert (await bounds(server))[0] > 2, "the watcher's last event is pruned"
            gate, stream_reads = gate_the_tailer(server)
            await asyncio.sleep(0.4)  # the tailer's next read waits at the gate
            await set_status(stub, order.id, OrderStatus.CONFIRMED)
            await set_status(stub, order.id, OrderStatus.SHIPPED)
            gate.set()  # one page with 2 events for a queue of 1: it lags and catches up from the database
            await watch.wait_for_sequence(13)
            assert stream_reads == [11], "it should catch up from where its queue began, not from sequence 1"
            assert [(u.sequence, u.status) for u in watch.updates] == [
                (1, OrderStatus.PENDING),
                (12, OrderStatus.CONFIRMED),
                (13, OrderStatus.SHIPPED),
            ]
            assert watch.error is None
        finally:
            await watch.close()


async def test_a_lagging_watcher_still_inside_the_retained_log_catches_up_without_error():
    """Falling behind is only an error once the events it needs are gone."""
    async with retaining(50) as (server, stub):
        server.feed._queue_capacity = 2
        watch = await open_watch(server, stub, OrderStatusStreamRequest())
        gate, stream_reads = gate_the_tailer(server)
        try:
            await asyncio.sleep(0.4)
            orders = [await create(stub, f"order {i}") for i in range(10)]  # 10 in one page: it lags
            gate.set()
            await watch.wait_for_sequence(10)
            assert stream_reads, "the watcher never lagged; the test does not exercise catching up"
            await asyncio.sleep(0.1)
            assert [u.sequence for u in watch.updates] == list(range(1, 11))
            assert [u.order_id for u in watch.updates] == [o.id for o in orders]
            assert watch.error is None
        finally:
            gate.set()
            await watch.close()
