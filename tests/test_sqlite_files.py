"""The SQLite files under a running server: deleted or replaced (an ``rm``, a backup copied or moved over
them), SQLite would go on writing to the files it has open, and every write acknowledged from then on
would be gone at the next start. The server refuses those writes with UNAVAILABLE and says NOT_SERVING."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from orders import Item, OrderClient, RetryPolicy, Unavailable
from orders.testing import running_server

pytestmark = pytest.mark.database_free  # about SQLite files only: run once
TIMEOUT = 10.0


def deleted(path: Path) -> None:
    path.unlink()


def wal_deleted(path: Path) -> None:
    Path(f"{path}-wal").unlink()


def replaced_by_a_copy(path: Path) -> None:
    copy = path.with_name("copy.db")
    shutil.copyfile(path, copy)  # what a restore from a backup leaves
    os.replace(copy, path)


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
            deadline = asyncio.get_running_loop().time() + TIMEOUT
            request = HealthCheckRequest(service="orders.v1.OrderService")
            while (await HealthStub(channel).Check(request, timeout=TIMEOUT)).status != HealthCheckResponse.NOT_SERVING:
                assert asyncio.get_running_loop().time() < deadline, "health still says SERVING"
                await asyncio.sleep(0.05)
        finally:
            channel.close()
