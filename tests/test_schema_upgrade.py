"""A database written by an older schema is upgraded in place by the first server that opens it, and one
written by a newer schema is refused.

Schema 1 had no ``order.encoded``: the test writes orders through a server, takes the database back to
schema 1 (drops the column, records version 1), and checks that a server opening it answers every read
with exactly what it answered before, and goes on writing. Schema 2 had an index on the idempotency keys'
creation times that no query read: a server opening such a database drops it, and keys work as before.
Schema 3 took the event log to start at its oldest event; schema 4 records the newest pruned sequence
instead, and the upgrade takes it to be the one before the oldest event.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from server_process import ServerProcess

from orders import AlreadyExists, Item, OrderClient, OrderStatus, OutOfRange, RetryPolicy, Unavailable
from orders.storage import KEY_TIME_INDEX, SCHEMA_VERSION, DatabaseUnusable, Repository, open_database
from orders.testing import serve

BEFORE_SCHEMA_4 = "ALTER TABLE schema_version DROP COLUMN pruned_through"


def set_schema(url: str, version: int, *statements: str) -> None:
    database = open_database(url)
    try:
        with database.atomic():
            for statement in statements:
                database.execute_sql(statement)
            database.execute_sql(f"UPDATE schema_version SET version = {version}")
    finally:
        database.close()


def stored_schema(url: str) -> list[tuple[int, ...]]:
    database = open_database(url)
    try:
        return [tuple(row) for row in database.execute_sql("SELECT version FROM schema_version").fetchall()]
    finally:
        database.close()


def key_indexes(url: str) -> set[str]:
    database = open_database(url)
    try:
        return {index.name for index in database.get_indexes("idempotency_key")}
    finally:
        database.close()


async def answers(client: OrderClient, order_ids: list[str]) -> tuple[list, list]:
    """Every order by id, and every order listed (two pages of 2, to cross a page boundary)."""
    listed = [order async for order in client.list(page_size=2)]
    return [await client.get(order_id) for order_id in order_ids], listed


async def test_a_schema_1_database_is_upgraded_and_serves_its_orders_unchanged(database_url: str) -> None:
    async with serve(database_url) as client:
        first = await client.create([Item("widget", 2, 19.99), Item("gadget", 1, 5.0)], currency_code="EUR")
        second = await client.create([("lamp", 3, 12.5)])
        third = await client.create([("cable", 1, 0.01)])
        await client.update_status(first.id, OrderStatus.CONFIRMED)
        await client.cancel(second.id)
        order_ids = [first.id, second.id, third.id]
        before = await answers(client, order_ids)
    set_schema(database_url, 1, 'ALTER TABLE "order" DROP COLUMN encoded', BEFORE_SCHEMA_4)

    async with serve(database_url) as client:
        assert await answers(client, order_ids) == before
        shipped = await client.update_status(first.id, OrderStatus.SHIPPED)
        assert (shipped.status, shipped.version, shipped.items) == (OrderStatus.SHIPPED, 3, before[0][0].items)
        fourth = await client.create([("mug", 1, 7.0)])
        assert [order.id async for order in client.list()] == [*order_ids, fourth.id]
    assert stored_schema(database_url) == [(SCHEMA_VERSION,)]


async def test_a_schema_2_database_loses_its_unused_index_and_keeps_its_idempotency_keys(database_url: str) -> None:
    async with serve(database_url) as client:
        order = await client.create([("pen", 1, 1.5)], request_id="key-1")
    set_schema(database_url, 2, f'CREATE INDEX "{KEY_TIME_INDEX}" ON idempotency_key (created_us)', BEFORE_SCHEMA_4)
    assert KEY_TIME_INDEX in key_indexes(database_url)

    async with serve(database_url) as client:
        assert await client.create([("pen", 1, 1.5)], request_id="key-1") == order  # a retry: the same order
        with pytest.raises(AlreadyExists):
            await client.create([("ink", 1, 2.0)], request_id="key-1")
        assert (await client.create([("ink", 1, 2.0)], request_id="key-2")).id != order.id
    assert KEY_TIME_INDEX not in key_indexes(database_url)
    assert stored_schema(database_url) == [(SCHEMA_VERSION,)]


async def test_a_schema_3_database_keeps_the_start_of_its_event_log(database_url: str) -> None:
    async with serve(database_url) as client:
        first, second, third = [await client.create([("pen", 1, 1.5)]) for _ in range(3)]
    set_schema(database_url, 3, "DELETE FROM status_event WHERE sequence = 1", BEFORE_SCHEMA_4)  # pruned by schema 3

    async with serve(database_url) as client:
        with pytest.raises(OutOfRange, match="holds sequences 2 to 3"):
            await anext(client.watch(after_sequence=0))
        replayed = client.watch(after_sequence=1)
        assert [(await anext(replayed)).order_id for _ in range(2)] == [second.id, third.id]
        await replayed.aclose()
    assert stored_schema(database_url) == [(SCHEMA_VERSION,)]


def test_a_database_of_a_newer_schema_is_refused(database_url: str) -> None:
    database = open_database(database_url)
    try:
        Repository(database).migrate()
        database.execute_sql(f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
        with pytest.raises(DatabaseUnusable, match=f"version {SCHEMA_VERSION + 1} is newer than this server's"):
            Repository(database).migrate()
    finally:
        database.close()


async def test_tables_dropped_under_a_running_server_are_unavailable_saying_so_without_a_traceback(
    tmp_path: Path, database_url: str
) -> None:
    """A database dropped and made again empty (or its tables dropped) while the server runs: every call
    that needs the tables is UNAVAILABLE saying what happened and what the operator can do, not INTERNAL
    with a traceback in the log for each; the outage is logged once."""
    server = ServerProcess(tmp_path, database_url)
    await server.start()
    try:
        async with OrderClient(server.target, retry=RetryPolicy(attempts=1)) as client:
            order = await client.create([Item("widget", 1, 1.0)])
            database = open_database(database_url)
            try:
                for table in ("order_item", "status_event", "idempotency_key", "order"):
                    database.execute_sql(f'DROP TABLE "{table}"')
            finally:
                database.close()
            gone = r"the database has lost the server's tables \(.*(no such table|does not exist).*restart the server"
            for call in (
                lambda: client.get(order.id),
                lambda: client.create([Item("widget", 1, 1.0)]),
                lambda: client.cancel(order.id),
                lambda: client.list_page(),
            ):
                for _ in range(2):
                    with pytest.raises(Unavailable, match=gone):
                        await call()
        log = server.log.read_text()
        assert "Traceback" not in log and "INTERNAL" not in log, log
        assert log.count("database calls on orders-db-writer fail: the database has lost the server's tables") == 1
    finally:
        await server.kill()
