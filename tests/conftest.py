"""Shared fixtures: a real server on a temporary SQLite file, reached over a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from grpclib.client import Channel

from orders._proto.orders.v1 import OrderServiceStub
from orders.client import OrderClient
from orders.server import OrderServer
from orders.testing import running_server


@pytest.fixture
async def server() -> AsyncIterator[OrderServer]:
    """A running server on a free port and a fresh temporary database."""
    async with running_server() as running:
        yield running


@pytest.fixture
async def client(server: OrderServer) -> AsyncIterator[OrderClient]:
    """The library client connected to ``server``."""
    async with OrderClient(f"127.0.0.1:{server.port}") as connected:
        yield connected


@pytest.fixture
async def stub(server: OrderServer) -> AsyncIterator[OrderServiceStub]:
    """A raw generated stub connected to ``server``, for sending exactly the bytes a test wants."""
    channel = Channel("127.0.0.1", server.port)
    try:
        yield OrderServiceStub(channel)
    finally:
        channel.close()
