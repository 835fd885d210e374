"""The PostgreSQL mechanisms behind several replicas on one database (the rest of the suite runs on
PostgreSQL too): serialised event appends, concurrent migrations, LISTEN/NOTIFY wake-ups, and recovery
from connections the database server drops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import peewee
import psycopg
import pytest
from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from server_process import free_port
from test_client import FreezingProxy
from test_shutdown import write_lock
from test_stream import eventually

import orders.server
import orders.storage
import orders.storage_threads
from orders._proto.orders.v1 import OrderServiceStub, OrderStatus, OrderStatusStreamRequest
from orders.client import Item, OrderClient, RetryPolicy
from orders.domain import NewOrder, Status, validate_new_order
from orders.errors import DataLoss, Unavailable
from orders.storage import SCHEMA_VERSION, Repository, open_database
from orders.testing import running_server

pytestmark = pytest.mark.postgresql_only

TIMEOUT = 10.0


def new_order() -> NewOrder:
    return validate_new_order([("Widget", 1, 2.5)], 0.0, "USD")


def test_event_appends_are_serialised_so_sequence_order_is_commit_order(database_url: str) -> None:
    """A transaction that appended an event holds back every other writer until it ends: a later event
    can never commit first, so a tailer that has read sequence N never finds a smaller one afterwards."""
    first, second = (Repository(open_database(database_url)) for _ in range(2))
    first.migrate()
    appended = threading.Event()
    release = threading.Event()

    def slow_writer() -> int:
        with first.write_transaction():
            _, event = first.create_order(new_order(), None)
            appended.set()
            release.wait(TIMEOUT)
        assert event is not None
        return event.sequence

    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(slow_writer)
        assert appended.wait(TIMEOUT)
        fast = pool.submit(lambda: second.create_order(new_order(), None)[1])
        time.sleep(0.5)
        assert not fast.done(), "a second writer appended while the first transaction was still open"
        release.set()
        slow_sequence, fast_event = slow.result(TIMEOUT), fast.result(TIMEOUT)
    assert fast_event is not None and fast_event.sequence > slow_sequence
    for repository in (first, second):
        repository.database.close()


def test_replicas_starting_at_once_migrate_the_schema_once(database_url: str) -> None:
    replicas = 6
    barrier = threading.Barrier(replicas)

    def start() -> None:
        repository = Repository(open_database(database_url))
        barrier.wait(TIMEOUT)
        repository.migrate()
        repository.database.close()

    with ThreadPoolExecutor(replicas) as pool:
        for started in [pool.submit(start) for _ in range(replicas)]:
            started.result(TIMEOUT * 3)  # no "relation already exists" or duplicate-key error
    with psycopg.connect(database_url) as check:
        assert check.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


async def test_a_watcher_on_another_replica_is_woken_by_notify(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With polling switched off, only NOTIFY can bring a change made through one server to another's
    watcher."""
    monkeypatch.setattr(orders.server, "POLL_INTERVAL", 3600.0)
    async with (
        running_server(database_url) as writer_server,
        running_server(database_url) as watcher_server,
        OrderClient(f"127.0.0.1:{writer_server.port}") as writer,
        OrderClient(f"127.0.0.1:{watcher_server.port}") as watcher,
    ):
        updates = watcher.watch()  # live only
        first = asyncio.ensure_future(updates.__anext__())
        while watcher_server.feed.watcher_count == 0:
            await asyncio.sleep(0.01)
        order = await writer.create([Item("Widget", 1, 2.5)])
        update = await asyncio.wait_for(first, TIMEOUT)
        assert (update.order_id, Status(update.status)) == (order.id, Status.PENDING)
        await updates.aclose()


async def test_sequence_numbers_taken_before_the_first_event_are_not_taken_for_pruned_events(
    database_url: str,
) -> None:
    """A transaction that rolls back keeps the sequence numbers it took, so when the first write of a new
    database rolls back (a failed connection, another replica's conflict), the log's first event is not 1.
    Nothing was pruned: a watcher opened on the empty log gets that event, and so does a replay from 0."""
    async with running_server(database_url) as server, OrderClient(f"127.0.0.1:{server.port}") as client:
        live = client.watch()
        first_update = asyncio.ensure_future(anext(live))
        try:
            await eventually(lambda: server.feed.watcher_count == 1, "the watcher registered")
            with psycopg.connect(database_url) as other, other.transaction(force_rollback=True):
                other.execute("INSERT INTO status_event (order_id, status, time_us) VALUES ('rolled back', 1, 0)")
            order = await client.create([Item("First", 1, 1.0)])
            update = await asyncio.wait_for(first_update, TIMEOUT)
            assert (update.order_id, update.sequence) == (order.id, 2)
            replayed = await asyncio.wait_for(anext(client.watch(after_sequence=0)), TIMEOUT)
            assert (replayed.order_id, replayed.sequence) == (order.id, 2)
        finally:
            first_update.cancel()


async def test_retention_counts_as_pruned_only_events_it_deleted_not_a_rolled_back_sequence_number(
    database_url: str,
) -> None:
    """The newest 5 events are kept; the sequence number just before them was taken by a transaction that
    rolled back, so no event had it: a stream resuming after the last deleted event misses nothing, and is
    served."""
    async with (
        running_server(database_url, retention_events=5) as server,
        OrderClient(f"127.0.0.1:{server.port}") as client,
    ):
        for _ in range(5):
            await client.create([Item("Before", 1, 1.0)])  # sequences 1 to 5
        with psycopg.connect(database_url) as other, other.transaction(force_rollback=True):
            other.execute("INSERT INTO status_event (order_id, status, time_us) VALUES ('rolled back', 1, 0)")  # 6
        after = [await client.create([Item("After", 1, 1.0)]) for _ in range(5)]  # 7 to 11: 1 to 5 are pruned
        assert server.storage.repository.log_bounds() == (6, 11)
        resumed = client.watch(after_sequence=5, reconnect=False)
        updates = [await asyncio.wait_for(anext(resumed), TIMEOUT) for _ in range(5)]
        await resumed.aclose()
        assert [(u.sequence, u.order_id) for u in updates] == [(7 + i, o.id) for i, o in enumerate(after)]


async def test_the_server_recovers_when_postgresql_drops_its_connections(database_url: str) -> None:
    database = database_url.rsplit("/", 1)[1]
    async with running_server(database_url) as server, OrderClient(f"127.0.0.1:{server.port}") as client:
        order = await client.create([Item("Widget", 1, 2.5)])
        seen: list[int] = []

        async def watch() -> None:
            async for update in client.watch(after_sequence=0):
                seen.append(update.sequence)

        watching = asyncio.ensure_future(watch())
        with psycopg.connect(database_url.replace(f"/{database}", "/postgres"), autocommit=True) as admin:
            others = "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
            deadline = asyncio.get_running_loop().time() + TIMEOUT
            while admin.execute(f"SELECT count(*) {others}", (database,)).fetchone()[0] < 3:
                assert asyncio.get_running_loop().time() < deadline, "the listener never connected"
                await asyncio.sleep(0.05)  # the listener connects in the background after start-up
            dropped = admin.execute(f"SELECT pg_terminate_backend(pid) {others}", (database,)).fetchall()
        assert len(dropped) >= 3  # the writer's, the reader's and the listener's connections
        # The client retries what is safe to retry; the server reconnects instead of failing forever.
        assert (await client.get(order.id)).id == order.id
        again = await client.create([Item("Widget", 2, 2.5)])
        await client.cancel(again.id)
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while seen != [1, 2, 3]:
            assert asyncio.get_running_loop().time() < deadline, seen
            await asyncio.sleep(0.05)
        watching.cancel()


def test_connections_notice_a_vanished_database_server_unless_the_url_says_otherwise(database_url: str) -> None:
    """TCP keepalives and a user timeout on every connection; a URL's own values win."""
    for url, user_timeout in ((database_url, "15000"), (f"{database_url}?tcp_user_timeout=3000", "3000")):
        database = open_database(url)
        try:
            database.connect()
            settings = database.connection().info.get_parameters()
        finally:
            database.close()
        assert settings["keepalives"] == "1" and settings["keepalives_idle"] == "10", settings
        assert settings["tcp_user_timeout"] == user_timeout, settings


def test_sessions_bound_their_lock_waits_and_idle_transactions_unless_the_url_says_otherwise(database_url: str) -> None:
    overridden = f"{database_url}?options=-c%20lock_timeout%3D1000"
    for url, lock_timeout in ((database_url, "10s"), (overridden, "1s")):
        database = open_database(url)
        try:
            names = ("lock_timeout", "idle_in_transaction_session_timeout", "idle_session_timeout")
            settings = [database.execute_sql(f"SHOW {name}").fetchone()[0] for name in names]
        finally:
            database.close()
        assert settings == [lock_timeout, "5s", "0"], settings


async def test_an_idle_session_timeout_set_on_the_database_does_not_end_the_servers_connections(
    database_url: str,
) -> None:
    """An operator's ``idle_session_timeout`` would end a server's connections whenever its calls paused,
    and fail the next write (not retried) with UNAVAILABLE: the server's sessions turn it off."""
    name = urllib.parse.urlsplit(database_url).path.lstrip("/")
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} SET idle_session_timeout = '1s'")
    async with (
        running_server(database_url) as server,
        OrderClient(f"127.0.0.1:{server.port}", retry=RetryPolicy(attempts=1)) as client,
    ):
        order = await client.create([Item("Before the pause", 1, 1.0)])
        await asyncio.sleep(2.5)
        assert (await client.update_status(order.id, OrderStatus.CONFIRMED)).version == 2


@contextlib.contextmanager
def role(database_url: str) -> Iterator[str]:
    """A new login role that may read and write the tables and sequences of ``database_url``'s public schema
    (as created then), but neither create tables nor own any; yields ``database_url`` as that role."""
    name = f"orders_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN")
        admin.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {name}")
        admin.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {name}")
    parts = urllib.parse.urlsplit(database_url)
    try:
        yield parts._replace(netloc=f"{name}@{parts.hostname}:{parts.port}").geturl()
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {name}")  # its privileges, in this database
            admin.execute(f"DROP ROLE {name}")


def test_a_user_and_password_are_percent_decoded_as_libpq_decodes_them(database_url: str) -> None:
    """A user or password holding characters a URL does not allow there is given percent-encoded."""
    name = f"orders_test_{uuid.uuid4().hex[:8]}@x/y"
    parts = urllib.parse.urlsplit(database_url)
    encoded = urllib.parse.quote(name, safe="")
    url = parts._replace(netloc=f"{encoded}:p%2Fss%23w%3Frd%40@{parts.hostname}:{parts.port}").geturl()
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{name}" LOGIN')
        try:
            database = open_database(url)
            try:
                assert database.execute_sql("SELECT current_user").fetchone()[0] == name
            finally:
                database.close()
            assert database.connect_params["password"] == "p/ss#w?rd@"  # (trust authentication checks none here)
        finally:
            admin.execute(f'DROP ROLE "{name}"')


async def test_a_database_name_is_percent_decoded_as_libpq_decodes_it(database_url: str) -> None:
    """A database whose name holds characters a URL path does not allow is named percent-encoded, and the
    server serves from that database."""
    name = f"orders test/{uuid.uuid4().hex[:8]}?#%"
    parts = urllib.parse.urlsplit(database_url)
    url = parts._replace(path="/" + urllib.parse.quote(name, safe="")).geturl()
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            async with running_server(url) as server, OrderClient(f"127.0.0.1:{server.port}") as client:
                order = await client.create([Item("Encoded", 1, 1.0)])
            with psycopg.connect(parts._replace(path="").geturl(), dbname=name) as named:
                assert named.execute('SELECT id FROM "order"').fetchall() == [(order.id,)]
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_a_role_that_may_read_and_write_the_tables_but_not_own_them_serves_a_current_schema(
    database_url: str,
) -> None:
    """Least privilege: the schema created (or upgraded) once by its owner, the replicas serve as a role
    that may only read and write its tables, every RPC and the watch working as for the owner."""
    async with running_server(database_url):  # creates the schema, as its owner
        pass
    with role(database_url) as url:
        async with running_server(url) as server, OrderClient(f"127.0.0.1:{server.port}") as client:
            watch = client.watch(after_sequence=0)
            order = await client.create([Item("Least privilege", 1, 1.0)])
            await client.update_status(order.id, OrderStatus.CONFIRMED)
            assert [o.id async for o in client.list()] == [order.id]
            updates = [await asyncio.wait_for(anext(watch), TIMEOUT) for _ in range(2)]
            assert [u.status for u in updates] == [OrderStatus.PENDING, OrderStatus.CONFIRMED]
            await watch.aclose()


def test_a_role_that_may_not_create_tables_is_a_one_line_startup_error_on_an_empty_database(
    database_url: str,
) -> None:
    with role(database_url) as url:
        refusal = refused_start(url)
    assert "is unusable: its role lacks a privilege: permission denied for schema public (on an empty" in refusal


async def test_a_privilege_revoked_while_serving_fails_its_calls_with_unavailable_until_granted_again(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(database_url):
        pass
    with role(database_url) as url, psycopg.connect(database_url, autocommit=True) as admin:
        name = urllib.parse.urlsplit(url).username
        async with (
            running_server(url) as server,
            OrderClient(f"127.0.0.1:{server.port}", retry=RetryPolicy(attempts=1)) as client,
        ):
            order = await client.create([Item("Before", 1, 1.0)])
            admin.execute(f'REVOKE SELECT ON "order" FROM {name}')
            for _ in range(3):
                with pytest.raises(Unavailable) as refused:
                    await client.get(order.id)
                assert refused.value.message == (
                    "the database refuses the server's role (permission denied for table order); the server's "
                    "operator must grant it back its privileges on the server's tables and sequences"
                )
            admin.execute(f'GRANT SELECT ON "order" TO {name}')
            assert (await client.get(order.id)).id == order.id
    outages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "fail:" in r.getMessage()]
    assert len(outages) == 1 and "permission denied for table order" in outages[0], outages


async def test_an_outage_after_a_short_one_is_logged_too_and_its_message_is_one_line(
    database_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls that fail, work again at once, then fail again after a quiet spell: two outages logged (with
    the end of the first), not one; and the message PostgreSQL spreads over several lines (the statement,
    a caret) is one line, its first."""
    monkeypatch.setattr(orders.storage_threads, "RECOVERY_QUIET", 0.5)
    caplog.set_level(logging.INFO, logger="orders.storage_threads")
    async with (
        running_server(f"{database_url}?options=-c%20lock_timeout%3D200") as server,
        OrderClient(f"127.0.0.1:{server.port}", retry=RetryPolicy(attempts=1)) as client,
    ):
        for _ in range(2):
            with write_lock(database_url), pytest.raises(Unavailable) as refused:
                await client.create([Item("While locked", 1, 1.0)])
            assert refused.value.message == (
                "the database is unavailable (canceling statement due to lock timeout); retry later"
            )
            await client.create([Item("At once after", 1, 1.0)])
            await asyncio.sleep(1.0)  # quiet: no call at all
    messages = [r.getMessage() for r in caplog.records if r.name == "orders.storage_threads"]
    fails = [m for m in messages if "orders-db-writer fail:" in m]
    assert len(fails) == 2 and "work again" in " ".join(messages), messages


@pytest.mark.parametrize("sqlstate", ["data_corrupted", "index_corrupted"])
def test_postgresql_reporting_corruption_is_data_loss(database_url: str, sqlstate: str) -> None:
    """What PostgreSQL says of a damaged page (``could not read block``, ``invalid page in block``) is
    DATA_LOSS, as SQLite's "database disk image is malformed" is (see test_sqlite_files)."""
    database = open_database(database_url)
    report = f"DO $$ BEGIN RAISE EXCEPTION 'invalid page in block 7' USING ERRCODE = '{sqlstate}'; END $$"
    try:
        with pytest.raises(DataLoss, match=r"(?s)the database is corrupt \(invalid page in block 7.*restore it"):
            orders.storage_threads.call_translating_errors(database, database.execute_sql, report)
    finally:
        database.close()


def refused_start(url: str, *, server: tuple[str, ...] = ("-m", "orders.server")) -> str:
    """The one line on stderr of a server started on ``url`` (by ``python <server>``) that must exit 1."""
    result = subprocess.run(
        [sys.executable, *server, "--port", "0", "--db", url], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and result.stdout == "", result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_an_unreachable_postgresql_is_a_one_line_startup_error() -> None:
    refusal = refused_start(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/orders")
    assert refusal.startswith("orders serve: the database postgresql://postgres:***@127.0.0.1:")
    assert "cannot reach it" in refusal and "Connection refused" in refusal and "secret" not in refusal


def test_without_psycopg_3_the_server_exits_saying_to_install_it(database_url: str) -> None:
    """peewee would use psycopg2 alone, but the server's LISTEN needs psycopg 3: a one-line start-up error."""
    hide_psycopg = "import sys; sys.modules['psycopg'] = None; import orders.server; orders.server.main()"
    refusal = refused_start(database_url, server=("-c", hide_psycopg))
    assert refusal.endswith("is unusable: PostgreSQL needs psycopg 3: pip install 'orders[postgres]'\n"), refusal


def test_a_replica_kept_from_the_write_lock_at_start_up_exits_saying_so(database_url: str) -> None:
    """A replica starting while another holds the write lock (a large schema upgrade) waits for it at most
    the lock timeout (here 0.5 s, from the URL), then exits with a one-line error that says so."""
    url = f"{database_url}?options=-c%20lock_timeout%3D500"
    with write_lock(database_url):
        refusal = refused_start(url)
    assert "is unusable: another process held its lock too long: canceling statement due to lock timeout" in refusal


async def test_a_replica_frozen_in_the_middle_of_a_write_holds_up_the_others_only_briefly(database_url: str) -> None:
    """A replica paused or cut off while holding the write lock (here: a connection opened as a replica
    opens it, that takes the lock and then does nothing) has its session ended by the database after 5 s,
    so the other replicas' writes go on: within the client's default deadline (10 s)."""
    async with running_server(database_url) as server, OrderClient(f"127.0.0.1:{server.port}") as client:
        await client.create([Item("Before", 1, 1.0)])
        frozen = open_database(database_url)
        frozen.execute_sql("BEGIN")
        frozen.execute_sql("SELECT pg_advisory_xact_lock(%s)", (orders.storage.WRITE_LOCK_KEY,))
        started = time.monotonic()
        order = await client.create([Item("While frozen", 1, 1.0)])  # the default deadline
        assert time.monotonic() - started > 4.5, "held up by the lock until the session was ended"
        with pytest.raises(peewee.DatabaseError, match="idle-in-transaction"):  # that session is gone
            frozen.execute_sql("SELECT 1")
        frozen.close()
        assert (await client.get(order.id)).id == order.id


async def test_calls_held_up_by_another_sessions_lock_fail_with_unavailable_after_the_lock_timeout(
    database_url: str,
) -> None:
    """A table locked by another session (a migration, VACUUM FULL, an operator's LOCK TABLE) holds up the
    writes and reads that need it for the lock timeout (10 s by default, as SQLite's busy timeout; here
    1 s, from the URL), not for as long as the lock is held: then they fail with UNAVAILABLE, a batch of
    writes all at once rather than one after the other, and the server serves again once the lock goes."""
    async with (
        running_server(f"{database_url}?options=-c%20lock_timeout%3D1000") as server,
        OrderClient(f"127.0.0.1:{server.port}", retry=RetryPolicy(attempts=1)) as client,
    ):
        order = await client.create([Item("Before", 1, 1.0)])
        with psycopg.connect(database_url) as admin:  # holds the lock until this block commits
            admin.execute('LOCK TABLE "order" IN ACCESS EXCLUSIVE MODE')
            started = time.monotonic()
            calls = [client.create([Item("While locked", 1, 1.0)]) for _ in range(8)] + [client.get(order.id)]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            waited = time.monotonic() - started
        for outcome in outcomes:
            assert isinstance(outcome, Unavailable) and "lock timeout" in outcome.message, outcome
        assert waited < 5, f"the writes waited {waited:.1f} s: one lock timeout each instead of one per batch"
        assert (await client.get(order.id)).id == order.id
        assert (await client.create([Item("After", 1, 1.0)])).version == 1


async def test_a_replica_that_cannot_read_its_database_says_not_serving_and_sends_no_heartbeats(
    database_url: str,
) -> None:
    """While its database refuses it (here: connections to it disallowed and the open ones ended), a replica's
    health is NOT_SERVING, so that a load balancer stops sending it calls, and its watches get no heartbeat
    claiming to be up to date, so that a client moves on to another replica; both come back with it."""
    database = database_url.rsplit("/", 1)[1]
    async with running_server(database_url) as server:
        channel = Channel("127.0.0.1", server.port)
        heartbeats: list[int] = []

        async def watch() -> None:
            async for update in OrderServiceStub(channel).order_status_stream(
                OrderStatusStreamRequest(heartbeat_seconds=1)
            ):
                heartbeats.append(update.sequence)


        watching = asyncio.ensure_future(watch())
        try:
            assert await health(channel) == HealthCheckResponse.SERVING
            await eventually(lambda: len(heartbeats) >= 1, "a first heartbeat", TIMEOUT)
            with psycopg.connect(database_url.replace(f"/{database}", "/postgres"), autocommit=True) as admin:
                allow = f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS %s'
                admin.execute(allow % "false")
                try:
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                        "AND pid <> pg_backend_pid()",
                        (database,),
                    )
                    await wait_for_health(channel, HealthCheckResponse.NOT_SERVING)
                    quiet_from = len(heartbeats)
                    await asyncio.sleep(2.5)  # two and a half heartbeat intervals
                    assert len(heartbeats) == quiet_from, "a heartbeat while the log could not be read"
                finally:
                    admin.execute(allow % "true")
            await wait_for_health(channel, HealthCheckResponse.SERVING)
            await eventually(lambda: len(heartbeats) > quiet_from, "heartbeats again", TIMEOUT)
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            channel.close()


async def test_a_database_that_stops_answering_fails_calls_with_unavailable_and_says_not_serving(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database server that stops answering while its connections stay open (a stopped process, a
    network that holds the packets) is given up on after STALL_TIMEOUT (20 s; here 1 s): the calls
    waiting on it, even without a deadline, fail with UNAVAILABLE and later calls at once, and health is
    NOT_SERVING; when its connections break, the server reconnects and serves again."""
    monkeypatch.setattr(orders.storage_threads, "STALL_TIMEOUT", 1.0)
    monkeypatch.setattr(orders.storage_threads, "STALL_CHECK_INTERVAL", 0.1)
    database = urllib.parse.urlsplit(database_url)
    proxy = FreezingProxy(database.port or 5432)
    user = database.netloc.rpartition("@")[0]
    async with (
        proxy as address,
        running_server(database._replace(netloc=f"{user}@{address}" if user else address).geturl()) as server,
        OrderClient(f"127.0.0.1:{server.port}", timeout=None, retry=RetryPolicy(attempts=1)) as client,
    ):
        channel = Channel("127.0.0.1", server.port)


        try:
            order = await client.create([Item("Before", 1, 1.0)])
            proxy.freeze()
            started = time.monotonic()
            waiting = [client.create([Item("While stopped", 1, 1.0)]), client.get(order.id)]  # no deadline
            outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), TIMEOUT)
            for outcome in outcomes:
                assert isinstance(outcome, Unavailable) and "has not answered" in outcome.message, outcome
            assert time.monotonic() - started < TIMEOUT / 2
            await wait_for_health(channel, HealthCheckResponse.NOT_SERVING)
            with pytest.raises(Unavailable, match="has not answered"):
                await asyncio.wait_for(client.get(order.id), 0.5)  # at once
            await proxy.drop()
            await wait_for_health(channel, HealthCheckResponse.SERVING)
            assert (await client.get(order.id)).id == order.id
            assert (await client.create([Item("After", 1, 1.0)])).version == 1
        finally:
            channel.close()


async def test_a_write_held_up_past_the_stall_timeout_says_not_serving_while_reads_go_on(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write the database keeps waiting past STALL_TIMEOUT (here 1 s, and the lock timeout 5 s) fails
    with UNAVAILABLE and health says NOT_SERVING, although reads are still served, until it completes."""
    monkeypatch.setattr(orders.storage_threads, "STALL_TIMEOUT", 1.0)
    monkeypatch.setattr(orders.storage_threads, "STALL_CHECK_INTERVAL", 0.1)
    async with (
        running_server(f"{database_url}?options=-c%20lock_timeout%3D5000") as server,
        OrderClient(f"127.0.0.1:{server.port}", timeout=None, retry=RetryPolicy(attempts=1)) as client,
    ):
        channel = Channel("127.0.0.1", server.port)
        try:
            order = await client.create([Item("Before", 1, 1.0)])
            with write_lock(database_url):
                with pytest.raises(Unavailable, match="has not answered for 1 s.*may still take effect"):
                    await asyncio.wait_for(client.create([Item("Held up", 1, 1.0)]), TIMEOUT)
                await wait_for_health(channel, HealthCheckResponse.NOT_SERVING)
                assert (await client.get(order.id)).id == order.id
            await wait_for_health(channel, HealthCheckResponse.SERVING)
            assert len((await client.list_page()).orders) == 2  # the held-up create took effect once it could
        finally:
            channel.close()


async def health(channel: Channel) -> HealthCheckResponse.ServingStatus:
    request = HealthCheckRequest(service="orders.v1.OrderService")
    return (await HealthStub(channel).Check(request, timeout=TIMEOUT)).status


async def wait_for_health(channel: Channel, expected: HealthCheckResponse.ServingStatus) -> None:
    """Wait until the server at ``channel`` reports ``expected`` health."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while (got := await health(channel)) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"waited {TIMEOUT} s for {expected}, still {got}"
        await asyncio.sleep(0.1)
