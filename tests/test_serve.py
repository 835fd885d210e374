"""``orders.server.serve``, the loop of ``orders serve``: what it sets up before it says it has started, and
where it listens."""

from __future__ import annotations

import asyncio
import gc
import signal
from pathlib import Path

import pytest
from server_process import ServerProcess

from orders import OrderClient, RetryPolicy
from orders.config import ServerConfig
from orders.server import GC_YOUNG_THRESHOLD, serve


class _Started(Exception):
    """Raised by the test's startup callback to end ``serve`` (which then stops the server) at once."""


async def test_startup_objects_are_frozen_and_young_garbage_is_collected_less_often(database_url: str) -> None:
    seen: dict[str, int] = {}

    def on_started(port: int) -> None:
        seen.update(port=port, frozen=gc.get_freeze_count(), young=gc.get_threshold()[0])
        raise _Started

    thresholds = gc.get_threshold()
    try:
        with pytest.raises(_Started):
            await serve(ServerConfig(port=0, db=database_url), on_started=on_started)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    assert seen["port"] > 0
    assert seen["frozen"] > 10_000  # modules, descriptors, ...: everything start-up made
    assert seen["young"] == GC_YOUNG_THRESHOLD


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_host_ipv6_any_serves_ipv4_clients_too(tmp_path: Path, database_url: str, workers: str) -> None:
    """``--host ::`` listens on every address of both families, as gRPC's ``[::]`` does (asyncio alone
    would make the socket IPv6-only, and IPv4 clients would be refused)."""
    server = ServerProcess(tmp_path, database_url, args=["--host", "::", "--workers", workers])
    await server.start()
    try:
        async with OrderClient(f"127.0.0.1:{server.port}", retry=RetryPolicy(attempts=1)) as ipv4:
            order = await ipv4.create([("Lamp", 1, 9.99)])
        async with OrderClient(f"[::1]:{server.port}", retry=RetryPolicy(attempts=1)) as ipv6:
            assert await ipv6.get(order.id) == order
    finally:
        assert await server.stop() == 0
