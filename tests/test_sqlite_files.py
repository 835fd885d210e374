"""The SQLite files under a running server. Deleted or replaced (an ``rm``, a backup copied or moved over
them), SQLite would go on writing to the files it has open, and every write acknowledged from then on
would be gone at the next start: the server refuses those writes with UNAVAILABLE and says NOT_SERVING.
Files that cannot grow (a full disk) fail the writes with UNAVAILABLE saying why, logged once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.health.v1.health_pb2 import HealthCheckResponse
from server_process import ServerProcess
from test_postgresql import wait_for_health

from orders import DataLoss, Item, OrderClient, RetryPolicy, Unavailable
from orders.storage_threads import RECOVERY_QUIET
from orders.testing import running_server

pytestmark = pytest.mark.database_free  # about SQLite files only: run once


def deleted(path: Path) -> None:
    path.unlink()


def wal_deleted(path: Path) -> None:
    Path(f"{path}-wal").unlink()


def replaced_by_a_copy(path: Path) -> None:
    copy = path.with_name("copy.db")
    shutil.copyfile(path, copy)  # what a restore from a backup leaves
    os.replace(copy, path)


async def test_a_swapped_file_is_logged_once_though_lookups_go_on_working(tmp_path: Path) -> None:
    """The event log's reads notice the swap and fail, while lookups of orders on the same thread still
    read the files the server has open: the log says that calls fail once, not once each time both met."""
    path = tmp_path / "orders.db"
    server = ServerProcess(tmp_path, f"sqlite:///{path}")
    await server.start()
    try:
        async with OrderClient(server.target) as client:
            order = await client.create([Item("Before", 1, 1.0)])
            deleted(path)
            for _ in range(40):  # over several of the event log's polls (4 a second)
                assert (await client.get(order.id)).id == order.id
                await asyncio.sleep(0.05)
        log = server.log.read_text()
        assert log.count("database calls on orders-db-reader fail: the database is unavailable (orders.db was") == 1
        assert "database calls on orders-db-reader work again" not in log, log
    finally:
        await server.kill()


@pytest.mark.parametrize("swap", [deleted, wal_deleted, replaced_by_a_copy])
async def test_a_database_file_swapped_under_the_server_refuses_writes_and_says_not_serving(
    tmp_path: Path, swap: Callable[[Path], None]
) -> None:
    path = tmp_path / "orders.db"
    async with (
        running_server(f"sqlite:///{path}") as server,
        OrderClient(f"127.0.0.1:{server.port}", retry=RetryPolicy(attempts=1)) as client,
    ):
        channel = Channel("127.0.0.1", server.port)
        try:
            order = await client.create([Item("Before", 1, 1.0)])
            swap(path)
            how = "replaced" if swap is replaced_by_a_copy else "deleted"
            for write in (client.create([Item("After", 1, 1.0)]), client.cancel(order.id)):
                with pytest.raises(Unavailable, match=f"was {how} while the server ran.*restart the server"):
                    await write
            await wait_for_health(channel, HealthCheckResponse.NOT_SERVING)
        finally:
            channel.close()


async def test_writes_to_files_that_cannot_grow_fail_saying_why_and_the_server_logs_it_once(tmp_path: Path) -> None:
    """A commit that cannot write its log (here the server's file size limit, as a full disk would) is
    UNAVAILABLE with SQLite's reason, not peewee's "cannot rollback - no transaction is active" that
    followed it; the server logs the outage once and its end, and writes work again by themselves."""
    path = tmp_path / "orders.db"
    server = ServerProcess(tmp_path, f"sqlite:///{path}")
    await server.start()
    try:
        async with OrderClient(server.target, retry=RetryPolicy(attempts=1)) as client:
            await client.create([Item("Before", 1, 1.0)])
            assert server.process is not None
            grown = max(path.stat().st_size, Path(f"{path}-wal").stat().st_size)
            resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (grown + 16_384, resource.RLIM_INFINITY))
            big = [Item(f"Item {i:04} " + "x" * 180, 1, 1.0) for i in range(100)]  # about 20 KB a create
            failures = []
            for _ in range(5):
                with pytest.raises(Unavailable) as failed:
                    await client.create(big)
                failures.append(failed.value.message)
            assert all("disk I/O error" in message for message in failures), failures
            resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            assert len((await client.create(big)).items) == 100
            assert "work again" not in server.log.read_text()  # said once writes have worked for a while
            await asyncio.sleep(RECOVERY_QUIET)
            await client.create(big)
        log = server.log.read_text()
        assert log.count("database calls on orders-db-writer fail: the database is unavailable (disk I/O") == 1, log
        assert "database calls on orders-db-writer work again" in log, log
    finally:
        await server.kill()


async def test_a_server_on_a_database_with_a_corrupt_event_log_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "orders.db"
    await create_one_order(path)
    with sqlite3.connect(path) as db:
        (page,) = db.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'status_event'").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
    with path.open("r+b") as file:  # the event log's first page overwritten
        file.seek((page - 1) * page_size)
        file.write(b"\x55" * 100)
    assert start_refused(path).endswith("is unusable: database disk image is malformed\n")


async def test_a_corrupt_part_of_the_database_is_data_loss_for_the_calls_that_meet_it(tmp_path: Path) -> None:
    """Not INTERNAL, and not UNAVAILABLE ("retry later"): no retry mends a corrupt page. The server logs
    each call that meets it, and serves the rest of the database as before."""
    path = tmp_path / "orders.db"
    names = [Item(f"Product {i:03} " + "x" * 150, 1, 1.0) for i in range(3)]
    server = ServerProcess(tmp_path, f"sqlite:///{path}")
    await server.start()
    async with OrderClient(server.target) as client:
        ids = [(await client.create(names)).id for _ in range(200)]
    await server.stop()
    with sqlite3.connect(path) as db:  # the last of the order table's pages, which holds the newest orders
        (page,) = db.execute("SELECT MAX(pageno) FROM dbstat WHERE name = 'order' AND pagetype = 'leaf'").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
    with path.open("r+b") as file:
        file.seek((page - 1) * page_size)
        file.write(b"\x55" * 100)

    await server.start()
    try:
        async with OrderClient(server.target, retry=RetryPolicy(attempts=1)) as client:
            with pytest.raises(DataLoss, match=r"the database is corrupt \(database disk image is malformed\); retry"):
                await client.get(ids[-1])
            with pytest.raises(DataLoss, match="restore it from a backup"):
                await client.list_page(page_size=500)
            with pytest.raises(DataLoss):  # a new order goes to that last page
                await client.create(names)
            assert (await client.get(ids[0])).id == ids[0]  # on another page
        log = server.log.read_text()
        assert log.count("ERROR orders.storage_threads the database is corrupt (database disk image") == 3, log
        assert "Traceback" not in log, log
    finally:
        await server.kill()


def test_a_server_on_a_database_it_cannot_write_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    """Rather than start, say SERVING, and refuse every write."""
    path = tmp_path / "orders.db"
    asyncio.run(create_one_order(path))
    with read_only(path):
        refusal = start_refused(path)
    assert refusal.endswith("is unusable: cannot use it: attempt to write a readonly database\n")


async def create_one_order(path: Path) -> None:
    async with running_server(f"sqlite:///{path}") as server, OrderClient(f"127.0.0.1:{server.port}") as client:
        await client.create([Item("Before", 1, 1.0)])


def start_refused(path: Path) -> str:
    """What ``python -m orders.server`` on ``path`` says on stderr as it refuses to start (exit 1)."""
    result = subprocess.run(
        [sys.executable, "-m", "orders.server", "--port", "0", "--db", f"sqlite:///{path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr, result
    return result.stderr


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` read-only: by its mode, or for root, whom modes do not stop, as an immutable file."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield
        return
    subprocess.run(["chattr", "+i", path], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", path], check=True)
