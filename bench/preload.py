"""Fill an orders database fast, before the server starts: the offline bulk path, SQLite or PostgreSQL.

The schema comes from :meth:`orders.storage.Repository.migrate` (so it is exactly the server's); the
rows are then written in large transactions over a plain DB-API connection (:mod:`bench.db`:
``executemany`` on SQLite with ``synchronous=OFF`` and an in-memory rollback journal, ``COPY`` on
PostgreSQL with ``synchronous_commit=off``; safe only because nothing else uses the database yet, and a
crash just means loading again). Each order gets 1–3 items, its encoded form and its creation event
(UNSPECIFIED → PENDING), exactly as CreateOrder would write them: ids are version-7 UUIDs of the
creation time, order keys and event sequences continue after whatever the database holds, and creation
times strictly increase with the key. Afterwards a SQLite file is back in WAL mode, checkpointed, and
PostgreSQL's BIGSERIAL sequences are moved past the explicit keys, so the server's own inserts continue
after them.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.db import HEAD_SQL, Row, connect, migrate
from orders.domain import Item, Order, Status, uuid7
from orders.wire import encode_order

_PRODUCTS = ("Laptop", "Mouse", "Keyboard", "Monitor 27in", "USB-C cable", "Desk lamp", "Headphones", "Webcam")
ORDER_COLUMNS = (
    "key", "id", "status", "total_cents", "currency_code", "version", "create_time_us", "update_time_us", "encoded"
)
ITEM_COLUMNS = ("order_key", "position", "id", "product_name", "quantity", "price_cents")
EVENT_COLUMNS = ("sequence", "order_id", "previous", "status", "time_us")


def new_ids(times_us: Sequence[int], rng: random.Random | None = None) -> list[str]:
    """Ids made at ``times_us`` (µs since the Unix epoch), as the server makes them: version-7 UUIDs in
    canonical lower-case form (see :func:`orders.domain.new_id`).

    Their random bits come from ``os.urandom``, or from ``rng`` for a repeatable sequence.
    """
    data = rng.randbytes(10 * len(times_us)) if rng is not None else os.urandom(10 * len(times_us))
    return [uuid7(at // 1000, data[10 * n : 10 * n + 10]) for n, at in enumerate(times_us)]


@dataclass
class Batch:
    """The rows of a run of consecutive orders, in column order (``*_COLUMNS``)."""

    orders: list[Row]
    items: list[Row]
    events: list[Row]


@dataclass(frozen=True)
class _Layout:
    """Where the new orders go: order number ``n`` (from 0) gets key ``first_key + n``, creation event
    ``first_sequence + n`` and creation time ``base_time + n`` (µs)."""

    first_key: int
    first_sequence: int
    base_time: int

    def batch(self, start: int, count: int, rng: random.Random | None) -> Batch:
        """The rows of orders ``start`` .. ``start + count - 1``."""
        times = [self.base_time + start + i for i in range(count)]
        order_ids = new_ids(times, rng)
        item_counts = [1 + (start + i) % 3 for i in range(count)]
        item_ids = iter(new_ids([at for at, items in zip(times, item_counts, strict=True) for _ in range(items)], rng))
        rows = Batch([], [], [])
        for i in range(count):
            number = start + i
            key = self.first_key + number
            at = times[i]
            items = []
            for position in range(item_counts[i]):
                quantity = 1 + (number + position) % 5
                price = 100 + (number * 7919 + position * 104729) % 200_000
                items.append(Item(next(item_ids), _PRODUCTS[(number + position) % len(_PRODUCTS)], quantity, price))
                rows.items.append((key, position, *items[-1]))
            total = sum(item.quantity * item.price_cents for item in items)
            order = Order(order_ids[i], tuple(items), total, "USD", Status.PENDING, 1, at, at)
            rows.orders.append((key, order.id, Status.PENDING, total, "USD", 1, at, at, encode_order(order)))
            rows.events.append((self.first_sequence + number, order_ids[i], None, Status.PENDING, at))
        return rows


@dataclass
class PreloadResult:
    """What a preload wrote."""

    url: str  # the database, as the server's ``--db``
    orders: int  # orders written by this preload
    seconds: float
    first_key: int  # keys first_key .. first_key + orders - 1
    head_sequence: int  # the event log's head afterwards
    sample_ids: list[str] = field(default_factory=list)  # ids of an evenly spread sample of the orders
    bytes: int = 0  # database size afterwards

    @property
    def last_key(self) -> int:
        """The key of the last order written."""
        return self.first_key + self.orders - 1


def preload(
    url: str,
    orders: int,
    *,
    batch: int = 50_000,
    sample: int = 100_000,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PreloadResult:
    """Append ``orders`` PENDING orders (with items and creation events) to the database at ``url``.

    ``url`` is a server ``--db`` URL (``sqlite:///…`` or ``postgresql://…``); the schema is created if
    missing. ``sample``: how many of the new ids to return, evenly spread over them (all if fewer).
    ``seed``: make the ids' random bits repeatable.
    ``progress(done, total)`` is called after each committed batch.
    """
    began = time.perf_counter()
    migrate(url)
    rng = random.Random(seed) if seed is not None else None
    with connect(url) as conn:
        conn.begin_bulk_load()
        last_time = int(conn.scalar('SELECT COALESCE(MAX(create_time_us), 0) FROM "order"'))
        layout = _Layout(
            first_key=int(conn.scalar('SELECT COALESCE(MAX("key"), 0) FROM "order"')) + 1,
            first_sequence=int(conn.scalar(HEAD_SQL)) + 1,
            base_time=max(time.time_ns() // 1000 - orders, last_time + 1),  # 1 µs apart, ending about now
        )
        stride = max(1, orders // sample) if sample else 0
        sample_ids: list[str] = []
        for start in range(0, orders, batch):
            rows = layout.batch(start, min(batch, orders - start), rng)
            with conn.transaction():
                conn.insert("order", ORDER_COLUMNS, rows.orders)
                conn.insert("order_item", ITEM_COLUMNS, rows.items)
                conn.insert("status_event", EVENT_COLUMNS, rows.events)
            if stride:
                sample_ids += [row[1] for row in rows.orders if (row[0] - layout.first_key) % stride == 0]
            if progress is not None:
                progress(start + len(rows.orders), orders)
        conn.end_bulk_load()
        head = int(conn.scalar(HEAD_SQL))
        size = conn.size()
    return PreloadResult(
        url=url,
        orders=orders,
        seconds=time.perf_counter() - began,
        first_key=layout.first_key,
        head_sequence=head,
        sample_ids=sample_ids[:sample],
        bytes=size,
    )
