"""Crash durability: ``kill -9`` the server in the middle of concurrent writes, restart it on the same
database, and check that nothing it acknowledged is missing, changed or half-written.

Each case starts the real server process, runs 16 concurrent writers (each its own connection, creating
orders and moving its own orders through their lives, with and without expected_version and request_id),
SIGKILLs the server after a random 0.2-1.0 s -- at a random instant, or (every other case) the moment a
reply arrives, when a server that replied before committing would most likely still hold the write --
restarts it on the same database (a SQLite file, or a PostgreSQL database: each case runs on both) and
checks:

* every acknowledged order is there, exactly as the last acknowledged reply for it said (items, total,
  currency, status, version, timestamps), or one step further when a status change for it was in flight
  at the kill (a call in doubt may or may not have been applied, but nothing else may differ);
* an order nobody acknowledged exists only if its CreateOrder was in flight at the kill;
* the event log replays as 1..head, head being one event per creation and change, with nothing past it;
  every stored order has exactly one creation event; each order's events are a valid walk through the
  transition table, as long as its version, ending at its status and update_time; every acknowledged
  change is its order's event number ``version``, with the reply's timestamp;
* the restarted server carries on: the next write gets sequence head + 1 (on PostgreSQL a number the
  killed server's uncommitted transaction took from the sequence is never handed out again, so it may
  skip up to one number per call in flight at the kill: a gap the log never held, which no watcher can
  miss -- the replay after head still gives exactly that write);
* once the restarted server has stopped (exit 0), reading the database directly: it is intact (SQLite:
  ``PRAGMA integrity_check`` is ok and ``foreign_key_check`` finds nothing; PostgreSQL: amcheck's
  ``verify_heapam`` finds nothing in any table and ``bt_index_parent_check`` passes every index), no
  item or event refers to a missing order and no order lacks items, and its own counts agree (orders,
  events = sum of versions, the log 1..head gap-free plus the write after the restart).

How it fails: a server that acknowledged a write before its transaction committed (a group commit that
replies first, a transaction left open across calls, the creation event written in a second transaction)
loses acknowledged orders or changes, or leaves an order without its event, whenever the kill lands
between a reply and the commit. Tried on a scratch copy whose writer commits only every 20th write: 17
of 25 kill points lost acknowledged writes (the others landed while it was committing), so the 4 default
kill points miss such a bug about once in a hundred runs, and ``ORDERS_CAMPAIGN=1`` (25) practically
never. Turning off ``synchronous=FULL`` does not show here: ``kill -9`` leaves the OS page cache intact,
only a power cut could tell.

``ORDERS_CRASH_SEED`` replays a schedule of requests and kill delays (the timing of a kill itself cannot
be replayed). Run with ``-s`` to see the figures of each kill.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError
from server_process import ServerProcess

from orders import domain, storage, wire
from orders._proto.orders.v1 import (
    CreateOrderRequest,
    ListOrdersRequest,
    Order,
    OrderItem,
    OrderServiceStub,
    OrderStatus,
    OrderStatusStreamRequest,
    StatusUpdate,
    UpdateOrderStatusRequest,
)

CAMPAIGN = os.environ.get("ORDERS_CAMPAIGN") == "1"
KILL_POINTS = 25 if CAMPAIGN else 4
WRITERS = 16
SEED = int(os.environ.get("ORDERS_CRASH_SEED") or random.randrange(1_000_000_000))
CALL_TIMEOUT = 20.0

NEXT = {
    OrderStatus.PENDING: (OrderStatus.CONFIRMED, OrderStatus.CANCELLED),
    OrderStatus.CONFIRMED: (OrderStatus.SHIPPED, OrderStatus.CANCELLED),
    OrderStatus.SHIPPED: (OrderStatus.DELIVERED, OrderStatus.CANCELLED),
    OrderStatus.DELIVERED: (),
    OrderStatus.CANCELLED: (),
}
# What a call cut off by the kill may raise on the client (asyncio.TimeoutError is an OSError on 3.11+).
CALL_ERRORS = (GRPCError, StreamTerminatedError, ConnectionError, OSError, asyncio.TimeoutError)


@dataclass
class Ledger:
    """What the writers were told: the only things the server promised."""

    acked: dict[str, Order] = field(default_factory=dict)  # order id -> the last reply acknowledged for it
    changes: list[Order] = field(default_factory=list)  # every acknowledged status-change reply
    creates: int = 0
    doubt_creates: dict[str, CreateOrderRequest] = field(default_factory=dict)  # first item name -> request
    doubt_changes: dict[str, OrderStatus] = field(default_factory=dict)  # order id -> status asked for
    in_flight: int = 0
    killed: bool = False
    in_flight_at_kill: int = 0
    kill_on_ack: Callable[[], None] | None = None  # armed: kill the server the moment a reply arrives

    def acknowledged(self) -> None:
        if self.kill_on_ack is not None and not self.killed:
            self.kill_on_ack()

    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    early_failures: list[str] = field(default_factory=list)


def describe(exc: BaseException) -> str:
    return f"GRPCError {exc.status.name}" if isinstance(exc, GRPCError) else type(exc).__name__


async def writer(number: int, stub: OrderServiceStub, rng: random.Random, ledger: Ledger) -> None:
    """Create orders and move them along until the first failed call (the kill)."""
    mine: list[str] = []
    created = 0
    while True:
        changeable = [order_id for order_id in mine if NEXT[ledger.acked[order_id].status]]
        if changeable and rng.random() < 0.5:
            order = ledger.acked[rng.choice(changeable)]
            target = rng.choice(NEXT[order.status])
            expected = order.version if rng.random() < 0.5 else 0
            request = UpdateOrderStatusRequest(id=order.id, status=target, expected_version=expected)
            ledger.in_flight += 1
            try:
                response = await stub.update_order_status(request, timeout=CALL_TIMEOUT)
            except CALL_ERRORS as exc:
                ledger.doubt_changes[order.id] = target
                return failed(ledger, f"UpdateOrderStatus {order.id}", exc)
            finally:
                ledger.in_flight -= 1
            changed = response.order
            assert (changed.id, changed.status, changed.version) == (order.id, target, order.version + 1)
            ledger.acked[order.id] = changed
            ledger.changes.append(changed)
            ledger.acknowledged()
        else:
            created += 1
            name = f"writer {number} order {created}"
            items = [
                OrderItem(
                    product_name=f"{name} item {j}", quantity=rng.randint(1, 9), price=rng.randint(0, 10**7) / 100
                )
                for j in range(rng.randint(1, 4))
            ]
            request = CreateOrderRequest(
                items=items,
                currency_code=rng.choice(("USD", "EUR", "JPY")),
                request_id=str(uuid.UUID(int=rng.getrandbits(128))) if rng.random() < 0.5 else "",
            )
            ledger.in_flight += 1
            try:
                response = await stub.create_order(request, timeout=CALL_TIMEOUT)
            except CALL_ERRORS as exc:
                ledger.doubt_creates[items[0].product_name] = request
                return failed(ledger, f"CreateOrder {name}", exc)
            finally:
                ledger.in_flight -= 1
            order = response.order
            assert [(i.product_name, i.quantity, i.price) for i in order.items] == [
                (i.product_name, i.quantity, i.price) for i in items
            ]
            assert (order.status, order.version) == (OrderStatus.PENDING, 1)
            ledger.acked[order.id] = order
            ledger.creates += 1
            mine.append(order.id)
            ledger.acknowledged()


def failed(ledger: Ledger, call: str, exc: BaseException) -> None:
    ledger.failures[describe(exc)] += 1
    if not ledger.killed:
        ledger.early_failures.append(f"{call}: {exc!r}")


async def list_all(stub: OrderServiceStub) -> list[Order]:
    orders: list[Order] = []
    token = ""
    while True:
        page = await asyncio.wait_for(stub.list_orders(ListOrdersRequest(page_size=1000, page_token=token)), 20)
        orders += page.orders
        token = page.next_page_token
        if not token:
            return orders


async def read_log(stub: OrderServiceStub, after: int, count: int) -> list[StatusUpdate]:
    """The first ``count`` events after ``after`` as the server replays them (fewer if that many never come)."""
    updates: list[StatusUpdate] = []

    async def read() -> None:
        request = OrderStatusStreamRequest(after_sequence=after)
        async with contextlib.aclosing(stub.order_status_stream(request)) as stream:
            async for update in stream:
                updates.append(update)
                if len(updates) == count:
                    return

    if count:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(read(), 5)
    return updates


def check_orders(ledger: Ledger, stored: dict[str, Order]) -> None:
    """Every acknowledged order is stored as acknowledged (or one in-doubt step further); every other
    stored order was in flight at the kill."""
    for order_id, last in ledger.acked.items():
        found = stored.get(order_id)
        assert found is not None, f"acknowledged order {order_id} was lost: {last}"
        if found == last:
            continue
        # only a status change that was in flight at the kill may have landed after the last reply
        assert (found.id, found.items, found.total_amount, found.currency_code, found.create_time) == (
            last.id,
            last.items,
            last.total_amount,
            last.currency_code,
            last.create_time,
        ), f"acknowledged order {order_id} changed:\nacked {last}\nfound {found}"
        in_doubt = ledger.doubt_changes.get(order_id)
        assert (found.status, found.version) == (in_doubt, last.version + 1), (
            f"order {order_id} differs from its last acknowledged reply (in-doubt change: {in_doubt}):\n"
            f"acked {last}\nfound {found}"
        )
    unacknowledged = [order for order_id, order in stored.items() if order_id not in ledger.acked]
    for order in unacknowledged:
        request = ledger.doubt_creates.get(order.items[0].product_name if order.items else "")
        assert request is not None, f"order {order.id} was stored but never asked for: {order}"
        assert [(i.product_name, i.quantity, i.price) for i in order.items] == [
            (i.product_name, i.quantity, i.price) for i in request.items
        ]
        assert (order.currency_code, order.status, order.version) == (request.currency_code, OrderStatus.PENDING, 1)


def check_log(ledger: Ledger, stored: dict[str, Order], log: list[StatusUpdate], head: int) -> None:
    """``log``: what the server replays from sequence 1; ``head``: one event per creation and change."""
    assert [u.sequence for u in log] == list(range(1, head + 1)), "the event log has a gap or is out of order"
    by_order: dict[str, list[StatusUpdate]] = collections.defaultdict(list)
    for update in log:
        by_order[update.order_id].append(update)
    assert by_order.keys() == stored.keys(), (
        f"events of orders that do not exist: {sorted(by_order.keys() - stored.keys())}; "
        f"orders without a creation event: {sorted(stored.keys() - by_order.keys())}"
    )
    for order_id, updates in by_order.items():
        order = stored[order_id]
        statuses = [u.status for u in updates]
        assert statuses[0] == OrderStatus.PENDING, (order_id, statuses)
        assert all(after in NEXT[before] for before, after in itertools.pairwise(statuses)), (order_id, statuses)
        assert len(updates) == order.version, f"order {order_id} is at version {order.version}: {statuses}"
        assert statuses[-1] == order.status, (order_id, statuses, order.status)
        assert (updates[0].timestamp, updates[-1].timestamp) == (order.create_time, order.update_time)
    for change in ledger.changes:
        event = by_order[change.id][change.version - 1]
        assert (event.status, event.timestamp) == (change.status, change.update_time), (
            f"the event of acknowledged change {change.id} v{change.version} is {event}"
        )


TABLES = ["order", "order_item", "status_event", "idempotency_key", "schema_version"]


@contextlib.contextmanager
def reading(url: str) -> Iterator[Callable[[str], list[tuple]]]:
    """Read a (stopped) server's database directly, on either backend: yields ``rows(sql)``."""
    database = storage.open_database(url)

    def rows(sql: str) -> list[tuple]:
        cursor = database.execute_sql(sql)
        return [] if cursor.description is None else [tuple(row) for row in cursor.fetchall()]

    try:
        yield rows
    finally:
        database.close()


def check_intact(url: str) -> None:
    """The database's own integrity checks find nothing wrong."""
    with reading(url) as rows:
        if not url.startswith("postgres"):
            assert rows("PRAGMA integrity_check") == [("ok",)]
            assert rows("PRAGMA foreign_key_check") == []
            return
        # PostgreSQL's equivalent of integrity_check: amcheck verifies every heap page and every B-tree
        # (structure, parent/child keys, and that each heap tuple is in each index) of the schema.
        rows("CREATE EXTENSION IF NOT EXISTS amcheck")
        tables = rows(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r' ORDER BY c.relname"
        )
        assert sorted(name for (name,) in tables) == sorted(TABLES)
        corrupt = rows(
            "SELECT c.relname, v.blkno, v.offnum, v.msg FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace CROSS JOIN LATERAL verify_heapam(c.oid) v "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
        )
        assert corrupt == []
        indexes = rows(
            "SELECT c.relname, i.indisvalid, i.indisready FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema()"
        )
        assert len(indexes) >= len(TABLES) and all(valid and ready for _, valid, ready in indexes), indexes
        checked = rows(
            "SELECT c.relname, bt_index_parent_check(c.oid, true, true) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_am a ON a.oid = c.relam WHERE n.nspname = current_schema() AND a.amname = 'btree'"
        )
        assert len(checked) == len(indexes), (checked, indexes)


def check_database(url: str, orders: int, head: int, after: int) -> None:
    """Read directly once the server has stopped: intact, nothing dangling, and its own counts agree with
    what the server said (``orders`` orders, events 1..``head`` plus the write ``after`` the restart)."""
    check_intact(url)
    with reading(url) as rows:
        # what foreign_key_check covers on SQLite (and PostgreSQL enforces), plus what no constraint does
        orphans = rows(
            'SELECT COUNT(*) FROM order_item i LEFT JOIN "order" o ON o.key = i.order_key WHERE o.key IS NULL'
        )
        assert orphans == [(0,)], "items of orders that do not exist"
        no_order = rows(
            'SELECT COUNT(*) FROM status_event e LEFT JOIN "order" o ON o.id = e.order_id WHERE o.id IS NULL'
        )
        assert no_order == [(0,)], "events of orders that do not exist"
        no_items = rows(
            'SELECT COUNT(*) FROM "order" o WHERE NOT EXISTS (SELECT 1 FROM order_item i WHERE i.order_key = o.key)'
        )
        assert no_items == [(0,)], "orders without items"
        assert rows('SELECT COUNT(*), SUM(version) FROM "order"') == [(orders, head + 1)]
        sequences = [sequence for (sequence,) in rows("SELECT sequence FROM status_event ORDER BY sequence")]
        assert sequences == [*range(1, head + 1), after], "the event log is not 1..head and the write after"
        check_encoded_orders(rows)


def check_encoded_orders(rows: Callable[[str], list[tuple]]) -> None:
    """Every order's encoded form, which replies carry, is exactly its columns and items encoded."""
    items = collections.defaultdict(list)
    for order_key, *item in rows(
        "SELECT order_key, id, product_name, quantity, price_cents FROM order_item ORDER BY order_key, position"
    ):
        items[order_key].append(domain.Item(*item))
    for key, order_id, total, currency, status, version, created, updated, encoded in rows(
        "SELECT key, id, total_cents, currency_code, status, version, create_time_us, update_time_us, encoded "
        'FROM "order"'
    ):
        columns = domain.Order(order_id, tuple(items[key]), total, currency, status, version, created, updated)
        assert bytes(encoded) == wire.encode_order(columns), f"order {order_id}: encoded form and columns differ"


@pytest.mark.parametrize("kill_point", range(KILL_POINTS))
async def test_kill_9_mid_load_loses_no_acknowledged_write(tmp_path, database_url, kill_point):
    rng = random.Random(f"{SEED}-{kill_point}")
    delay = rng.uniform(0.2, 1.0)
    after_ack = kill_point % 2 == 0
    server = ServerProcess(tmp_path, database_url)
    sqlite_wal = database_url.removeprefix("sqlite:///") + "-wal" if database_url.startswith("sqlite") else None
    ledger = Ledger()
    channels: list[Channel] = []
    try:
        await server.start()
        channels = [Channel("127.0.0.1", server.port) for _ in range(WRITERS + 1)]
        writers = [
            asyncio.create_task(writer(n, OrderServiceStub(channels[n]), random.Random(rng.random()), ledger))
            for n in range(WRITERS)
        ]
        started = time.monotonic()

        def show_failed_writers() -> None:
            for task in writers:
                if task.done():  # a writer failed before the kill: show why
                    task.result()

        while not ledger.creates:  # the delay runs from the first acknowledged create, however slow the start
            show_failed_writers()
            assert time.monotonic() - started < 30, "no create was acknowledged in 30 s"
            await asyncio.sleep(0.01)
        await asyncio.sleep(delay)
        show_failed_writers()

        def kill() -> None:  # synchronous: SIGKILL leaves before any other reply is read
            ledger.killed = True
            ledger.in_flight_at_kill = ledger.in_flight
            assert server.process is not None
            server.process.kill()

        if after_ack:
            # the most telling moment for a server that replies before it commits: right after a reply
            ledger.kill_on_ack = kill
            await asyncio.wait_for(asyncio.gather(*writers), 30)
        else:
            kill()
        await asyncio.wait_for(server.process.wait(), 10)
        wal = os.path.getsize(sqlite_wal) if sqlite_wal and os.path.exists(sqlite_wal) else 0
        load_time = time.monotonic() - started
        await asyncio.wait_for(asyncio.gather(*writers), 30)  # each writer ends at its first failed call
        in_flight = ledger.in_flight_at_kill
        for channel in channels[:WRITERS]:
            channel.close()

        assert not ledger.early_failures, f"calls failed before the kill: {ledger.early_failures}"
        assert in_flight > 0, "no call was in flight at the kill; the test proves nothing"
        assert sum(ledger.failures.values()) == WRITERS, "every writer ends at the kill"

        await server.start()
        stub = OrderServiceStub(channels[WRITERS])
        listed = await list_all(stub)
        stored = {order.id: order for order in listed}
        assert len(stored) == len(listed), "ListOrders repeated an order"
        found_creates = sum(1 for order_id in ledger.acked if order_id in stored)
        found_changes = sum(1 for c in ledger.changes if c.id in stored and stored[c.id].version >= c.version)
        landed = sum(
            1
            for order_id, status in ledger.doubt_changes.items()
            if status == getattr(stored.get(order_id), "status", 0)
        )
        moment = "right after a reply" if after_ack else "at a random instant"
        wal_size = f" (wal {wal // 1024} KiB)" if sqlite_wal else ""
        print(
            f"\n[crash seed={SEED} kill={kill_point}] killed {moment} after {load_time:.2f}s with {in_flight} calls in "
            f"flight{wal_size}: acknowledged {ledger.creates} creates + {len(ledger.changes)} "
            f"status changes, found {found_creates} + {found_changes}; {len(stored)} orders stored, "
            f"{len(stored) - found_creates} of {len(ledger.doubt_creates)} in-doubt creates and {landed} of "
            f"{len(ledger.doubt_changes)} in-doubt changes landed; writers saw {dict(ledger.failures)}"
        )
        check_orders(ledger, stored)
        head = sum(order.version for order in stored.values())  # whether no event is past it: check_database
        log = await read_log(stub, 0, head)
        check_log(ledger, stored, log, head)

        # the restarted server carries on from the head of the log
        after = await asyncio.wait_for(
            stub.create_order(CreateOrderRequest(items=[OrderItem(product_name="after the crash", quantity=1)])), 20
        )
        more = await read_log(stub, head, 1)
        if database_url.startswith("sqlite"):
            assert [(u.sequence, u.order_id) for u in more] == [(head + 1, after.order.id)]
        else:
            # A PostgreSQL sequence never hands a number out twice, not even one taken by a transaction the
            # kill rolled back: the next write may skip those, at most one per call in flight at the kill
            # that did not land, and nothing may come between the head and it.
            never_landed = in_flight - (len(stored) - found_creates) - landed
            assert [u.order_id for u in more] == [after.order.id]
            assert head < more[0].sequence <= head + 1 + never_landed, (head, more[0].sequence, never_landed)

        assert await server.stop() == 0
        check_database(database_url, len(stored) + 1, head, more[0].sequence)
        print(
            f"[crash seed={SEED} kill={kill_point}] event log 1..{head} gap-free and consistent, the next write "
            f"{more[0].sequence}; integrity ok"
        )
    finally:
        for channel in channels:
            channel.close()
        await server.kill()
