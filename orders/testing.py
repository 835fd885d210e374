"""The public test harness for code that uses the orders service.

* :func:`serve` runs a real server on a temporary database and yields a connected
  :class:`~orders.client.OrderClient` (like ``grpclib.testing.ChannelFor``, but over a real socket).
* Hypothesis strategies for valid and invalid requests.
* :class:`OrderStateMachine`, a stateful model of the service to check it (or a fork of it) against.

Needs the ``test`` extra (hypothesis).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from orders.client import OrderClient
from orders.server import OrderServer, ServerConfig


@contextlib.asynccontextmanager
async def running_server(db: str | None = None, **config: object) -> AsyncIterator[OrderServer]:
    """A started :class:`OrderServer` on a free port and, unless ``db`` is given, a temporary SQLite file."""
    with tempfile.TemporaryDirectory(prefix="orders-") as tmp:
        url = db or f"sqlite:///{Path(tmp) / 'orders.db'}"
        async with OrderServer(ServerConfig(port=0, db=url, **config)) as server:  # type: ignore[arg-type]
            yield server


@contextlib.asynccontextmanager
async def serve(db: str | None = None, **client_options: object) -> AsyncIterator[OrderClient]:
    """Run a real server on a temporary database and yield a client connected to it."""
    async with running_server(db) as server:
        async with OrderClient(f"127.0.0.1:{server.port}", **client_options) as client:  # type: ignore[arg-type]
            yield client
