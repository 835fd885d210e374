"""Several server processes ("replicas") on one database: each tails the shared event log, so a watcher
on any replica sees every change made through any replica, once, in the one global commit order; a
client given every replica fails over when one is killed; and the races of one server (one winner per
transition, one order per request_id) behave the same when the racers use different replicas.

Runs on both backends: PostgreSQL is the deployment this is for (LISTEN/NOTIFY wakes the replicas);
SQLite replicas on one file must also be right (they notice each other's commits by polling the log).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from server_process import ServerProcess

from orders import (
    Aborted,
    AlreadyExists,
    Item,
    Order,
    OrderClient,
    OrderError,
    OrderStatus,
    RetryPolicy,
    StatusUpdate,
)

REPLICAS = 3
RACERS = 20
CALL_TIMEOUT = 30.0  # per client call, retries included: the machine is slow and runs three servers
WAIT_TIMEOUT = 60.0  # for a watcher to receive what it must
RETRY = RetryPolicy(attempts=40, initial_backoff=0.02, max_backoff=0.5)

PENDING, CONFIRMED, SHIPPED, DELIVERED, CANCELLED = (
    OrderStatus.PENDING,
    OrderStatus.CONFIRMED,
    OrderStatus.SHIPPED,
    OrderStatus.DELIVERED,
    OrderStatus.CANCELLED,
)
# The statuses each test order walks through after PENDING, one step per call, each through another replica.
PATHS = [
    [CONFIRMED, SHIPPED, DELIVERED],
    [CONFIRMED, CANCELLED],
    [CANCELLED],
    [CONFIRMED, SHIPPED, CANCELLED],
    [],
]


@pytest.fixture
async def replicas(tmp_path: Path, database_url: str) -> AsyncIterator[list[ServerProcess]]:
    """Three ``python -m orders.server`` processes on one fresh database, started at the same time."""
    servers = []
    for number in range(REPLICAS):
        directory = tmp_path / f"replica{number}"
        directory.mkdir()
        servers.append(ServerProcess(directory, database_url))
    try:
        await asyncio.gather(*(server.start() for server in servers))
        yield servers
    finally:
        await asyncio.gather(*(server.kill() for server in servers))


@pytest.fixture
async def clients(replicas: list[ServerProcess]) -> AsyncIterator[list[OrderClient]]:
    """One client per replica, talking to that replica only."""
    connected = [OrderClient(r.target, timeout=CALL_TIMEOUT, retry=RETRY) for r in replicas]
    try:
        yield connected
    finally:
        for client in connected:
            client.close()


class Watcher:
    """``client.watch(**options)`` in a background task, collecting what it yields."""

    def __init__(self, client: OrderClient, name: str, **options: object) -> None:
        self.name = name
        self.updates: list[StatusUpdate] = []
        self._arrived = asyncio.Event()
        self.task = asyncio.create_task(self._run(client, options))

    async def _run(self, client: OrderClient, options: dict[str, object]) -> None:
        async for update in client.watch(**options):  # type: ignore[arg-type]
            self.updates.append(update)
            self._arrived.set()

    @property
    def sequences(self) -> list[int]:
        return [u.sequence for u in self.updates]

    async def wait_until(self, done: Callable[[list[StatusUpdate]], bool], what: str) -> None:
        """Wait (up to WAIT_TIMEOUT) until ``done(updates)``; fail if the watch ends first."""

        async def wait() -> None:
            while not done(self.updates):
                if self.task.done():
                    raise AssertionError(f"{self.name}: the watch ended ({self.task!r}) before {what}")
                self._arrived.clear()
                arrived = asyncio.ensure_future(self._arrived.wait())
                try:
                    await asyncio.wait({self.task, arrived}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    arrived.cancel()

        try:
            await asyncio.wait_for(wait(), WAIT_TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"{self.name}: no {what} within {WAIT_TIMEOUT}s; got {self.sequences}") from None

    async def wait_for_count(self, count: int) -> None:
        await self.wait_until(lambda updates: len(updates) >= count, f"{count} updates")

    async def wait_for_order(self, order_id: str) -> None:
        await self.wait_until(lambda updates: any(u.order_id == order_id for u in updates), f"order {order_id}")

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@dataclass(frozen=True)
class Write:
    """An acknowledged change: the order as the reply had it, and when the call was sent and answered."""

    sent: float
    answered: float
    order: Order


def entries(updates: Sequence[StatusUpdate]) -> list[tuple[int, str, OrderStatus, OrderStatus]]:
    return [(u.sequence, u.order_id, u.previous_status, u.status) for u in updates]


async def replay(client: OrderClient, order_ids: Sequence[str], last_id: str) -> list[StatusUpdate]:
    """The retained log of ``order_ids`` (and ``last_id``) as a fresh watch through ``client`` replays it,
    up to ``last_id``'s creation, the newest event the caller knows of."""

    async def read() -> list[StatusUpdate]:
        updates = []
        ids = [*order_ids, last_id] if order_ids else []  # none: every order
        async for update in client.watch(ids, after_sequence=0, reconnect=False):
            updates.append(update)
            if update.order_id == last_id:
                return updates
        raise AssertionError("the watch ended")

    return await asyncio.wait_for(read(), WAIT_TIMEOUT)


async def outcome(call: Awaitable[Order]) -> Order | str:
    """The order a call returned, or the status code it failed with."""
    try:
        return await call
    except OrderError as error:
        return error.code


async def test_every_replica_streams_every_change_once_in_commit_order(clients):
    loop = asyncio.get_running_loop()
    writes: list[Write] = []

    async def write(via: int, method: str, *args: object, **kwargs: object) -> Order:
        """``clients[via].method(*args, **kwargs)``, recorded with when it was sent and answered."""
        sent = loop.time()
        order: Order = await getattr(clients[via % REPLICAS], method)(*args, **kwargs)
        writes.append(Write(sent, loop.time(), order))
        return order

    async def create(via: int, name: str) -> Order:
        return await write(via, "create", [Item(name, 1, 1.0)])

    async def walk(number: int, order: Order) -> None:
        """Take ``order`` along its path, each step through the replica after the last one's."""
        for step, status in enumerate(PATHS[number % len(PATHS)], start=1):
            version = order.version
            if status == CANCELLED and step % 2:
                order = await write(number + step, "cancel", order.id)
            elif step % 2:
                order = await write(number + step, "update_status", order.id, status)
            else:  # optimistic concurrency, through yet another replica
                order = await write(number + step, "update_status", order.id, status, expected_version=version)
            assert (order.status, order.version) == (status, version + 1)

    # Two watchers per replica: one from the start (an empty log, so everything arrives live), one that
    # joins in the middle of the writes (replay, then live, with writes committing at the seam).
    watchers = [Watcher(c, f"early watcher on replica {i}", after_sequence=0) for i, c in enumerate(clients)]
    # And a live-only one per replica: it gets every change committed after it was accepted.
    live = [Watcher(c, f"live watcher on replica {i}") for i, c in enumerate(clients)]
    try:
        first = await asyncio.gather(*(create(i, f"first {i}") for i in range(4 * REPLICAS)))
        watchers += [Watcher(c, f"late watcher on replica {i}", after_sequence=0) for i, c in enumerate(clients)]
        # the first orders' status changes, concurrently with more creates, then the new orders' changes
        second = asyncio.gather(*(create(i, f"second {i}") for i in range(2 * REPLICAS)))
        await asyncio.gather(*(walk(number, order) for number, order in enumerate(first)), second)
        await asyncio.gather(*(walk(number, order) for number, order in enumerate(second.result(), start=1)))
        total = len(writes)
        assert total > 40

        for watcher in watchers:
            await watcher.wait_for_count(total)
        # One more change, made after every other was acknowledged: once a watcher has it, it has had
        # every chance to deliver something twice or out of order.
        last = await create(0, "last")
        for watcher in watchers + live:
            await watcher.wait_for_order(last.id)
    finally:
        for watcher in watchers + live:
            await watcher.stop()

    # Exactly once, in strictly increasing sequence order, the same on every replica.
    reference = watchers[0].updates
    assert [u.sequence for u in reference] == list(range(1, total + 2))
    for watcher in watchers:
        assert watcher.sequences == list(range(1, total + 2)), watcher.name
        assert entries(watcher.updates) == entries(reference), watcher.name
        assert [u.timestamp for u in watcher.updates] == [u.timestamp for u in reference], watcher.name
    for watcher in live:  # from wherever it started, the rest of the log
        start = watcher.updates[0].sequence
        assert entries(watcher.updates) == entries(reference[start - 1 :]), watcher.name

    # Each acknowledged change is the event of its version: an order's events come in its transition order.
    by_order: dict[str, list[StatusUpdate]] = {}
    for update in reference:
        by_order.setdefault(update.order_id, []).append(update)
    sequence_of: dict[int, int] = {}
    for number, w in enumerate(writes):
        event = by_order[w.order.id][w.order.version - 1]
        assert (event.status, event.timestamp) == (w.order.status, w.order.update_time), (w.order, event)
        sequence_of[number] = event.sequence
    for order_id, events in by_order.items():
        assert events[0].previous_status == OrderStatus.UNSPECIFIED and events[0].status == PENDING, order_id
        assert all(a.status == b.previous_status for a, b in itertools.pairwise(events)), order_id
        assert len(events) == max(w.order.version for w in writes if w.order.id == order_id), order_id
    assert len(set(sequence_of.values())) == len(writes) == total + 1, "one event per acknowledged change"

    # The global order is the commit order writers saw: a change acknowledged before another was sent
    # (through whichever replicas) has the smaller sequence.
    for a, earlier in enumerate(writes):
        for b, later in enumerate(writes):
            if earlier.answered < later.sent:
                assert sequence_of[a] < sequence_of[b], (earlier.order, later.order)


async def test_a_watch_over_every_replica_resumes_on_another_when_its_replica_is_killed(replicas, clients):
    targets = [r.target for r in replicas]
    watching = OrderClient(targets, timeout=CALL_TIMEOUT, retry=RETRY)
    failover_writer = OrderClient(targets, timeout=CALL_TIMEOUT, retry=RETRY)
    acknowledged: list[Order] = []
    stop_writing = asyncio.Event()

    async def keep_writing(client: OrderClient, tag: str) -> None:
        number = 0
        while not stop_writing.is_set():
            order = await client.create([Item(f"{tag} {number}", 1, 1.0)])
            acknowledged.append(order)
            acknowledged.append(await client.update_status(order.id, CONFIRMED))
            number += 1

    watcher = Watcher(watching, "watcher given every replica", after_sequence=0)
    # live only: it resumes after the last update or heartbeat it got, so it too misses nothing
    live = Watcher(watching, "live watcher given every replica", heartbeat_seconds=1)
    writers: list[asyncio.Task[None]] = []
    try:
        for i in range(2 * REPLICAS):
            acknowledged.append(await clients[i % REPLICAS].create([Item(f"before {i}", 1, 1.0)]))
        await watcher.wait_for_count(len(acknowledged))
        assert watching.target == targets[0], "the watch is on the first replica"

        # Writes keep coming through the other two replicas, and through a client given all three,
        # whose calls are on the first replica when it dies.
        writers = [
            asyncio.create_task(keep_writing(clients[1], "via replica 1")),
            asyncio.create_task(keep_writing(clients[2], "via replica 2")),
            asyncio.create_task(keep_writing(failover_writer, "via any replica")),
        ]
        await watcher.wait_for_count(len(acknowledged) + 12)
        await live.wait_for_count(1)
        assert failover_writer.target == targets[0]
        await replicas[0].kill()  # kill -9, with the watch streaming and writes in flight through it
        received_before_kill = len(watcher.updates)
        await watcher.wait_for_count(received_before_kill + 30)
        stop_writing.set()
        await asyncio.wait_for(asyncio.gather(*writers), WAIT_TIMEOUT)
        last = await clients[2].create([Item("last", 1, 1.0)])
        await watcher.wait_for_order(last.id)
        await live.wait_for_order(last.id)
    finally:
        stop_writing.set()
        await asyncio.gather(*writers, return_exceptions=True)
        await watcher.stop()
        await live.stop()
        failover_writer.close()
        watching.close()

    assert watching.target != targets[0] and failover_writer.target != targets[0], "both moved on"
    # No gap and no duplicate: exactly the log as a fresh watch on a surviving replica replays it.
    log = await replay(clients[1], [], last.id)
    assert watcher.sequences == sorted(set(watcher.sequences)), "strictly increasing"
    assert watcher.updates == log
    joined = [u.sequence for u in log].index(live.updates[0].sequence)
    assert live.updates == log[joined:], "the live watch: the log from where it joined"
    assert live.updates[0].sequence <= watcher.updates[received_before_kill - 1].sequence, "it joined before the kill"
    events = {(u.order_id, u.status, u.timestamp) for u in log}
    for order in acknowledged:
        assert (order.id, order.status, order.update_time) in events, order
    # A create that was in flight on the killed replica was retried on another with its request_id: every
    # create (each names its item uniquely) made one order, whichever replica committed it.
    listed = [o async for o in clients[2].list(page_size=1000)]
    names = [o.items[0].product_name for o in listed]
    assert len(names) == len(set(names)), "no create made two orders"
    assert {o.id for o in listed} == {u.order_id for u in log if u.status == PENDING}
    assert {o.id for o in acknowledged} <= {o.id for o in listed}


async def test_conflicting_transitions_through_different_replicas_have_one_winner(replicas, clients):
    racers = [OrderClient(replicas[i % REPLICAS].target, timeout=CALL_TIMEOUT, retry=RETRY) for i in range(RACERS)]
    try:
        order = await clients[0].create([Item("Widget", 3, 9.99)])
        await clients[1].update_status(order.id, CONFIRMED)
        order = await clients[2].update_status(order.id, SHIPPED)
        assert order.version == 3

        # From SHIPPED, DELIVERED and CANCELLED are both allowed and both terminal: one commit wins,
        # racers asking for the winner's status get the no-op, the others FAILED_PRECONDITION.
        wanted = [DELIVERED if i % 2 else CANCELLED for i in range(RACERS)]

        def change(racer: OrderClient, status: OrderStatus, number: int) -> Awaitable[Order]:
            if status == CANCELLED and number % 4 == 0:  # CancelOrder as well
                return racer.cancel(order.id)
            return racer.update_status(order.id, status)

        results = await asyncio.gather(
            *(outcome(change(r, s, n)) for n, (r, s) in enumerate(zip(racers, wanted, strict=True)))
        )
        finals = [await client.get(order.id) for client in clients]
        final = finals[0]
        assert finals == [final] * REPLICAS, "every replica reads the same order"
        assert final.status in (DELIVERED, CANCELLED)
        assert final.version == 4, "exactly one change was made"
        for status, result in zip(wanted, results, strict=True):
            if status == final.status:
                assert isinstance(result, Order), f"{status.name}: {result}"
                assert (result.status, result.version, result.update_time) == (final.status, 4, final.update_time)
            else:
                assert result == "FAILED_PRECONDITION", f"{status.name} after {final.status.name}: {result}"

        # One expected_version, racers on every replica: one OK, the rest ABORTED.
        other = await clients[0].create([Item("Gadget", 1, 5.0)])
        results = await asyncio.gather(
            *(outcome(r.update_status(other.id, CONFIRMED, expected_version=1)) for r in racers)
        )
        winners = [r for r in results if isinstance(r, Order)]
        assert len(winners) == 1, results
        assert (winners[0].status, winners[0].version) == (CONFIRMED, 2)
        assert sorted(r for r in results if not isinstance(r, Order)) == ["ABORTED"] * (RACERS - 1)
        with pytest.raises(Aborted):
            await clients[2].update_status(other.id, SHIPPED, expected_version=1)

        # The log, as every replica replays it: one event per real change, each starting where the last ended.
        last = await clients[1].create([Item("last", 1, 1.0)])
        for client in clients:
            log = [
                (u.order_id, u.previous_status, u.status) for u in await replay(client, [order.id, other.id], last.id)
            ]
            assert log == [
                (order.id, OrderStatus.UNSPECIFIED, PENDING),
                (order.id, PENDING, CONFIRMED),
                (order.id, CONFIRMED, SHIPPED),
                (order.id, SHIPPED, final.status),
                (other.id, OrderStatus.UNSPECIFIED, PENDING),
                (other.id, PENDING, CONFIRMED),
                (last.id, OrderStatus.UNSPECIFIED, PENDING),
            ]
    finally:
        for racer in racers:
            racer.close()


async def test_one_request_id_through_every_replica_creates_one_order(clients):
    key = str(uuid.uuid4())
    items = [Item("Laptop", 1, 1000.0), Item("Mouse", 2, 25.0)]
    racers = [OrderClient(c.target, timeout=CALL_TIMEOUT, retry=RETRY) for c in clients for _ in range(7)]
    try:
        orders = await asyncio.gather(*(r.create(items, request_id=key) for r in racers))
    finally:
        for racer in racers:
            racer.close()
    assert orders == [orders[0]] * len(racers), "every replica returns the one original order"
    order = orders[0]
    for client in clients:
        assert await client.create(items, request_id=key) == order
        with pytest.raises(AlreadyExists):
            await client.create([Item("Laptop", 2, 1000.0)], request_id=key)
        assert [o async for o in client.list()] == [order]
    last = await clients[0].create([Item("last", 1, 1.0)])
    for client in clients:
        log = await replay(client, [], last.id)
        assert [(u.order_id, u.status) for u in log] == [(order.id, PENDING), (last.id, PENDING)]
