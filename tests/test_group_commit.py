"""Group commit: writes queued together share one transaction, yet each caller gets its own outcome.

The writer first runs a batch without savepoints and, should a write fail, rolls the batch back and runs
it again with a savepoint per write. These tests hold the writer on a gate so that the writes behind it
queue up and run as one batch, with a write among them that fails after writing part of its work.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from orders._proto.orders.v1 import Order
from orders.domain import NewItem, NewOrder
from orders.errors import AlreadyExists
from orders.storage_threads import Storage

NEW = NewOrder((NewItem("widget", 2, 1999),), 3998, "USD")
OTHER = NewOrder((NewItem("gadget", 1, 500),), 500, "USD")


class HalfWritten(Exception):
    """Raised by a write after it has inserted an order."""


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[Storage]:
    storage = Storage(database_url)
    await storage.open()
    yield storage
    await storage.close()


async def run_as_one_batch(storage: Storage, writes: list) -> list:
    """Queue ``writes`` (callables run on the writer) behind a gate, then release them together."""
    gate = threading.Event()
    held = asyncio.ensure_future(storage.write(gate.wait, 10))
    await asyncio.sleep(0.1)  # the writer is now waiting on the gate
    queued = [asyncio.ensure_future(storage.write(write)) for write in writes]
    await asyncio.sleep(0.1)
    gate.set()
    await held
    return await asyncio.gather(*queued, return_exceptions=True)


async def stored_request_ids(storage: Storage) -> list[str]:
    def read() -> list[str]:
        cursor = storage.repository.database.execute_sql('SELECT "key" FROM "idempotency_key" ORDER BY "key"')
        return [row[0] for row in cursor]

    return await storage.read(read)


async def stored_order_ids(storage: Storage) -> set[str]:
    def read() -> set[str]:
        return {row[0] for row in storage.repository.database.execute_sql('SELECT "id" FROM "order"')}

    return await storage.read(read)


async def test_a_write_failing_midway_rolls_back_only_itself(storage: Storage) -> None:
    repository = storage.repository

    def half_then_fail() -> None:
        with repository.write_transaction():
            repository.create_order(NEW, "half")
            raise HalfWritten

    writes = [lambda i=i: repository.create_order(NEW, f"before-{i}") for i in range(3)]
    writes.append(half_then_fail)
    writes += [lambda i=i: repository.create_order(NEW, f"after-{i}") for i in range(3)]

    outcomes = await run_as_one_batch(storage, writes)

    assert isinstance(outcomes[3], HalfWritten)
    created = [outcome[0] for i, outcome in enumerate(outcomes) if i != 3]
    assert await stored_order_ids(storage) == {Order.parse(encoded).id for encoded in created}
    committed_keys = [f"before-{i}" for i in range(3)] + [f"after-{i}" for i in range(3)]
    assert await stored_request_ids(storage) == sorted(committed_keys)


async def test_each_write_of_a_batch_gets_its_own_answer(storage: Storage) -> None:
    repository = storage.repository
    writes = [
        lambda: repository.create_order(NEW, "one"),
        lambda: repository.create_order(OTHER, "one"),  # reuse of the key for another request
        lambda: repository.create_order(NEW, "one"),  # a retry: the first order again
        lambda: repository.create_order(OTHER, None),
    ]

    first, reused, retried, plain = await run_as_one_batch(storage, writes)

    assert isinstance(reused, AlreadyExists)
    assert retried[0] == first[0] and retried[1] is None  # no second creation event
    assert first[1] is not None and plain[1] is not None
    assert plain[1].sequence == first[1].sequence + 1
    assert await stored_order_ids(storage) == {Order.parse(first[0]).id, Order.parse(plain[0]).id}
    assert await stored_request_ids(storage) == ["one"]
