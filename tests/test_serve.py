"""``orders.server.serve``, the loop of ``orders serve``: what it sets up before it says it has started."""

from __future__ import annotations

import asyncio
import gc
import signal

import pytest

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
