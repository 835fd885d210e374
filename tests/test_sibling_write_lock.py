"""Server processes sharing one SQLite file hand the write lock over through a lock file beside it."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import peewee
import pytest

from orders._proto.orders.v1 import Order
from orders.domain import NewItem, NewOrder
from orders.storage import SiblingWriteLock
from orders.storage_threads import Storage

pytestmark = pytest.mark.database_free  # about SQLite files only: run once

NEW = NewOrder((NewItem("widget", 1, 100),), 100, "USD")


@pytest.fixture
def held_by_another_process(tmp_path: Path) -> Iterator[int]:
    """The lock file of ``tmp_path/orders.db``, locked through a descriptor of its own, as a sibling would."""
    fd = os.open(tmp_path / "orders.db-writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield fd
    os.close(fd)


def test_the_lock_gives_up_like_a_busy_timeout(tmp_path: Path, held_by_another_process: int) -> None:
    lock = SiblingWriteLock(str(tmp_path / "orders.db-writer.lock"), timeout=0.05)
    with pytest.raises(peewee.OperationalError, match="database is locked"), lock:
        pass
    fcntl.flock(held_by_another_process, fcntl.LOCK_UN)
    with lock:  # free again: taken at once
        pass


async def test_a_write_waits_for_the_sibling_holding_the_lock(tmp_path: Path) -> None:
    storage = Storage(f"sqlite:///{tmp_path / 'orders.db'}")
    await storage.open()
    try:
        fd = os.open(tmp_path / "orders.db-writer.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        write = asyncio.ensure_future(storage.write(storage.repository.create_order, NEW, None))
        await asyncio.sleep(0.3)
        assert not write.done()  # waiting for the sibling
        os.close(fd)  # the sibling is done (or died): the lock is released
        order, _ = await asyncio.wait_for(write, 5)
        assert Order.parse(order).total_amount == 1.0
    finally:
        await storage.close()


def test_an_in_memory_database_needs_no_lock() -> None:
    assert not isinstance(SiblingWriteLock.beside(":memory:"), SiblingWriteLock)
