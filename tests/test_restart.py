"""Stop the server process (SIGTERM, exit 0) and start it again on the same SQLite file: every order,
the listing and the event log are exactly as they were, and the log carries on from its head."""

from __future__ import annotations

import asyncio

from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError
from server_process import ServerProcess

from orders import Item, OrderClient, OrderStatus, RetryPolicy, StatusUpdate
from orders._proto.orders.v1 import CreateOrderRequest, Order, OrderItem, OrderServiceStub

RETRY = RetryPolicy(attempts=40, initial_backoff=0.02, max_backoff=0.2)


async def replay(client: OrderClient, head: int) -> list[StatusUpdate]:
    """The whole event log, read with after_sequence=0 up to ``head``."""

    async def read() -> list[StatusUpdate]:
        updates: list[StatusUpdate] = []
        if head == 0:
            return updates
        async for update in client.watch(after_sequence=0, reconnect=False):
            updates.append(update)
            if update.sequence >= head:
                return updates
        raise AssertionError("the stream ended")

    return await asyncio.wait_for(read(), 10)


async def snapshot(client: OrderClient, ids: list[str]) -> tuple[list[Order], list[Order]]:
    return [await client.get(order_id) for order_id in ids], [o async for o in client.list(page_size=7)]


async def populate(client: OrderClient) -> list[str]:
    """Orders in every status, with several items, prices, currencies and versions."""
    ids = []
    lives = [
        (),
        (OrderStatus.CONFIRMED,),
        (OrderStatus.CONFIRMED, OrderStatus.SHIPPED),
        (OrderStatus.CONFIRMED, OrderStatus.SHIPPED, OrderStatus.DELIVERED),
        (OrderStatus.CANCELLED,),
        (OrderStatus.CONFIRMED, OrderStatus.SHIPPED, OrderStatus.CANCELLED),
    ]
    for i in range(18):
        items = [Item(f"Product {i}.{j} – ünïcödé", j + 1, round(0.01 + i * 10.37 + j, 2)) for j in range(1 + i % 3)]
        order = await client.create(items, currency_code=("USD", "EUR", "JPY")[i % 3], request_id=f"restart-{i}")
        for status in lives[i % len(lives)]:
            await client.update_status(order.id, status)
        ids.append(order.id)
    return ids


async def test_everything_survives_a_restart_and_the_log_continues(tmp_path, database_url):
    server = ServerProcess(tmp_path, database_url)
    await server.start()
    try:
        async with OrderClient(server.target, retry=RETRY) as client:
            ids = await populate(client)
            orders_before, listed_before = await snapshot(client, ids)
            head = sum(o.version for o in orders_before)  # one event per creation and per change
            log_before = await replay(client, head)
            assert [u.sequence for u in log_before] == list(range(1, head + 1))

            assert await server.stop() == 0
            await server.start()

            orders_after, listed_after = await snapshot(client, ids)
            assert orders_after == orders_before, "every order unchanged, timestamps included"
            assert listed_after == listed_before
            assert [o.id for o in listed_after] == ids, "still in creation order"
            assert await replay(client, head) == log_before

            # the log carries on from head + 1, live and in replay
            async def next_two() -> list[StatusUpdate]:
                updates = []
                async for update in client.watch(after_sequence=head, reconnect=False):
                    updates.append(update)
                    if len(updates) == 2:
                        return updates
                raise AssertionError("the stream ended")

            watching = asyncio.create_task(asyncio.wait_for(next_two(), 10))
            pending = ids[0]
            confirmed = await client.update_status(pending, OrderStatus.CONFIRMED)
            created = await client.create([Item("after the restart", 1, 1.0)])
            first, second = await watching
            assert (first.sequence, first.order_id, first.status) == (head + 1, pending, OrderStatus.CONFIRMED)
            assert first.timestamp == confirmed.update_time
            assert (second.sequence, second.order_id, second.status) == (head + 2, created.id, OrderStatus.PENDING)

            # idempotency keys survived too
            again = await client.create(
                [Item(f"Product 0.{j} – ünïcödé", j + 1, round(0.01 + j, 2)) for j in range(1)],
                currency_code="USD",
                request_id="restart-0",
            )
            assert again.id == ids[0]
            assert len([o async for o in client.list()]) == len(ids) + 1

        assert await server.stop() == 0
    finally:
        await server.kill()


async def test_restart_of_an_empty_database(tmp_path, database_url):
    server = ServerProcess(tmp_path, database_url)
    await server.start()
    try:
        assert await server.stop() == 0
        await server.start()
        async with OrderClient(server.target, retry=RETRY) as client:
            assert [o async for o in client.list()] == []
            order = await client.create([Item("first", 1, 1.0)])
            [update] = await replay(client, 1)
            assert (update.sequence, update.order_id) == (1, order.id)
        assert await server.stop() == 0
    finally:
        await server.kill()


async def test_sigterm_during_a_burst_of_writes_loses_no_acknowledged_order(tmp_path, database_url):
    server = ServerProcess(tmp_path, database_url)
    await server.start()
    channel = Channel("127.0.0.1", server.port)
    stub = OrderServiceStub(channel)
    try:

        async def create(i: int) -> Order | None:
            request = CreateOrderRequest(items=[OrderItem(product_name=f"burst {i}", quantity=1, price=1.5)])
            try:
                response = await asyncio.wait_for(stub.create_order(request), 15)
            except (GRPCError, StreamTerminatedError, ConnectionError, OSError):
                return None  # refused or cut off by the shutdown: not acknowledged
            return response.order

        async def writer(start: int) -> list[Order | None]:
            return [await create(i) for i in range(start, start + 200)]

        writers = [asyncio.create_task(writer(k * 1000)) for k in range(4)]
        await asyncio.sleep(0.3)
        assert await server.stop() == 0
        results = [order for batch in await asyncio.gather(*writers) for order in batch]
        acknowledged = [order for order in results if order is not None]
        assert acknowledged, "nothing was written before the shutdown; the test proves nothing"
        assert len(acknowledged) < len(results), "the shutdown came after the burst; the test proves nothing"
        channel.close()

        await server.start()
        async with OrderClient(server.target, retry=RETRY) as client:
            stored = {o.id: o async for o in client.list(page_size=1000)}
            for order in acknowledged:
                assert stored.get(order.id) == order, "an acknowledged order was lost or changed"
            log = await replay(client, len(stored))
            assert [u.sequence for u in log] == list(range(1, len(stored) + 1))
            assert sorted(u.order_id for u in log) == sorted(stored), "one creation event per stored order"
        assert await server.stop() == 0
    finally:
        channel.close()
        await server.kill()
