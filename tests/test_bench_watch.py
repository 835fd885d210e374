"""The benchmark's watch scenario: who is owed which events, and watchers that each follow their own orders."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import pytest

from bench.db import event_log_head, events_per_order
from bench.watch import (
    WatcherSpec,
    WriterSpec,
    missed_events,
    owed_events,
    publish_final_head,
    run_watchers,
    run_writer,
    watch_filters,
)
from orders import Item, OrderClient
from orders.server import OrderServer


@pytest.mark.database_free
def test_each_watcher_gets_its_own_slice_of_the_orders() -> None:
    ids = [f"id{i}" for i in range(7)]
    assert watch_filters(ids, 3, 2) == [("id0", "id3"), ("id1", "id4"), ("id2", "id5")]  # dealt in turn
    assert watch_filters(ids, 3, 0) == []  # every watcher watches every order
    with pytest.raises(ValueError, match="3 watchers × 3 orders"):
        watch_filters(ids, 3, 3)


@pytest.mark.database_free
def test_a_watcher_is_owed_its_orders_events_or_every_event_without_a_filter() -> None:
    counts = collections.Counter({"a": 3, "b": 1, "c": 2})
    assert owed_events(counts, [("a", "b"), ("c", "unknown")], 2) == [4, 2]
    assert owed_events(counts, [], 3) == [6, 6, 6]
    assert missed_events([4, 2, 6], [4, 1, 0]) == 7
    assert missed_events([4], [4]) == 0


async def test_filtered_watchers_receive_exactly_their_orders_events(
    server: OrderServer, client: OrderClient, tmp_path: Path
) -> None:
    orders = [await client.create([Item("Widget", 1, 2.50)]) for _ in range(6)]
    filters = watch_filters([order.id for order in orders], 3, 2)
    start = event_log_head(server.config.db)
    now = time.monotonic()
    final_head = tmp_path / "final-head"
    watching = asyncio.create_task(
        run_watchers(
            WatcherSpec(
                host="127.0.0.1",
                port=server.port,
                watchers=3,
                streams_per_connection=2,
                after_sequence=start,
                write_from=now + 0.3,
                measure_from=now + 0.3,
                measure_to=now + 1.3,
                final_head_file=str(final_head),
                drain_timeout=10.0,
                order_ids=tuple(filters),
            )
        )
    )
    # The writer walks only the first two watchers' orders; once they are DELIVERED it creates orders
    # that nobody watches.
    written = await run_writer(
        WriterSpec(
            host="127.0.0.1",
            port=server.port,
            rate=20,
            order_ids=[*filters[0], *filters[1]],
            start=now + 0.3,
            stop=now + 1.3,
            measure_from=now + 0.3,
        )
    )
    head = event_log_head(server.config.db)
    publish_final_head(final_head, head)
    seen = await watching

    counts = events_per_order(server.config.db, start)
    owed = owed_events(counts, filters, 3)
    assert not written.errors and not seen.errors
    assert written.creates > 0 and sum(counts.values()) > sum(owed)  # unwatched orders' events exist
    assert owed[0] > 0 and owed[1] > 0 and owed[2] == 0
    assert seen.received_each == owed and missed_events(owed, seen.received_each) == 0
    assert seen.duplicates == 0
    assert seen.reached_each == [head, head, head]  # the idle third watcher caught up by its heartbeats
    assert seen.connections == 2
