"""Group commit: writes queued together share one transaction, yet each caller gets its own outcome.

The writer first runs a batch without savepoints and, should a write fail, rolls the batch back and runs
it again with a savepoint per write. Creates queued together run as one ``Repository.create_orders``
call, status changes as one ``Repository.change_statuses`` call (``Storage.write_together``). These
tests hold the writer on a gate so that the writes behind it queue up and run as one batch, with a
write among them that fails after writing part of its work. GetOrder reads queued together on the reader
thread likewise run as one ``Repository.get_orders`` call (``Storage.read_together``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import peewee
import pytest

from orders._proto.orders.v1 import Order
from orders.domain import IDEMPOTENCY_WINDOW_US, NewItem, NewOrder, Status
from orders.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound, Unavailable
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


async def run_as_one_batch(storage: Storage, writes: list, *, on_reader: bool = False) -> list:
    """Queue ``writes`` (callables run on the writer, or awaitables that queue their own) behind a gate,
    then release them together; ``on_reader``: the gate holds the reader thread instead."""
    gate = threading.Event()
    held = asyncio.ensure_future((storage.read if on_reader else storage.write)(gate.wait, 10))
    await asyncio.sleep(0.1)  # the thread is now waiting on the gate
    queued = [asyncio.ensure_future(w if asyncio.iscoroutine(w) else storage.write(w)) for w in writes]
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


async def test_creates_queued_together_run_as_one_call_yet_each_gets_its_own_answer(storage: Storage) -> None:
    repository = storage.repository
    calls: list[int] = []

    def create_orders(requests: list) -> list:
        calls.append(len(requests))
        return repository.create_orders(requests)

    requests = [(NEW, "one"), (OTHER, "one"), (NEW, "one"), (OTHER, None), (NEW, "two")]
    creates = [storage.write_together(create_orders, request) for request in requests]

    first, reused, retried, plain, second = await run_as_one_batch(storage, creates)

    assert calls == [5]
    assert isinstance(reused, AlreadyExists) and "'one'" in str(reused)
    assert retried[0] == first[0] and retried[1] is None  # the first order again, no second creation event
    events = [first[1], plain[1], second[1]]
    assert [event.sequence for event in events] == [first[1].sequence + i for i in range(3)]
    created = [Order.parse(outcome[0]) for outcome in (first, plain, second)]
    assert [event.order_id for event in events] == [order.id for order in created]
    assert [len(order.items) for order in created] == [1, 1, 1] and created[1].items[0].product_name == "gadget"
    assert await stored_order_ids(storage) == {order.id for order in created}
    assert await stored_request_ids(storage) == ["one", "two"]
    assert [await storage.read(repository.get_order, order.id) for order in created] == [first[0], plain[0], second[0]]


async def test_a_joint_create_that_fails_is_run_again_one_request_at_a_time(storage: Storage) -> None:
    repository = storage.repository
    calls: list[int] = []

    def create_orders_failing_on_bad(requests: list) -> list:
        calls.append(len(requests))
        outcomes = repository.create_orders([request for request in requests if request[1] != "bad"])
        if any(request[1] == "bad" for request in requests):
            raise HalfWritten
        return outcomes

    requests = [(NEW, "a"), (NEW, "bad"), (OTHER, "b")]
    creates = [storage.write_together(create_orders_failing_on_bad, request) for request in requests]

    a, bad, b = await run_as_one_batch(storage, creates)

    assert calls == [3, 1, 1, 1]  # together; then, rolled back, each in its own savepoint
    assert isinstance(bad, HalfWritten)
    assert await stored_order_ids(storage) == {Order.parse(a[0]).id, Order.parse(b[0]).id}
    assert await stored_request_ids(storage) == ["a", "b"]


async def test_an_expired_request_id_creates_a_new_order(storage: Storage) -> None:
    repository = storage.repository
    old, _ = await storage.write(repository.create_order, NEW, "reused")

    def age_the_key() -> None:
        repository.database.execute_sql(
            f'UPDATE "idempotency_key" SET "created_us" = "created_us" - {IDEMPOTENCY_WINDOW_US + 1}'
        )

    await storage.write(age_the_key)
    creates = [storage.write_together(repository.create_orders, request) for request in [(OTHER, "reused")] * 2]
    new, retried = await run_as_one_batch(storage, creates)

    assert new[1] is not None and retried == (new[0], None)
    assert Order.parse(new[0]).id != Order.parse(old).id
    assert await stored_order_ids(storage) == {Order.parse(old).id, Order.parse(new[0]).id}
    with pytest.raises(AlreadyExists):  # the key is the new order's now, for the window
        await storage.write(repository.create_order, NEW, "reused")


async def test_status_changes_queued_together_run_as_one_call_and_apply_in_turn(storage: Storage) -> None:
    repository = storage.repository
    (x, _), (y, _), (z, _) = [await storage.write(repository.create_order, NEW, None) for _ in range(3)]
    x_id, y_id, z_id = (Order.parse(encoded).id for encoded in (x, y, z))
    calls: list[int] = []

    def change_statuses(requests: list) -> list:
        calls.append(len(requests))
        return repository.change_statuses(requests)

    requests = [
        (x_id, Status.CONFIRMED, 1),
        (x_id, Status.SHIPPED, 2),  # sees the change before it
        (x_id, Status.DELIVERED, 2),  # stale: x is at version 3 by now
        (y_id, Status.DELIVERED, None),  # not allowed from PENDING
        ("00000000-0000-4000-8000-000000000000", Status.CONFIRMED, None),
        (x_id, Status.SHIPPED, None),  # the same status: the order as it is, no event
        (z_id, Status.CANCELLED, None),
    ]
    changes = [storage.write_together(change_statuses, request) for request in requests]

    confirmed, shipped, stale, forbidden, unknown, again, cancelled = await run_as_one_batch(storage, changes)

    assert calls == [7]
    assert isinstance(stale, Aborted) and "version 3" in str(stale)
    assert isinstance(forbidden, FailedPrecondition) and "PENDING to DELIVERED" in str(forbidden)
    assert isinstance(unknown, NotFound)
    assert again == (shipped[0], None)
    events = [confirmed[1], shipped[1], cancelled[1]]
    assert [(e.order_id, e.previous, e.status) for e in events] == [
        (x_id, Status.PENDING, Status.CONFIRMED),
        (x_id, Status.CONFIRMED, Status.SHIPPED),
        (z_id, Status.PENDING, Status.CANCELLED),
    ]
    assert [e.sequence for e in events] == [events[0].sequence + i for i in range(3)]
    assert [(Order.parse(o[0]).status, Order.parse(o[0]).version) for o in (confirmed, shipped, cancelled)] == [
        (Status.CONFIRMED, 2),
        (Status.SHIPPED, 3),
        (Status.CANCELLED, 2),
    ]
    stored = [await storage.read(repository.get_order, order_id) for order_id in (x_id, y_id, z_id)]
    assert stored == [shipped[0], y, cancelled[0]]


async def test_a_refused_request_alone_in_its_group_does_not_make_the_batch_run_again(storage: Storage) -> None:
    """A create, a status change the state machine refuses, another create: three groups of one call each.
    The refusal wrote nothing, so the batch commits in one pass; the writes were run again with savepoints
    (every call twice, and on PostgreSQL sequence numbers lost to the rollback) before."""
    repository = storage.repository
    (pending, _) = await storage.write(repository.create_order, NEW, None)
    calls: list[str] = []

    def create_orders(requests: list) -> list:
        calls.append("create")
        return repository.create_orders(requests)

    def change_statuses(requests: list) -> list:
        calls.append("change")
        return repository.change_statuses(requests)

    refused = (Order.parse(pending).id, Status.DELIVERED, None)  # not allowed from PENDING
    writes = [
        storage.write_together(create_orders, (NEW, None)),
        storage.write_together(change_statuses, refused),
        storage.write_together(create_orders, (OTHER, None)),
    ]

    first, forbidden, second = await run_as_one_batch(storage, writes)

    assert isinstance(forbidden, FailedPrecondition)
    assert calls == ["create", "change", "create"]
    assert second[1].sequence == first[1].sequence + 1


async def test_order_reads_queued_together_run_as_one_call_yet_each_gets_its_own_answer(storage: Storage) -> None:
    repository = storage.repository
    (x, _), (y, _) = [await storage.write(repository.create_order, order, None) for order in (NEW, OTHER)]
    x_id, y_id = Order.parse(x).id, Order.parse(y).id
    missing_id = "00000000-0000-7000-8000-000000000000"
    calls: list[list[str]] = []

    def get_orders(order_ids: list[str]) -> list:
        calls.append(order_ids)
        return repository.get_orders(order_ids)

    reads = [storage.read_together(get_orders, order_id) for order_id in (x_id, missing_id, y_id, x_id)]

    first, missing, second, again = await run_as_one_batch(storage, reads, on_reader=True)

    assert calls == [[x_id, missing_id, y_id, x_id]]
    assert (first, second, again) == (x, y, x)
    assert isinstance(missing, NotFound) and missing_id in str(missing)


async def test_order_reads_queued_together_all_get_the_error_of_their_call(storage: Storage) -> None:
    def unreachable(order_ids: list[str]) -> list:
        raise peewee.OperationalError("unable to open database file")

    reads = [storage.read_together(unreachable, order_id) for order_id in ("a", "b")]

    outcomes = await run_as_one_batch(storage, reads, on_reader=True)

    assert [type(outcome) for outcome in outcomes] == [Unavailable, Unavailable]
    assert all("unable to open database file" in str(outcome) for outcome in outcomes)
