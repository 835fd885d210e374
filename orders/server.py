"""The server process: configuration, health, reflection, signals, and the startup line.

``python -m orders.server`` and ``orders serve`` both land in :func:`main`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from grpclib.health.service import Health
from grpclib.health.v1 import health_pb2
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2 as reflection_v1_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from grpclib.server import Server

from orders._proto.google_proto_descriptor_pool import default_google_proto_descriptor_pool
from orders.calls import CallGuard, CallMiddleware, CallObserver, StrictProtoCodec, log_access
from orders.config import ServerConfig, add_server_arguments, config_from_args
from orders.service import OrderService, new_feed
from orders.storage import Storage

log = logging.getLogger(__name__)

# Reflection serves our own descriptors plus grpc.health.v1 and itself, so grpcurl needs no proto files.
_DESCRIPTORS = default_google_proto_descriptor_pool
for _module in (health_pb2, reflection_v1_pb2, reflection_v1alpha_pb2):
    _DESCRIPTORS.AddSerializedFile(_module.DESCRIPTOR.serialized_pb)
_REFLECTION_SERVICES = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")


class OrderServer:
    """One running orders server: storage, event feed, grpclib server with health and reflection."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.storage = Storage(config.db)
        self.feed = new_feed(self.storage)
        self.service = OrderService(self.storage, self.feed)
        self.health = Health({self.service: []})  # SERVING for "" and for orders.v1.OrderService
        services = [self.service, self.health]
        handlers = ServerReflection.extend(services, pool=_DESCRIPTORS)
        for reflection in handlers[len(services) :]:  # list the reflection services too, as grpcio servers do
            reflection._service_names = [*reflection._service_names, *_REFLECTION_SERVICES]
        guards: list[CallGuard] = []  # admission: auth, limits
        observers: list[CallObserver] = [log_access]  # access log, metrics
        self._calls = CallMiddleware(guards, observers)
        self._server = Server(handlers, codec=StrictProtoCodec())
        self._calls.install(self._server)
        self.port = 0

    async def start(self) -> int:
        """Open the database, start serving, and return the port actually bound."""
        await self.storage.open()
        await self.feed.start()
        await self._server.start(self.config.host, self.config.port)
        sockets = self._server._server.sockets if self._server._server else ()
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        return self.port

    async def stop(self) -> None:
        """Drain: refuse new calls, end streams with UNAVAILABLE, let unary calls finish, close the database."""
        self._server._server.close()  # stop accepting connections
        await self.feed.close()
        if not await self._calls.drain(self.config.grace):
            log.warning("calls still running after %.1fs grace; cancelling them", self.config.grace)
        self._server.close()
        await self._server.wait_closed()
        await self.storage.close()

    async def __aenter__(self) -> OrderServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def serve(config: ServerConfig) -> None:
    """Run a server until SIGINT or SIGTERM, then shut it down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with OrderServer(config) as server:
        print(f"Server started on port {server.port}", flush=True)
        await stop.wait()
        log.info("shutting down")
    log.info("stopped")


def configure_logging(level: str) -> None:
    """Log to stderr at ``level``."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m orders.server``."""
    parser = argparse.ArgumentParser(prog="orders serve", description="Run the orders gRPC server.")
    add_server_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
    configure_logging(config.log_level)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
