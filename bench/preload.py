"""Fill an orders SQLite database fast, before the server starts: the offline bulk path.

The schema comes from :meth:`orders.storage.Repository.migrate` (so it is exactly the server's); the
rows are then written with ``executemany`` in large transactions on a plain ``sqlite3`` connection
with ``synchronous=OFF`` and an in-memory rollback journal (safe only because nothing else uses the
file and a crash just means running the preload again). Each order gets 1–3 items and its creation
event (UNSPECIFIED → PENDING), exactly as CreateOrder would write them: ids are random version-4
UUIDs in canonical form, order keys and event sequences continue after whatever the file holds, and
creation times strictly increase with the key. The file is left in WAL mode, checkpointed.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peewee

from orders.storage import Repository

PENDING = 1
_PRODUCTS = ("Laptop", "Mouse", "Keyboard", "Monitor 27in", "USB-C cable", "Desk lamp", "Headphones", "Webcam")
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def new_uuids(count: int) -> list[str]:
    """``count`` random version-4 UUIDs in canonical lower-case form (what ``str(uuid.uuid4())`` gives)."""
    digits = os.urandom(16 * count).hex()
    ids = []
    for start in range(0, 32 * count, 32):
        h = digits[start : start + 32]
        ids.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}")
    return ids


@dataclass
class PreloadResult:
    """What a preload wrote."""

    path: Path
    orders: int  # orders written by this preload
    seconds: float
    first_key: int  # keys first_key .. first_key + orders - 1
    head_sequence: int  # the event log's head afterwards
    sample_ids: list[str] = field(default_factory=list)  # ids of an evenly spread sample of the orders
    bytes: int = 0  # database file size afterwards

    @property
    def last_key(self) -> int:
        """The key of the last order written."""
        return self.first_key + self.orders - 1


def preload(
    path: Path,
    orders: int,
    *,
    batch: int = 50_000,
    sample: int = 100_000,
    progress: Callable[[int, int], None] | None = None,
) -> PreloadResult:
    """Append ``orders`` PENDING orders (with items and creation events) to the SQLite file ``path``.

    ``sample``: how many of the new ids to return, evenly spread over them (all if fewer).
    ``progress(done, total)`` is called after each committed batch.
    """
    began = time.perf_counter()
    database = peewee.SqliteDatabase(str(path), pragmas={"journal_mode": "wal", "foreign_keys": 1})
    Repository(database).migrate()
    database.close()

    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=MEMORY")
        conn.execute("PRAGMA synchronous=OFF")  # offline preload only; the server always runs with FULL
        conn.execute("PRAGMA cache_size=-262144")  # 256 MiB: keeps the id indexes' pages in memory
        conn.execute("PRAGMA temp_store=MEMORY")
        first_key = (conn.execute('SELECT MAX("key") FROM "order"').fetchone()[0] or 0) + 1
        first_sequence = (conn.execute("SELECT MAX(sequence) FROM status_event").fetchone()[0] or 0) + 1
        last_time = conn.execute('SELECT MAX(create_time_us) FROM "order"').fetchone()[0] or 0
        now_us = time.time_ns() // 1000
        base_time = max(now_us - orders, last_time + 1)  # one microsecond apart, ending about now
        stride = max(1, orders // sample) if sample else 0
        sample_ids: list[str] = []
        done = 0
        while done < orders:
            n = min(batch, orders - done)
            order_ids = new_uuids(n)
            item_counts = [1 + (done + i) % 3 for i in range(n)]
            item_ids = new_uuids(sum(item_counts))
            order_rows = []
            item_rows = []
            event_rows = []
            next_item = 0
            for i in range(n):
                number = done + i
                key = first_key + number
                at = base_time + number
                total = 0
                for position in range(item_counts[i]):
                    quantity = 1 + (number + position) % 5
                    price = 100 + (number * 7919 + position * 104729) % 200_000
                    total += quantity * price
                    product = _PRODUCTS[(number + position) % len(_PRODUCTS)]
                    item_rows.append((key, position, item_ids[next_item], product, quantity, price))
                    next_item += 1
                order_rows.append((key, order_ids[i], PENDING, total, "USD", 1, at, at))
                event_rows.append((first_sequence + number, order_ids[i], None, PENDING, at))
                if stride and number % stride == 0 and len(sample_ids) < sample:
                    sample_ids.append(order_ids[i])
            conn.execute("BEGIN")
            conn.executemany(
                'INSERT INTO "order" ("key", id, status, total_cents, currency_code, version, create_time_us, '
                "update_time_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                order_rows,
            )
            conn.executemany(
                "INSERT INTO order_item (order_key, position, id, product_name, quantity, price_cents) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                item_rows,
            )
            conn.executemany(
                "INSERT INTO status_event (sequence, order_id, previous, status, time_us) VALUES (?, ?, ?, ?, ?)",
                event_rows,
            )
            conn.execute("COMMIT")
            done += n
            if progress is not None:
                progress(done, orders)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("ANALYZE")
        head = conn.execute("SELECT MAX(sequence) FROM status_event").fetchone()[0] or 0
    finally:
        conn.close()
    return PreloadResult(
        path=path,
        orders=orders,
        seconds=time.perf_counter() - began,
        first_key=first_key,
        head_sequence=head,
        sample_ids=sample_ids,
        bytes=path.stat().st_size,
    )
